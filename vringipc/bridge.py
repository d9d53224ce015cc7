"""Bridge a Queue or Channel across hosts over ZeroMQ (``pip install "vringipc[bridge]"``).

A *sender* bridge takes messages from a local Queue or Channel and sends them
to a ZeroMQ endpoint; a *receiver* bridge puts what arrives into a local Queue
or Channel.  The stages of a pipeline keep calling ``put()``/``get()`` (or
``send()``/``recv()``) on local vringipc objects::

    host A:  vringipc bridge --from queue:/jobs --to tcp://hostB:5555
    host B:  vringipc bridge --from tcp://0.0.0.0:5555 --allow-remote --to queue:/jobs

    # or from Python
    Sender(q, "tcp://127.0.0.1:5555").run(stop)          # q: a local Queue/Channel
    Receiver(q2, "tcp://127.0.0.1:5555").run(stop)

No unpickling
-------------
A Queue message travels as it lies in shared memory: its kind (pickle, custom
serializer, raw bytes), the main bytes and the out-of-band buffers
(``Queue.get_message`` / ``Queue.put_message``).  The receiving bridge checks
the frames and puts them into its queue as they are: a bridge never runs code
from the network (the consumer of the destination queue unpickles, as it
would for a local producer: use CURVE between hosts).  A Channel message is
raw bytes (kind 2, no buffers).  Large messages leave shared memory without a
copy: a Queue sender takes them with the core's pinning get (as
``get_nocopy``), a Channel sender with ``recv_view()``, and sends the views as
``copy=False`` frames; they stay pinned until zmq has sent them and the
receiver has acknowledged them.  Parts under 128 KiB are copied into one
frame: below that a copy costs less than a frame of its own.

Protocol (ZeroMQ DEALER -> ROUTER, multipart frames, little-endian)
-------------------------------------------------------------------
The sender is a DEALER whose routing id is its *session* (16 random bytes,
new for every Sender), the receiver a ROUTER (``ROUTER_HANDOVER``: a
reconnecting session takes its id over).  Either side may bind or connect.

=========  =====================================================================
sender ->  ``[b"H", <16s session, B source (0 queue, 1 channel), B protocol (1), 2x,
           Q nonce, Q first_unacked>]``
           ``[b"D", <Q seq_first, I count, I nparts, count x (H kind, H nbufs),
           nparts x I length>, blob, own part, ...]``: the parts (main, buffers
           of each message in order) one after another in `blob`, except
           those whose length has bit 31 set (OWN_FRAME): each of them is a
           frame of its own, in order (sent with copy=False).  Which parts go
           where is the sender's choice; the receiver checks it against the
           frames.
receiver   ``[b"W", <Q nonce, Q delivered>]`` welcome: resume after `delivered`
->         ``[b"A", <Q delivered>]`` cumulative acknowledgement
           ``[b"R"]`` unknown session or a gap in the sequence: say hello again
           ``[b"E", utf-8 text]`` refused (e.g. a Queue source into a Channel)
=========  =====================================================================

Messages are numbered 1, 2, ... per session.  The sender keeps every message
it sent in its window until acknowledged, takes from its local object only
while the window has room (``window`` messages and ``window_bytes`` bytes),
and after a (re)connection, a resync request or `retransmit` seconds without
progress says hello again and resends everything after the receiver's
`delivered`.  The receiver validates a whole DATA message (frame count, sizes,
kinds, sequence) before touching its local object, puts messages in sequence
order, drops duplicates (seq <= delivered), asks for a resync on a gap, and
acknowledges after the puts.  Its `delivered` per session survives a restart
in the state file (``state_file=``), an mmap'ed file updated after every put.

Guarantees (details and tests: docs/GUARANTEES.md, "Bridge")
--------------------------------------------------------------
* Order per sending bridge is kept; a TCP disconnect/reconnect loses and
  duplicates nothing; a restart of the receiving bridge loses nothing, and
  with a state file duplicates nothing (SIGKILLed: at most the one message
  whose put had committed when the kill came before its seq was recorded).
* A SIGKILLed sending bridge loses at most its unacknowledged window: at most
  `window` messages and `window_bytes` bytes plus one message (the local get
  removes a message; no two-phase get exists in the local API, so the bound
  cannot be 0; ``window=1`` makes it one message).
* Back-pressure is end to end and every buffer is bounded: a full remote
  queue blocks the receiver's put, which stops acks, which stops the sender's
  local gets, so local put()s block as on a full local queue.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import ipaddress
import itertools
import logging
import mmap
import os
import queue as _queue
import struct
import threading
import time
import urllib.parse

log = logging.getLogger("vringipc.bridge")

__all__ = ["Sender", "Receiver", "run_until_signal", "keep_freed_buffers", "ProtocolError",
           "BridgeRefused", "ReceiverCore", "StateFile", "open_local", "check_endpoint",
           "CurveClient", "CurveServer", "keygen", "KINDS"]

KINDS = (0, 1, 2)                   # MSG_PICKLE, MSG_CUSTOM, MSG_RAW_BYTES (vringipc.queue)
MSG_RAW_BYTES = 2
SRC_QUEUE, SRC_CHANNEL = 0, 1

T_HELLO, T_DATA, T_WELCOME, T_ACK, T_RESYNC, T_ERR = b"H", b"D", b"W", b"A", b"R", b"E"
PROTOCOL = 1                        # in HELLO; a receiver refuses any other version
HELLO = struct.Struct("<16sBB2xQQ")         # session, source, protocol, nonce, first_unacked
DATA_HDR = struct.Struct("<QII")            # seq_first, count, parts
WELCOME = struct.Struct("<QQ")
ACK = struct.Struct("<Q")
MAX_BATCH = 4096                    # messages per DATA message
MAX_BUFS = 4094                     # out-of-band buffers per Queue message (parts <= 4096)
MAX_SEQ = (1 << 63) - 1
OWN_FRAME = 1 << 31                 # in a part's length: the part is a frame of its own
MAX_PART = OWN_FRAME - 1            # so a part is at most 2 GiB - 1
# a sender copies parts shorter than this into the blob frame, and sends
# longer ones as frames of their own without a copy: below it a copy costs
# less than a frame (pyzmq frame, zmq message, a receive buffer, the
# zero-copy release through pyzmq's garbage-collector thread); measured with
# bench/bridge_bench.py, docs/BRIDGE.md
INLINE_MAX = 128 << 10
DEFAULT_MAX_MESSAGE = 1 << 30      # a receiver refuses larger messages (--max-message)
ACK_BYTES = 1 << 20                 # a receiver acknowledges at least every MiB
HOLD_FROM = 65536                   # a Queue sender takes messages this large as views (no
                                    # copy by the get: one into the blob, or none from INLINE_MAX)
PACK_BYTES = 256 << 10              # a run of small messages taken in one call: at most this much

DEFAULT_WINDOW = 4096
DEFAULT_WINDOW_BYTES = 16 << 20
DEFAULT_BATCH = 512
BATCH_BYTES = 1 << 20               # a DATA message carries at most this much (or one message)
RETRANSMIT = 2.0                    # seconds without progress before a resync
HELLO_EVERY = 0.5
SLICE = 0.02                        # longest wait between two looks at the socket


class ProtocolError(ValueError):
    """A malformed or out-of-protocol message from the network."""


class BridgeRefused(RuntimeError):
    """The other bridge refused this one (an ERR message)."""


def _zmq():
    try:
        import zmq
    except ImportError as e:                                   # pragma: no cover
        raise ImportError('vringipc.bridge needs pyzmq: pip install "vringipc[bridge]"') from e
    return zmq


# --- endpoints and security ------------------------------------------------------------

def check_endpoint(endpoint: str, bind: bool, allow_remote: bool = False) -> str:
    """Refuse to bind anywhere but loopback unless `allow_remote` (tcp://*:P,
    0.0.0.0, a host's address...).  ipc:// and inproc:// are local.  Returns
    the endpoint."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc", "inproc"):
        raise ValueError(f"not a ZeroMQ endpoint (tcp://HOST:PORT, ipc://PATH): {endpoint!r}")
    if scheme != "tcp" or not bind or allow_remote:
        return endpoint
    host = urllib.parse.urlsplit("tcp://" + rest).hostname or ""
    if host == "localhost":
        return endpoint
    try:
        if ipaddress.ip_address(host).is_loopback:
            return endpoint
    except ValueError:
        pass
    raise ValueError(f"refusing to bind {endpoint}: only loopback (127.0.0.1) without "
                     "--allow-remote (then use CURVE keys between hosts)")


