"""Hand a Channel or Queue to an unrelated process over a Unix socket.

As vhost-user does, the file descriptors travel as SCM_RIGHTS ancillary data
(``socket.send_fds`` / ``socket.recv_fds``): the segment itself when it is a
memfd, and the kick/call eventfds, so the receiving process sleeps and wakes
exactly like a child would.  Nothing needs a name in /dev/shm::

    # process A
    ch = vringipc.Channel()
    with vringipc.handoff.Offer(ch, "/tmp/frames.sock") as offer:
        offer.serve(count=1, timeout=30)       # blocks until one peer took it
        ch.send(b"hello")

    # process B (unrelated: no fork, no common parent)
    ch = vringipc.handoff.connect("/tmp/frames.sock")
    print(ch.recv())

The socket is created with mode 0600 (same user only) and unlinked on close.
A peer receives full access to the segment: offer it only to processes you
would let read and write the data.
"""

from __future__ import annotations

import json
import os
import socket
import stat

from vringipc import layout as L
from vringipc.ring import SharedRing
from vringipc.segment import Segment

__all__ = ["Offer", "connect"]

_MAX_FDS = 16
_HELLO = b"VRINGIPC-HANDOFF-1"


def _ring_fds(ring: SharedRing) -> tuple[list[int], dict]:
    seg = ring.segment
    fds, meta = [], {"backend": seg.backend, "name": seg.name,
                     "nrings": len(ring.kick_fds)}
    if seg.backend == "memfd":
        fds.append(seg.fd)
    fds += ring.kick_fds + ring.call_fds
    return fds, meta


class Offer:
    """Serve a Channel or Queue's descriptors on a Unix socket at `path`."""

    def __init__(self, obj, path: str):
        from vringipc.channel import Channel
        from vringipc.queue import Queue
        if isinstance(obj, Channel):
            kind, ring, extra_fds, params = "channel", obj._ring, [], {"spin": obj._spin_ns / 1e9}
        elif isinstance(obj, Queue):
            kind, ring = "queue", obj._ring
            extra_fds = [obj._join_fd]
            params = {"maxsize": obj._maxsize, "spin": obj._spin, "joinable": obj._joinable}
            if obj._dumps is not None:
                raise ValueError("a queue with a custom serializer cannot be handed off")
        else:
            raise TypeError(f"cannot hand off a {type(obj).__name__}")
        fds, meta = _ring_fds(ring)
        meta.update(kind=kind, params=params)
        self._fds = fds + extra_fds
        self._meta = json.dumps(meta).encode()
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)            # the socket file is created 0600
        try:
            self._sock.bind(path)
        finally:
            os.umask(old)
        self._sock.listen(8)

    def fileno(self) -> int:
        return self._sock.fileno()

    def serve(self, count: int = 1, timeout: float | None = None) -> int:
        """Hand the descriptors to up to `count` connecting peers; returns how
        many were served before `timeout` (seconds) ran out."""
        served = 0
        self._sock.settimeout(timeout)
        try:
            while served < count:
                try:
                    conn, _ = self._sock.accept()
                except socket.timeout:
                    break
                with conn:
                    conn.settimeout(5)
                    # Only same-user peers: check the credentials the kernel gives us.
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                    uid = int.from_bytes(creds[4:8], "little")
                    if uid != os.getuid() and os.getuid() != 0:
                        continue
                    socket.send_fds(conn, [_HELLO + b"\n" + self._meta], self._fds)
                    served += 1
        finally:
            self._sock.settimeout(None)
        return served

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Offer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(path: str, timeout: float | None = 10.0):
    """Receive a Channel or Queue offered at `path` by another process."""
    from vringipc.channel import Channel
    from vringipc.queue import JoinableQueue, Queue
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    fds: list[int] = []
    try:
        sock.connect(path)
        msg, fds, _flags, _addr = socket.recv_fds(sock, 65536, _MAX_FDS)
    finally:
        sock.close()
    try:
        hello, _, meta = msg.partition(b"\n")
        if hello != _HELLO:
            raise ValueError(f"{path} is not a vringipc handoff socket")
        meta = json.loads(meta)
        n = int(meta["nrings"])
        it = iter(fds)
        if meta["backend"] == "memfd":
            seg = Segment.from_fd(next(it))
        else:
            seg = Segment.attach(meta["name"])
        kicks = [next(it) for _ in range(n)]
        calls = [next(it) for _ in range(n)]
        rest = list(it)
        fds = []                                    # owned by the objects below now
        try:
            lay = L.parse_header(seg.buf)
        except BaseException:
            seg.close()
            raise
        ring = SharedRing(seg, lay, kicks, calls)
        params = meta["params"]
        if meta["kind"] == "channel":
            for fd in rest:
                os.close(fd)
            return Channel(_ring=ring, spin=params["spin"])
        q = (JoinableQueue if params["joinable"] else Queue).__new__(
            JoinableQueue if params["joinable"] else Queue)
        q._setup(ring, rest[0], params["maxsize"], None, None, params["spin"])
        for fd in rest[1:]:
            os.close(fd)
        return q
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