class CurveServer:
    """The receiver's CURVE settings: its secret key file and a directory of
    the public key files of the senders it accepts (zmq.auth certificates)."""

    def __init__(self, secret_file: str, allow_dir: str):
        self.secret_file, self.allow_dir = secret_file, allow_dir


class CurveClient:
    """The sender's CURVE settings: its secret key file and the receiver's
    public key file."""

    def __init__(self, secret_file: str, server_public_file: str):
        self.secret_file, self.server_public_file = secret_file, server_public_file


def keygen(directory: str, name: str) -> tuple[str, str]:
    """Write DIRECTORY/NAME.key (public) and NAME.key_secret (secret, 0600);
    returns their paths."""
    import zmq.auth
    os.makedirs(directory, mode=0o700, exist_ok=True)
    old = os.umask(0o077)
    try:
        pub, sec = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    return pub, sec


def _apply_curve(sock, curve, ctx):
    """Configure `sock` for CURVE; returns a started authenticator or None."""
    if curve is None:
        return None
    import zmq.auth
    zmq = _zmq()
    pub, sec = zmq.auth.load_certificate(curve.secret_file)
    if sec is None:
        raise ValueError(f"{curve.secret_file} holds no secret key")
    sock.curve_publickey, sock.curve_secretkey = pub, sec
    if isinstance(curve, CurveClient):
        server_pub, _ = zmq.auth.load_certificate(curve.server_public_file)
        sock.curve_serverkey = server_pub
        return None
    from zmq.auth.thread import ThreadAuthenticator
    if not os.path.isdir(curve.allow_dir):
        raise ValueError(f"{curve.allow_dir} is not a directory of allowed public keys")
    auth = ThreadAuthenticator(ctx, log=log.getChild("auth"))
    auth.start()
    auth.configure_curve(domain="global", location=curve.allow_dir)
    sock.curve_server = True
    sock.setsockopt(zmq.ZAP_DOMAIN, b"global")
    return auth


class _Link:
    """A ZeroMQ socket with a monitor (connections, disconnections, refused
    handshakes) and, for a CURVE server, its authenticator."""

    def __init__(self, kind, endpoint, bind, allow_remote, curve, setup):
        zmq = _zmq()
        check_endpoint(endpoint, bind, allow_remote)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(kind)
        self.auth = None
        self.connects = self.disconnects = self.auth_failures = 0
        try:
            self.sock.linger = 2000
            # TCP keepalive, not ZMTP heartbeats: a receiver whose local
            # object is full stops reading, and must not look dead for it
            self.sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            self.sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 10)
            self.sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 5)
            self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
            self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            setup(self.sock)
            self.auth = _apply_curve(self.sock, curve, self.ctx)
            self.mon = self.sock.get_monitor_socket(
                zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED)
            (self.sock.bind if bind else self.sock.connect)(endpoint)
        except BaseException:
            self.close(0)
            raise
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.mon, zmq.POLLIN)

    def events(self) -> list[int]:
        """Monitor events since the last call (counted as they are read)."""
        zmq = _zmq()
        from zmq.utils.monitor import parse_monitor_message
        out = []
        while True:
            try:
                ev = parse_monitor_message(self.mon.recv_multipart(zmq.NOBLOCK))["event"]
            except zmq.Again:
                return out
            if ev in (zmq.EVENT_HANDSHAKE_SUCCEEDED,):
                self.connects += 1
            elif ev == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
            elif ev in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.auth_failures += 1
                log.error("a peer failed the ZeroMQ handshake (wrong CURVE key or protocol)")
            out.append(ev)

    def poll(self, timeout: float, fd: int | None = None) -> bool:
        """Wait up to `timeout` s for the socket (or the monitor, or `fd`);
        True if the socket has a message."""
        zmq = _zmq()
        if fd is None:
            return bool(dict(self.poller.poll(int(timeout * 1000))).get(self.sock, 0) & zmq.POLLIN)
        self.poller.register(fd, zmq.POLLIN)
        try:
            return bool(dict(self.poller.poll(int(timeout * 1000))).get(self.sock, 0) & zmq.POLLIN)
        finally:
            self.poller.unregister(fd)

    def close(self, linger: int | None = None) -> None:
        if getattr(self, "mon", None) is not None:
            try:
                self.sock.disable_monitor()
            except Exception:
                pass
            self.mon.close(0)
            self.mon = None
        self.sock.close(linger)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()


# --- local objects ----------------------------------------------------------------------

def open_local(spec: str):
    """A local Queue or Channel from a spec: ``queue:NAME`` (a Queue created
    with backend="shm", name=NAME), ``channel:NAME`` (Channel.attach), or
    ``handoff:PATH`` (vringipc.handoff.connect: the eventfds come along, so
    waits sleep instead of polling)."""
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"expected queue:NAME, channel:NAME or handoff:PATH, got {spec!r}")
    if kind == "handoff":
        from vringipc import handoff
        return handoff.connect(name)
    if kind == "channel":
        from vringipc.channel import Channel
        return Channel.attach(name)
    if kind == "queue":
        return _attach_queue(name)
    raise ValueError(f"unknown local object kind {kind!r} (queue, channel, handoff)")


def _attach_queue(name: str):
    # Queue has no public attach-by-name yet: build one from the named ring as
    # vringipc.handoff does (no eventfds: this side polls).
    from vringipc import layout as L
    from vringipc.queue import Queue
    from vringipc.ring import SharedRing
    ring = SharedRing.attach(name)
    if ring.layout.app_kind != L.APP_QUEUE:
        ring.close()
        raise ValueError(f"{name} is not a vringipc Queue")
    q = Queue.__new__(Queue)
    try:
        q._setup(ring, -1, 0, None, None, 50e-6)
    except BaseException:
        ring.close()
        raise
    q._maxsize = q._core.maxsize
    return q


def _is_channel(obj) -> bool:
    from vringipc.channel import Channel
    return isinstance(obj, Channel)


class _Batch:
    """Messages first .. first+count-1 as the frames of one DATA message,
    kept in the sender's window until acknowledged."""

    __slots__ = ("first", "count", "frames", "nbytes", "hold")

    def __init__(self, first, count, frames, nbytes, hold):
        self.first, self.count, self.frames = first, count, frames
        self.nbytes, self.hold = nbytes, hold

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def release(self) -> None:
        for v in self.hold or ():
            v.release()                 # a Channel view: given back once zmq let go
        self.hold = None


def _place(part, ln: int, lens: list, small: list, big: list, own_from: int | None = None) -> bool:
    """Place a part of ln bytes in a DATA message being built: into `small`
    (copied into the blob) or, from own_from (default INLINE_MAX) bytes on,
    into `big` (a frame of its own, OWN_FRAME in its stated length); its
    stated length into `lens`.  True if it went to `big`."""
    if ln > MAX_PART:
        raise ValueError(f"a message part of {ln} bytes: a bridge carries parts up to "
                         f"{MAX_PART} bytes")
    own = ln >= (INLINE_MAX if own_from is None else own_from)
    lens.append(ln | OWN_FRAME if own else ln)
    (big if own else small).append(part)
    return own


def _frames(seq, desc, lens, small, big) -> list:
    """DATA for parts placed by _place()."""
    hdr = (DATA_HDR.pack(seq, len(desc) // 2, len(lens)) + struct.pack(f"<{len(desc)}H", *desc)
           + struct.pack(f"<{len(lens)}I", *lens))
    return [T_DATA, hdr, b"".join(small), *big]


class _QueueSource:
    kind = SRC_QUEUE
    give_back_ok = True

    def __init__(self, q):
        if not hasattr(q, "get_message"):
            raise TypeError("this vringipc.Queue has no get_message(): the bridge needs the raw "
                            "message API")
        self.q = q
        self._core_get = None
        self._hold = False

    def take(self, seq: int, n: int, nbytes: int, timeout: float):
        """A _Batch of up to n messages (about nbytes) numbered from seq,
        waiting up to timeout for the first; None if there is none."""
        if self._core_get is not None and not self._hold:
            # plain small messages: a run of them in one call, packed in C
            cnt, meta, blob = self._take_packed(n, min(nbytes, PACK_BYTES), INLINE_MAX)
            if cnt:
                return _Batch(seq, cnt, [T_DATA, DATA_HDR.pack(seq, cnt, cnt) + meta, blob],
                              len(blob), None)
        if self._core_get is None:
            get = self.q.get_message               # registers this process
        else:
            # the core's get: with hold=True main and buffers are views of
            # shared memory, pinned until zmq and the window let go, so large
            # parts leave without a copy; holding costs more than copying
            # small ones, so hold while the previous message was large
            core_get, hold = self._core_get, self._hold
            get = lambda block, timeout=None: core_get(block, timeout, hold)  # noqa: E731
        try:
            kind, main, bufs = get(True, timeout) if timeout > 0 else get(False)
        except _queue.Empty:
            return None
        if self._core_get is None:
            self._core_get = self.q._core.get_msg
            self._take_packed = self.q._core.take_packed
        desc, lens, small, big = [], [], [], []
        count = size = 0
        while True:
            desc += (kind, len(bufs))
            msize = 0
            for part in (main, *bufs) if bufs else (main,):
                ln = len(part) if type(part) is bytes else memoryview(part).nbytes
                _place(part, ln, lens, small, big)
                msize += ln
            size += msize
            count += 1
            if (msize >= HOLD_FROM) != self._hold and self._core_get is not None:
                self._hold = not self._hold
                core_get, hold = self._core_get, self._hold
                get = lambda block, timeout=None: core_get(block, timeout, hold)  # noqa: E731
            if count >= n or size >= nbytes:
                break
            try:
                kind, main, bufs = get(False)
            except _queue.Empty:
                break
        return _Batch(seq, count, _frames(seq, desc, lens, small, big), size, None)

    def wait_begin(self):
        """After take() found nothing: an fd that becomes readable when a
        message is put (None: poll), and whether it is still worth waiting."""
        fd = self.q._ring.kick_fds[0]
        if fd < 0:
            return None, True
        return fd, bool(self.q._core.sleep_begin(0))

    def wait_end(self, fd) -> None:
        if fd is not None:
            try:
                os.eventfd_read(fd)          # nonblocking eventfd: clear it
            except (BlockingIOError, OSError):
                pass
            self.q._core.sleep_end(0)

    def give_back(self, msgs, timeout: float) -> int:
        n = 0
        for kind, main, bufs in msgs:
            self.q.put_message(kind, main, bufs, True, timeout)
            n += 1
        return n


class _ChannelSource:
    kind = SRC_CHANNEL
    give_back_ok = False

    def __init__(self, ch):
        self.ch = ch

    def take(self, seq: int, n: int, nbytes: int, timeout: float):
        recv = self.ch.recv_view
        try:
            v = recv(True, timeout) if timeout > 0 else recv(False)
        except _queue.Empty:
            return None
        desc, lens, small, big, hold = [], [], [], [], []
        count = size = 0
        while True:
            ln = len(v)
            desc += (MSG_RAW_BYTES, 0)
            size += ln
            if _place(v, ln, lens, small, big):
                # the view itself goes to zmq (copy=False) and stays in the
                # window: its release() waits until zmq let go of it
                hold.append(v)
            # (a part in `small` is copied into the blob, then released)
            count += 1
            if count >= n or size >= nbytes:
                break
            try:
                v = recv(False)
            except _queue.Empty:
                break
        frames = _frames(seq, desc, lens, small, big)
        for v in small:
            v.release()
        return _Batch(seq, count, frames, size, hold)

    def wait_begin(self):
        # a receive that found nothing armed the kick eventfd
        fd = self.ch._rx.kick_fd if self.ch._rx is not None else -1
        return (fd if fd >= 0 else None), True

    def wait_end(self, fd) -> None:
        pass

    def give_back(self, msgs, timeout: float) -> int:
        return 0


def _source(obj):
    return _ChannelSource(obj) if _is_channel(obj) else _QueueSource(obj)


class _QueueSink:
    accepts = (SRC_QUEUE, SRC_CHANNEL)

    def __init__(self, q):
        if not hasattr(q, "put_message"):
            raise TypeError("this vringipc.Queue has no put_message(): the bridge needs the raw "
                            "message API")
        self.q = q
        self.max_message = q.capacity

    def check(self, kind: int, nbufs: int) -> None:
        pass

    put_packed = None         # the core's, once this process is registered (plain Queue)

    def put(self, kind, main, bufs, timeout):
        self.q.put_message(kind, main, bufs, True, timeout)
        if not self.q._joinable:
            # registered in this process now: from here on the core's put
            # itself (what put_message calls for a plain Queue)
            core_put = self.q._core.put_msg
            self.put = lambda k, m, b, t: core_put(k, m, b or None, True, t)
            self.put_packed = self.q._core.put_packed


class _ChannelSink:
    accepts = (SRC_CHANNEL,)
    put_packed = None

    def __init__(self, ch):
        self.ch = ch
        self.max_message = ch.capacity

    def check(self, kind: int, nbufs: int) -> None:
        if kind != MSG_RAW_BYTES or nbufs:
            raise ProtocolError("a Channel takes raw bytes messages only")

    def put(self, kind, main, bufs, timeout):
        self.ch.send(main, True, timeout)


def _sink(obj):
    return _ChannelSink(obj) if _is_channel(obj) else _QueueSink(obj)


# --- the receiver's durable record ------------------------------------------------------

class StateFile:
    """The last delivered sequence number per session, in a small mmap'ed
    file: one 8-byte store after each put (a SIGKILL cannot lose a store to a
    shared file mapping; power loss can, msync'ed only at close).  Locked
    (flock) so that two receivers cannot share it.

    The stores go through `words`, a u64 view of the mapping: one item
    assignment is one aligned 8-byte store.  struct.pack_into would not do:
    it zeroes the field, then writes it a byte at a time, so a SIGKILL in
    between would leave a count of 0 or a torn one behind, and the restarted
    receiver would take the whole stream again."""

    MAGIC = b"VRBSTATE1\0\0\0\0\0\0\0"
    SLOTS = 1024
    SLOT = struct.Struct("<16sQQ")            # session, delivered, last use (ns)

    def __init__(self, path: str):
        self.path = path
        size = len(self.MAGIC) + self.SLOTS * self.SLOT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise RuntimeError(f"{path} is in use by another receiving bridge") from None
                raise
            st = os.fstat(fd)
            if st.st_size == 0:
                os.ftruncate(fd, size)
            elif st.st_size != size:
                raise ValueError(f"{path} is not a bridge state file")
            self.mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.words = memoryview(self.mm).cast("Q")
        if self.mm[:len(self.MAGIC)] == b"\0" * len(self.MAGIC):
            self.mm[:len(self.MAGIC)] = self.MAGIC
        elif self.mm[:len(self.MAGIC)] != self.MAGIC:
            self.close()
            raise ValueError(f"{path} is not a bridge state file")
        self.slots: dict[bytes, int] = {}
        for i in range(self.SLOTS):
            sess, _d, _t = self.SLOT.unpack_from(self.mm, self._off(i))
            if sess != bytes(16):
                self.slots[sess] = i

    def _off(self, i: int) -> int:
        return len(self.MAGIC) + i * self.SLOT.size

    def get(self, session: bytes) -> int | None:
        i = self.slots.get(session)
        return None if i is None else self.SLOT.unpack_from(self.mm, self._off(i))[1]

    def slot(self, session: bytes, delivered: int) -> int:
        """The offset of the session's delivered word (claimed if new: a free
        slot, else the least recently used one)."""
        i = self.slots.get(session)
        if i is None:
            used = set(self.slots.values())
            free = [j for j in range(self.SLOTS) if j not in used]
            if free:
                i = free[0]
            else:
                i = min(used, key=lambda j: self.SLOT.unpack_from(self.mm, self._off(j))[2])
                old = self.SLOT.unpack_from(self.mm, self._off(i))[0]
                del self.slots[old]
            # free the slot, fill it, then name it: a kill half-way leaves
            # a free slot or a slot of a session id nobody uses, never a
            # session with another one's count
            off = self._off(i)
            self.mm[off:off + 16] = bytes(16)
            self.words[(off + 16) >> 3] = delivered
            self.words[(off + 24) >> 3] = time.time_ns()
            self.mm[off:off + 16] = session
            self.slots[session] = i
        else:
            self.words[(self._off(i) + 24) >> 3] = time.time_ns()
        return self._off(i) + 16

    def close(self) -> None:
        if getattr(self, "words", None) is not None:
            self.words.release()
            self.words = None
        if getattr(self, "mm", None) is not None:
            self.mm.flush()
            self.mm.close()
            self.mm = None
            os.close(self.fd)


class _MemoryState:
    """Delivered seqs in memory only: they survive reconnections, not a restart."""

    def __init__(self):
        self.d: dict[bytes, int] = {}
        self.mm = bytearray(8)

    def get(self, session):
        return self.d.get(session)

    def close(self):
        pass


# --- receiver ---------------------------------------------------------------------------

class _Session:
    __slots__ = ("delivered", "off", "last_resync", "source")

    def __init__(self, delivered, off, source):
        self.delivered = delivered
        self.off = off
        self.last_resync = 0.0
        self.source = source


def _parse_header(frames):
    """The checks every DATA message gets: frame count, header size and
    sequence, parts against the description and the frames.  Returns (seq,
    count, nparts, desc, lens, blob, big lengths)."""
    if len(frames) < 3:
        raise ProtocolError(f"DATA with {len(frames)} frames")
    hdr = memoryview(frames[1])
    if hdr.nbytes < DATA_HDR.size:
        raise ProtocolError(f"DATA header of {hdr.nbytes} bytes")
    seq, count, nparts = DATA_HDR.unpack_from(hdr, 0)
    if not 1 <= count <= MAX_BATCH or not count <= nparts <= count * (MAX_BUFS + 1):
        raise ProtocolError(f"DATA header says {count} messages, {nparts} parts")
    if hdr.nbytes != DATA_HDR.size + 4 * count + 4 * nparts:
        raise ProtocolError(f"DATA header of {hdr.nbytes} bytes for {count} messages, "
                            f"{nparts} parts")
    if not 1 <= seq <= MAX_SEQ - count:
        raise ProtocolError(f"DATA sequence number {seq} out of range")
    desc = struct.unpack_from(f"<{2 * count}H", hdr, DATA_HDR.size)
    if sum(desc[1::2]) + count != nparts:
        raise ProtocolError(f"DATA describes {sum(desc[1::2]) + count} parts, header says "
                            f"{nparts}")
    lens = struct.unpack_from(f"<{nparts}I", hdr, DATA_HDR.size + 4 * count)
    blob = memoryview(frames[2])
    big = [ln & MAX_PART for ln in lens if ln & OWN_FRAME]
    in_blob = sum(lens) - len(big) * OWN_FRAME - sum(big)
    if len(big) != len(frames) - 3 or in_blob != blob.nbytes:
        raise ProtocolError("DATA parts do not match the frames")
    return seq, count, nparts, desc, lens, blob, big


def _check_plain(kinds, lens, max_message: int, check) -> None:
    """Messages without buffers: known kinds, none larger than max_message."""
    for kind in set(kinds):
        if kind not in KINDS:
            raise ProtocolError(f"message kind {kind}")
        if check is not None:
            check(kind, 0)
    if max(lens) > max_message:
        raise ProtocolError(f"message of {max(lens)} bytes, the local object takes "
                            f"{max_message}")


def parse_packed(frames, max_message: int, check=None, header=None):
    """For the common DATA message, small messages without buffers all in
    the blob: (seq, count, meta, blob, lens) validated as parse_data() does,
    meta being the header's kinds-and-lengths part (what
    Queue._core.put_packed takes).  None for any other DATA message.
    `header`: _parse_header(frames) if the caller has it already."""
    seq, count, nparts, desc, lens, blob, big = header or _parse_header(frames)
    if nparts != count or big:
        return None
    _check_plain(desc[0::2], lens, max_message, check)
    return seq, count, memoryview(frames[1])[DATA_HDR.size:], blob, lens


def parse_data(frames, max_message: int, check=None, header=None):
    """Validate a DATA message (``frames[0] == b"D"``) completely; returns
    (seq_first, [(kind, main, bufs, size), ...]) or raises ProtocolError.
    Parts are views of the blob frame, or frames of their own where their
    length has OWN_FRAME (checked against the frames, not trusted).
    `header`: _parse_header(frames) if the caller has it already."""
    seq, count, nparts, desc, lens, blob, big = header or _parse_header(frames)
    if nparts == count and not big:
        # the common case of small messages without buffers, in bulk
        kinds = desc[0::2]
        _check_plain(kinds, lens, max_message, check)
        ends = list(itertools.accumulate(lens))
        return seq, [(k, blob[e - ln:e], [], ln) for k, ln, e in zip(kinds, lens, ends)]
    msgs, pos, nxt, k = [], 0, 3, 0
    for i in range(count):
        kind, nbufs = desc[2 * i], desc[2 * i + 1]
        if kind not in KINDS:
            raise ProtocolError(f"message kind {kind}")
        if nbufs > MAX_BUFS:
            raise ProtocolError(f"{nbufs} buffers in one message")
        if check is not None:
            check(kind, nbufs)
        parts, size = [], 0
        for ln in lens[k:k + 1 + nbufs]:
            if not ln & OWN_FRAME:
                parts.append(blob[pos:pos + ln])
                pos += ln
            else:
                ln &= MAX_PART
                f = frames[nxt]
                nxt += 1
                if memoryview(f).nbytes != ln:
                    raise ProtocolError("a DATA frame differs from its stated length")
                parts.append(f)
            size += ln
        k += 1 + nbufs
        if size > max_message:
            raise ProtocolError(f"message of {size} bytes, the local object takes {max_message}")
        msgs.append((kind, parts[0], parts[1:], size))
    return seq, msgs


def build_data(seq: int, entries, own_from: int | None = None) -> list:
    """The frames of a DATA message for entries (kind, main, bufs), parts
    from own_from bytes on in frames of their own."""
    desc, lens, small, big = [], [], [], []
    for kind, main, bufs in entries:
        desc += (kind, len(bufs))
        for part in (main, *bufs):
            _place(part, memoryview(part).nbytes, lens, small, big, own_from)
    return _frames(seq, desc, lens, small, big)


class ReceiverCore:
    """The receiving side's protocol, without a socket: ``handle(rid, frames)``
    validates, puts into the sink, and returns the replies to send to `rid`.
    Malformed input is logged and refused, never raised."""

    def __init__(self, sink, state=None, *, stop=None, put_slice: float = 0.1):
        self.sink = sink if hasattr(sink, "put") and hasattr(sink, "check") else _sink(sink)
        self.max_message = self.sink.max_message
        self.state = state if state is not None else _MemoryState()
        self.sessions: dict[bytes, _Session] = {}
        self.stop = stop or threading.Event()
        self.put_slice = put_slice
        self.messages = self.bytes = self.duplicates = self.refused = self.resyncs = 0
        self._unknown: dict[bytes, float] = {}

    def handle(self, rid: bytes, frames) -> list:
        try:
            if not frames:
                raise ProtocolError("empty message")
            tag = bytes(frames[0])
            if tag == T_DATA:
                return self._data(rid, frames)
            if tag == T_HELLO:
                return self._hello(rid, frames)
            raise ProtocolError(f"unknown message type {tag[:8]!r}")
        except ProtocolError as e:
            self.refused += 1
            log.error("refused a message from %s: %s", rid.hex() if rid else "?", e)
            return []

    def _hello(self, rid, frames):
        if len(frames) != 2 or memoryview(frames[1]).nbytes != HELLO.size:
            raise ProtocolError("malformed HELLO")
        session, source, protocol, nonce, first_unacked = HELLO.unpack(bytes(frames[1]))
        if session != rid:
            raise ProtocolError("HELLO session differs from the routing id")
        if protocol != PROTOCOL:
            log.error("refused a sender speaking bridge protocol %d (this receiver: %d)",
                      protocol, PROTOCOL)
            return [[T_ERR, f"bridge protocol {protocol}, this receiver speaks {PROTOCOL}: "
                             f"run the same vringipc version on both sides".encode()]]
        if source not in (SRC_QUEUE, SRC_CHANNEL) or not 1 <= first_unacked <= MAX_SEQ:
            raise ProtocolError("malformed HELLO")
        if source not in self.sink.accepts:
            log.error("refused a Queue source: a Channel receives raw bytes only")
            return [[T_ERR, b"a Channel receives raw bytes only: bridge a Queue into a Queue"]]
        s = self.sessions.get(session)
        if s is None:
            known = self.state.get(session)
            delivered = first_unacked - 1 if known is None else max(known, first_unacked - 1)
            off = self.state.slot(session, delivered) if isinstance(self.state, StateFile) else 0
            s = self.sessions[session] = _Session(delivered, off, source)
            log.info("session %s: %s, resuming after %d", session.hex(),
                     "known" if known is not None else "new", delivered)
        elif first_unacked - 1 > s.delivered:
            # the sender has acknowledgements we never sent: refuse to skip
            raise ProtocolError(f"HELLO says {first_unacked - 1} acknowledged, "
                                f"{s.delivered} were delivered")
        return [[T_WELCOME, WELCOME.pack(nonce, s.delivered)]]

    def _resync(self, key, s=None):
        now = time.monotonic()
        last = s.last_resync if s is not None else self._unknown.get(key, 0.0)
        if now - last < 0.2:
            return []
        if s is not None:
            s.last_resync = now
        else:
            if len(self._unknown) > 1024:
                self._unknown.clear()
            self._unknown[key] = now
        self.resyncs += 1
        return [[T_RESYNC]]

    def _data(self, rid, frames):
        s = self.sessions.get(rid)
        if s is None:
            parse_data(frames, self.max_message)               # still refuse garbage loudly
            return self._resync(rid)
        header = _parse_header(frames)
        if getattr(self.sink, "put_packed", None) is not None:
            packed = parse_packed(frames, self.max_message, self.sink.check, header)
            if packed is not None:
                return self._data_packed(rid, s, *packed)
        seq, msgs = parse_data(frames, self.max_message, self.sink.check, header)
        if seq > s.delivered + 1:
            return self._resync(rid, s)
        skip = s.delivered + 1 - seq
        self.duplicates += min(skip, len(msgs))
        off = s.off
        record = isinstance(self.state, StateFile)
        words = self.state.words if record else None
        n = s.delivered
        for kind, main, bufs, size in msgs[skip:]:
            if not self._put(kind, main, bufs):
                break                        # stopped while the local object was full
            n += 1
            if record:
                words[off >> 3] = n              # one 8-byte store (see StateFile)
            self.messages += 1
            self.bytes += size
        return self._delivered(rid, s, n, record)

    def _data_packed(self, rid, s, seq, count, meta, blob, lens):
        """_data() for a packed DATA message: the puts in one C call per
        local wait slice, each recorded in the state file as it is made."""
        if seq > s.delivered + 1:
            return self._resync(rid, s)
        start = min(s.delivered + 1 - seq, count)
        self.duplicates += start
        record = isinstance(self.state, StateFile)
        put, n, first = self.sink.put_packed, s.delivered, start
        while start < count:
            if record:
                k = put(meta, blob, start, count, True, self.put_slice, self.state.mm, s.off, n)
            else:
                k = put(meta, blob, start, count, True, self.put_slice)
            n += k
            start += k
            if start < count and self.stop.is_set():
                break                        # stopped while the local object was full
        self.messages += start - first
        self.bytes += sum(lens[first:start])
        return self._delivered(rid, s, n, record)

    def _delivered(self, rid, s, n: int, recorded: bool) -> list:
        """Messages up to n are in the local object (and, if `recorded`, in
        the state file already): remember it, acknowledge it."""
        s.delivered = n
        if not recorded:
            self.state.d[rid] = n
        return [[T_ACK, ACK.pack(n)]]

    def _put(self, kind, main, bufs) -> bool:
        put, slice_ = self.sink.put, self.put_slice
        while True:
            try:
                put(kind, main, bufs, slice_)
                return True
            except _queue.Full:
                if self.stop.is_set():
                    return False


class Receiver:
    """Network -> local Queue/Channel.  ``Receiver(sink, endpoint, bind=True,
    state_file=None, curve=None, allow_remote=False)``; ``run(stop)`` until
    stop (a threading.Event) is set."""

    def __init__(self, sink, endpoint: str, *, bind: bool = True, state_file: str | None = None,
                 curve: CurveServer | None = None, allow_remote: bool = False,
                 rcvhwm: int = 64, max_message: int = DEFAULT_MAX_MESSAGE):
        zmq = _zmq()
        self.stop = threading.Event()
        self.state = StateFile(state_file) if state_file else None
        try:
            self.core = ReceiverCore(sink, self.state, stop=self.stop)
            # refuse larger messages (and frames) than this, whatever the local
            # object could hold: what one network message may make us buffer
            self.core.max_message = min(self.core.sink.max_message, max_message)
            max_frame = self.core.max_message + 64

            def setup(sock):
                sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
                sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
                sock.rcvhwm = rcvhwm
                sock.sndhwm = 1000
            self.link = _Link(zmq.ROUTER, endpoint, bind, allow_remote, curve, setup)
        except BaseException:
            if self.state is not None:
                self.state.close()
            raise
        self.endpoint = endpoint

    def stats(self) -> dict:
        c = self.core
        return {"messages": c.messages, "bytes": c.bytes, "duplicates": c.duplicates,
                "refused": c.refused, "sessions": len(c.sessions),
                "connects": self.link.connects, "disconnects": self.link.disconnects,
                "auth_failures": self.link.auth_failures}

    def run(self, stop: threading.Event | None = None, status=None, status_every: float = 1.0):
        """Receive until `stop` is set; `status(stats)` is called every
        status_every seconds."""
        zmq = _zmq()
        stop = stop or self.stop
        self.core.stop = stop
        sock, link = self.link.sock, self.link
        next_status = time.monotonic() + status_every
        acks: dict[bytes, list] = {}
        flushed = (0, 0)                 # core.bytes, core.messages at the last ack flush
        while not stop.is_set():
            if link.poll(0.1):
                for _ in range(64):
                    try:
                        msg = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    rid, frames = msg[0].bytes, [f.buffer for f in msg[1:]]
                    for reply in self.core.handle(rid, frames):
                        if reply[0] == T_ACK:
                            acks[rid] = reply        # cumulative: send the last one
                            continue
                        self._send(rid, acks.pop(rid, None))
                        self._send(rid, reply)
                    core = self.core
                    if core.bytes - flushed[0] >= ACK_BYTES or core.messages - flushed[1] >= 1024:
                        for r, reply in acks.items():     # do not sit on acks for long
                            self._send(r, reply)
                        acks.clear()
                        flushed = (core.bytes, core.messages)
                    if stop.is_set():
                        break
                for rid, reply in acks.items():
                    self._send(rid, reply)
                acks.clear()
            link.events()
            if status is not None and time.monotonic() >= next_status:
                next_status = time.monotonic() + status_every
                status(self.stats())
        if status is not None:
            status(self.stats())

    def _send(self, rid: bytes, reply) -> None:
        if reply is None:
            return
        zmq = _zmq()
        try:
            self.link.sock.send_multipart([rid] + reply, zmq.NOBLOCK)
        except zmq.Again:
            pass                                     # the peer is gone: it will resync

    def close(self) -> None:
        self.link.close()
        if self.state is not None:
            self.state.close()


# --- sender -----------------------------------------------------------------------------

class Sender:
    """Local Queue/Channel -> network.  ``Sender(source, endpoint, bind=False,
    window=4096, window_bytes=16 MiB, batch=512, curve=None,
    allow_remote=False)``; ``run(stop)`` until stop (a threading.Event) is
    set, then drains: waits up to `drain_timeout` for the acknowledgements
    of its window and gives what is still unacknowledged back to a local
    Queue (``put_message``; a Channel cannot take it back)."""

    def __init__(self, source, endpoint: str, *, bind: bool = False,
                 window: int = DEFAULT_WINDOW, window_bytes: int = DEFAULT_WINDOW_BYTES,
                 batch: int = DEFAULT_BATCH, curve: CurveClient | None = None,
                 allow_remote: bool = False, retransmit: float = RETRANSMIT):
        zmq = _zmq()
        if window < 1 or window_bytes < 1 or batch < 1:
            raise ValueError("window, window_bytes and batch must be positive")
        self.src = _source(source)
        self.window, self.window_bytes = window, window_bytes
        self.batch = min(batch, MAX_BATCH)
        self.retransmit = retransmit
        self.session = os.urandom(16)

        def setup(sock):
            sock.setsockopt(zmq.ROUTING_ID, self.session)
            sock.setsockopt(zmq.IMMEDIATE, 1)          # nothing queued for an absent peer
            sock.sndhwm = 1000
            sock.rcvhwm = 1000
        self.link = _Link(zmq.DEALER, endpoint, bind, allow_remote, curve, setup)
        self.endpoint = endpoint
        self.win: collections.deque[_Batch] = collections.deque()
        self.inflight = 0            # messages taken and not acknowledged
        self.win_bytes = 0
        self.acked = 0               # the receiver delivered 1 .. acked
        self.next_seq = 1            # the next message taken gets this number
        self.send_seq = 1            # the next one to transmit
        self.welcomed = False
        self.nonce = 0
        self.last_hello = -1e9
        self.last_progress = time.monotonic()
        self.messages = self.bytes = self.resent = self.hellos = 0
        self.lost = self.returned = 0

    # -- state -------------------------------------------------------------------
    def stats(self) -> dict:
        return {"messages": self.acked, "taken": self.next_seq - 1, "bytes": self.bytes,
                "in_flight": self.inflight, "in_flight_bytes": self.win_bytes,
                "window": self.window, "resent": self.resent,
                "reconnects": max(0, self.link.connects - 1), "connected": self.welcomed,
                "auth_failures": self.link.auth_failures}

    def _release_through(self, delivered: int) -> None:
        win = self.win
        if delivered > self.acked:
            self.inflight -= delivered - self.acked
            self.acked = delivered
        while win and win[0].last <= delivered:
            b = win.popleft()
            self.win_bytes -= b.nbytes
            self.bytes += b.nbytes
            b.release()
        if self.send_seq <= delivered:
            self.send_seq = delivered + 1
        self.last_progress = time.monotonic()

    def _hello(self) -> None:
        zmq = _zmq()
        self.nonce += 1
        self.welcomed = False
        self.last_hello = time.monotonic()
        try:
            self.link.sock.send_multipart(
                [T_HELLO, HELLO.pack(self.session, self.src.kind, PROTOCOL, self.nonce,
                                     self.acked + 1)],
                zmq.NOBLOCK)
            self.hellos += 1
        except zmq.Again:
            pass                                        # not connected yet: try again later

    def _incoming(self, frames) -> None:
        tag = bytes(frames[0]) if frames else b""
        try:
            if tag == T_ACK and len(frames) == 2 and len(frames[1]) == ACK.size:
                (d,) = ACK.unpack(frames[1])
                if d >= self.next_seq:
                    raise ProtocolError(f"ACK of {d}, only {self.next_seq - 1} were taken")
                if d > self.acked:
                    self._release_through(d)
            elif tag == T_WELCOME and len(frames) == 2 and len(frames[1]) == WELCOME.size:
                nonce, d = WELCOME.unpack(frames[1])
                if nonce != self.nonce:
                    return                              # an answer to an older hello
                if d >= self.next_seq:
                    raise ProtocolError(f"WELCOME after {d}, only {self.next_seq - 1} were taken")
                if d < self.acked:
                    log.warning("the receiver resumes after %d, but %d were acknowledged: "
                                "%d messages cannot be sent again", d, self.acked, self.acked - d)
                self._release_through(d)
                if self.send_seq > self.acked + 1:
                    self.resent += self.send_seq - self.acked - 1
                self.send_seq = self.acked + 1          # go back: resend the window
                self.welcomed = True
                self.last_progress = time.monotonic()
            elif tag == T_RESYNC and len(frames) == 1:
                if time.monotonic() - self.last_hello > 0.05:
                    self._hello()
            elif tag == T_ERR and len(frames) == 2:
                raise BridgeRefused(bytes(frames[1]).decode("utf-8", "replace"))
            else:
                raise ProtocolError(f"unexpected message {tag[:8]!r} with {len(frames)} frames")
        except ProtocolError as e:
            log.error("ignored a message from the receiver: %s", e)

    def _pump(self) -> None:
        """Transmit the batches of the window not sent yet (a batch partly
        delivered is sent whole: the receiver drops what it has)."""
        zmq = _zmq()
        sock, win = self.link.sock, self.win
        if not self.welcomed or self.send_seq >= self.next_seq:
            return
        i = len(win)
        while i > 0 and win[i - 1].last >= self.send_seq:
            i -= 1
        for k in range(i, len(win)):
            b = win[k]
            try:
                sock.send_multipart(b.frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return                                  # the link is full or down: later
            self.send_seq = b.last + 1

    def _take(self, timeout: float) -> bool:
        room = min(self.window - self.inflight, self.batch)
        room_b = min(self.window_bytes - self.win_bytes, BATCH_BYTES)
        if room <= 0 or room_b <= 0:
            return False
        b = self.src.take(self.next_seq, room, room_b, timeout)
        if b is None:
            return False
        self.win.append(b)
        self.next_seq += b.count
        self.inflight += b.count
        self.win_bytes += b.nbytes
        self.messages += b.count
        return True

    def _network(self, timeout: float, fd: int | None = None) -> None:
        zmq = _zmq()
        link = self.link
        if timeout > 0:
            link.poll(timeout, fd)
        for _ in range(256):
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._incoming(frames)
        evs = link.events()
        if zmq.EVENT_HANDSHAKE_SUCCEEDED in evs:
            self._hello()                               # a (re)connection: where to resume?
        now = time.monotonic()
        if not self.welcomed:
            if now - self.last_hello > HELLO_EVERY:
                self._hello()
        elif self.send_seq > self.acked + 1 and now - self.last_progress > self.retransmit:
            log.warning("no acknowledgement for %.1f s: resynchronising", self.retransmit)
            self._hello()

    def run(self, stop: threading.Event | None = None, status=None, status_every: float = 1.0,
            drain_timeout: float = 10.0) -> None:
        """Forward until `stop` is set, then drain (see the class docstring)."""
        stop = stop or threading.Event()
        next_status = time.monotonic() + status_every
        self._hello()
        while not stop.is_set():
            if self.welcomed and self.send_seq == self.next_seq and self._has_room():
                if self._take(0):
                    self._pump()
                    self._network(0)
                    continue
                # nothing local: sleep until a local put or a network message
                fd, still = self.src.wait_begin()
                try:
                    if fd is None:
                        self._take(0.001)      # polling mode: the local get spins briefly
                        self._network(0)
                    elif still:
                        self._network(SLICE, fd)
                finally:
                    self.src.wait_end(fd)
            else:                              # window full, link down or not welcomed
                self._pump()
                self._network(SLICE)
            if status is not None and time.monotonic() >= next_status:
                next_status = time.monotonic() + status_every
                status(self.stats())
        # drain: no more local gets; wait for the window's acknowledgements
        end = time.monotonic() + drain_timeout
        while self.win and time.monotonic() < end:
            self._pump()
            self._network(SLICE)
            if status is not None and time.monotonic() >= next_status:
                next_status = time.monotonic() + status_every
                status(self.stats())
        self._give_back()
        if status is not None:
            status(self.stats())

    def _has_room(self) -> bool:
        return self.inflight < self.window and self.win_bytes < self.window_bytes

    def _give_back(self) -> None:
        if not self.win:
            return
        msgs = []
        for b in self.win:
            seq, parsed = parse_data(b.frames, 1 << 62)
            msgs += [(k, m, bufs) for k, m, bufs, _ in parsed[max(0, self.acked + 1 - seq):]]
        n = 0
        if self.src.give_back_ok:
            try:
                n = self.src.give_back(msgs, 5.0)
            except Exception as e:                      # Full, closed...
                log.error("could not give unacknowledged messages back: %s", e)
        self.returned += n
        self.lost += len(msgs) - n
        if n:
            log.warning("%d unacknowledged messages put back into the local queue", n)
        if len(msgs) > n:
            log.error("%d unacknowledged messages dropped (not acknowledged by the receiver "
                      "within the drain timeout, and the local object cannot take them back)",
                      len(msgs) - n)
        for b in self.win:
            b.release()
        self.win.clear()
        self.win_bytes = self.inflight = 0

    def close(self) -> None:
        self.link.close()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 64 << 20


def keep_freed_buffers(keep: int = KEEP_FREED_BYTES) -> bool:
    """Let this process's malloc keep freed large buffers for reuse (glibc
    only; False elsewhere).  libzmq allocates a buffer for every large message
    it receives; by default glibc hands a freed one back to the kernel soon
    after, and the next message faults its pages in again: 97 page faults per
    1 MiB message received in bench/bridge_bench.py, 30 with this, and a
    quarter to a third less CPU in the receiving bridge.  Buffers up to
    32 MiB (glibc's largest setting) then come from the heap, and up to
    `keep` bytes of freed heap are kept.  For a process whose job is
    bridging: run_until_signal() calls it."""
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, keep))


def run_until_signal(b, *, tune_malloc: bool = True, **run_kw) -> None:
    """Run a Sender or Receiver until SIGINT or SIGTERM (a Sender then
    drains), and close it: the process's job (what `vringipc bridge` runs).
    Call from the main thread of the process.  With tune_malloc (default)
    the process keeps freed message buffers (keep_freed_buffers)."""
    import signal
    if tune_malloc:
        keep_freed_buffers()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        b.run(stop, **run_kw)
    finally:
        b.close()


# --- the `vringipc bridge` command ------------------------------------------------------

_CLI_EPILOG = """\
One side names a local object, the other a ZeroMQ endpoint:
  host A:  vringipc bridge --from queue:/jobs --to tcp://hostB:5555 --curve-secret a.key_secret \\
               --curve-server-key b.key
  host B:  vringipc bridge --from tcp://0.0.0.0:5555 --allow-remote --to queue:/jobs \\
               --state jobs.state --curve-secret b.key_secret --curve-allow allowed/
Local objects: queue:NAME (a Queue created with backend="shm", name=NAME),
channel:NAME (a Channel with backend="shm"), handoff:PATH (a Queue or Channel
offered with vringipc.handoff).  A --to endpoint is connected to and a --from
endpoint bound, unless --bind/--connect says otherwise.  Binding anything but
127.0.0.1 needs --allow-remote.  Keys: --keygen DIR/NAME writes NAME.key
(public) and NAME.key_secret; the receiver lists the senders' public .key files
in its --curve-allow directory.  SIGINT/SIGTERM: the sender stops taking, waits
--drain-timeout for its window's acknowledgements and puts what is left back
into a local Queue; the receiver finishes its current put and exits.
See docs/BRIDGE.md.
"""


def add_cli(sub) -> None:
    """Register the ``bridge`` subcommand on an argparse subparsers object."""
    import argparse
    p = sub.add_parser("bridge", help="forward a Queue or Channel to another host over ZeroMQ "
                                      "(pip install 'vringipc[bridge]')",
                       description="Bridge a local Queue or Channel to a ZeroMQ endpoint, or an "
                                   "endpoint into a local Queue or Channel.",
                       epilog=_CLI_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", metavar="SRC", help="queue:NAME, channel:NAME, "
                   "handoff:PATH, or an endpoint (tcp://HOST:PORT, ipc://PATH)")
    p.add_argument("--to", dest="dst", metavar="DST", help="the same kinds as --from")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bind", action="store_true", help="bind the endpoint (default for --from)")
    g.add_argument("--connect", action="store_true", help="connect to the endpoint (default "
                                                          "for --to)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding an address other than loopback (use CURVE keys too)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, metavar="N",
                   help=f"sender: unacknowledged messages at most (default {DEFAULT_WINDOW}); "
                        "also the most a SIGKILLed sender can lose")
    p.add_argument("--window-bytes", type=int, default=DEFAULT_WINDOW_BYTES, metavar="B",
                   help=f"sender: unacknowledged bytes at most (default {DEFAULT_WINDOW_BYTES})")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, metavar="N",
                   help=f"sender: messages per network message at most (default {DEFAULT_BATCH})")
    p.add_argument("--drain-timeout", type=float, default=10.0, metavar="S",
                   help="sender: on SIGINT/SIGTERM wait this long for acknowledgements")
    p.add_argument("--max-message", type=int, default=DEFAULT_MAX_MESSAGE, metavar="B",
                   help="receiver: refuse messages larger than this (default 1 GiB, and never "
                        "more than the local object takes)")
    p.add_argument("--state", metavar="FILE", help="receiver: file recording the last delivered "
                   "message per sender, so a restart duplicates nothing")
    p.add_argument("--curve-secret", metavar="FILE", help="this side's secret key file "
                                                          "(NAME.key_secret)")
    p.add_argument("--curve-server-key", metavar="FILE",
                   help="sender: the receiver's public key file (NAME.key)")
    p.add_argument("--curve-allow", metavar="DIR",
                   help="receiver: directory of the public key files of allowed senders")
    p.add_argument("--keygen", metavar="DIR/NAME", help="write a CURVE key pair and exit")
    p.add_argument("--status-every", type=float, default=1.0, metavar="S",
                   help="seconds between status lines (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no status line")
    p.add_argument("-v", "--verbose", action="store_true", help="log protocol events")


def _is_endpoint(s: str) -> bool:
    return "://" in s


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""                                                   # pragma: no cover


def cli_main(args) -> int:
    """Run ``vringipc bridge`` with parsed `args`; returns the exit status."""
    import signal
    import sys
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="vringipc bridge: %(levelname)s: %(message)s")
    if args.keygen:
        d, name = os.path.split(args.keygen)
        pub, sec = keygen(d or ".", name)
        print(f"public key {pub}\nsecret key {sec}")
        return 0
    if not args.src or not args.dst:
        print("vringipc bridge: --from and --to are required", file=sys.stderr)
        return 2
    if _is_endpoint(args.src) == _is_endpoint(args.dst):
        print("vringipc bridge: one of --from/--to is a local object, the other an endpoint",
              file=sys.stderr)
        return 2
    sending = _is_endpoint(args.dst)
    endpoint = args.dst if sending else args.src
    bind = args.bind or (not args.connect and not sending)
    try:
        if sending:
            curve = (CurveClient(args.curve_secret, args.curve_server_key)
                     if args.curve_secret or args.curve_server_key else None)
            if curve and not (args.curve_secret and args.curve_server_key):
                raise ValueError("a sender needs --curve-secret and --curve-server-key")
        else:
            curve = (CurveServer(args.curve_secret, args.curve_allow)
                     if args.curve_secret or args.curve_allow else None)
            if curve and not (args.curve_secret and args.curve_allow):
                raise ValueError("a receiver needs --curve-secret and --curve-allow")
        check_endpoint(endpoint, bind, args.allow_remote)
        local = open_local(args.src if sending else args.dst)
    except (ValueError, OSError, ImportError, TypeError) as e:
        print(f"vringipc bridge: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    tty = sys.stderr.isatty()
    label = f"{args.src} -> {args.dst}"

    def status(st):
        if args.quiet:
            return
        if sending:
            line = (f"{label}: {st['messages']:,} msgs {_fmt_bytes(st['bytes'])} acked, "
                    f"window {st['in_flight']}/{st['window']} ({_fmt_bytes(st['in_flight_bytes'])}),"
                    f" resent {st['resent']}, reconnects {st['reconnects']}, "
                    f"{'connected' if st['connected'] else 'waiting for the receiver'}")
        else:
            line = (f"{label}: {st['messages']:,} msgs {_fmt_bytes(st['bytes'])} delivered, "
                    f"{st['duplicates']} dup, {st['refused']} refused, {st['sessions']} "
                    f"sender(s), connects {st['connects']}, disconnects {st['disconnects']}")
        if tty:
            sys.stderr.write("\r\x1b[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    try:
        if sending:
            b = Sender(local, endpoint, bind=bind, window=args.window,
                       window_bytes=args.window_bytes, batch=args.batch, curve=curve,
                       allow_remote=args.allow_remote)
        else:
            b = Receiver(local, endpoint, bind=bind, state_file=args.state, curve=curve,
                         allow_remote=args.allow_remote, max_message=args.max_message)
            if not args.state:
                log.warning("no --state file: a restart of this receiver may deliver the "
                            "senders' unacknowledged windows twice")
    except Exception as e:
        print(f"vringipc bridge: {e}", file=sys.stderr)
        local.close()
        return 2
    code = 0
    keep_freed_buffers()                 # this process only bridges
    try:
        if sending:
            b.run(stop, status, args.status_every, drain_timeout=args.drain_timeout)
            if b.lost:
                code = 1
        else:
            b.run(stop, status, args.status_every)
    except BridgeRefused as e:
        print(f"\nvringipc bridge: refused by the receiver: {e}", file=sys.stderr)
        code = 1
    finally:
        b.close()
        local.close()
    if tty and not args.quiet:
        sys.stderr.write("\n")
    print(f"vringipc bridge: stopped ({label})", file=sys.stderr)
    return code
