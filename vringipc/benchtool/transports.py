"""Transport adapters: the same workload over vringipc and over the
transports people use today.

A transport is a one-way *link* from one or more producer processes to one or
more consumer processes.  An adapter is a small class:

* ``__init__(self, max_msg, policy, depth)`` runs in the parent, before the
  benchmark processes are forked: it creates whatever must be inherited (a
  segment, a pipe, a queue) or chosen up front (an address, a service name).
  ``max_msg`` is the largest message in bytes, ``policy`` one of the wait
  policies the adapter lists in ``policies``, ``depth`` a hint for how many
  messages may be in flight.
* ``sender()`` / ``receiver()`` run in the child that uses that end, after the
  fork, and return an :class:`Endpoint`: any object with ``send(data)``,
  ``recv() -> bytes-like`` and ``close()`` (``send_many(list)`` /
  ``recv_many(n) -> list`` too when ``batch = True``, and an optional
  ``ready()`` called once every endpoint of the run exists).
* ``close()`` runs in the parent after the children have exited.

Register it with :func:`register` and it takes part in every mode; the
vringipc CLI loads your module with ``--plugin my_module`` (or a ``.py`` path)::

    from vringipc.benchtool.transports import Endpoint, Transport, register

    @register
    class MyFifo(Transport):
        name = "my.fifo"
        def __init__(self, max_msg, policy, depth):
            self.q = mylib.Fifo(size=max_msg * depth)
        def sender(self):
            return Endpoint(send=self.q.push, close=self.q.detach)
        def receiver(self):
            return Endpoint(recv=self.q.pop, close=self.q.detach)

Attributes of an adapter class: ``name`` (unique), ``policies`` (subset of
POLICIES it implements, default ("block",)), ``mpmc`` (one link may serve
several producers and consumers as a shared FIFO; otherwise an N x N run uses
N independent links and N x M with N != M is skipped), ``batch`` (native
batch API), ``requires`` (a module name: if it cannot be imported the
transport is skipped with a note), ``note`` (one line for the report).

Wait policies: ``spin`` = busy-poll, never sleep; ``block`` = sleep in the
kernel until woken; ``adaptive`` = spin for ADAPTIVE_SPIN_S, then sleep.
``default_policy`` is how the transport waits out of the box: "block" (a plain
blocking ``get()``/``recv()``) for most; vringipc's adapters list a policy
named "default" that constructs Channel/Queue without a ``spin`` argument, so
it measures the library's own default wait.  The policy "default" given to a
benchmark means each transport's own ``default_policy``.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import queue as _queue
import secrets
import select
import shutil
import socket
import struct
import tempfile
import time

__all__ = ["POLICIES", "DEFAULT", "resolve_policy", "ADAPTIVE_SPIN_S", "BUSY_SPIN_S", "Endpoint",
           "PolledEndpoint",
           "Transport", "Unavailable", "register", "unregister", "get", "all_transports",
           "check_available", "SENTINEL", "load_plugin"]

POLICIES = ("spin", "block", "adaptive")
DEFAULT = "default"           # a transport's own default_policy
ADAPTIVE_SPIN_S = 50e-6       # the adaptive policy spins this long before sleeping
BUSY_SPIN_S = 30.0            # "spin": longer than any run, so the waiter never sleeps

# The end-of-stream marker of the throughput workload: a 1-byte message
# (payloads are at least 8 bytes).
SENTINEL = b"\xff"

_now = time.perf_counter


class Unavailable(Exception):
    """The transport cannot run on this machine (e.g. its package is missing)."""


class Endpoint:
    """One end of a link in the process that uses it.

    Either subclass it, or pass the callables: ``Endpoint(send=q.put,
    close=q.close)``.  Binding the transport's own methods as attributes keeps
    the adapter out of the measured path."""

    def __init__(self, *, send=None, recv=None, send_many=None, recv_many=None,
                 close=None, ready=None):
        if send is not None:
            self.send = send
        if recv is not None:
            self.recv = recv
        if send_many is not None:
            self.send_many = send_many
        if recv_many is not None:
            self.recv_many = recv_many
        if close is not None:
            self.close = close
        if ready is not None:
            self.ready = ready

    def send(self, data) -> None:
        raise NotImplementedError

    def recv(self):
        raise NotImplementedError

    def send_many(self, messages) -> None:
        for m in messages:
            self.send(m)

    def recv_many(self, max_messages: int) -> list:
        return [self.recv()]

    def ready(self) -> None:
        """Called once every endpoint of the run exists (connect, warm caches)."""

    def close(self) -> None:
        pass


class PolledEndpoint(Endpoint):
    """A receiving end that derives the three wait policies from two
    primitives: ``try_recv()`` (a message or None when there is none) and
    ``recv_blocking()``."""

    def __init__(self, policy: str):
        self.policy = policy
        if policy == "block":
            self.recv = self.recv_blocking
        elif policy == "spin":
            self.recv = self._recv_spin
        else:
            self.recv = self._recv_adaptive

    def try_recv(self):
        raise NotImplementedError

    def recv_blocking(self):
        raise NotImplementedError

    def _recv_spin(self):
        try_recv = self.try_recv
        while True:
            m = try_recv()
            if m is not None:
                return m

    def _recv_adaptive(self):
        try_recv = self.try_recv
        m = try_recv()
        if m is not None:
            return m
        deadline = _now() + ADAPTIVE_SPIN_S
        while _now() < deadline:
            m = try_recv()
            if m is not None:
                return m
        return self.recv_blocking()


class Transport:
    """Base class of the adapters (see the module docstring)."""

    name = "?"
    policies: tuple = ("block",)
    default_policy = "block"
    mpmc = False
    batch = False
    requires: str | None = None
    note = ""

    def __init__(self, max_msg: int, policy: str, depth: int = 64):
        pass

    def sender(self) -> Endpoint:
        raise NotImplementedError

    def receiver(self) -> Endpoint:
        raise NotImplementedError

    def close(self) -> None:
        pass

    @classmethod
    def check(cls) -> None:
        """Raise Unavailable(reason) if this transport cannot run here."""
        if cls.requires:
            try:
                importlib.import_module(cls.requires)
            except Exception as e:  # ImportError, or a broken install
                raise Unavailable(f"{cls.requires} is not importable ({type(e).__name__}: {e}); "
                                  f"pip install {_PIP_NAMES.get(cls.requires, cls.requires)}") from None


_PIP_NAMES = {"zmq": "pyzmq", "faster_fifo": "faster-fifo", "iceoryx2": "iceoryx2"}

_REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: make an adapter available under ``cls.name``."""
    if not cls.policies or set(cls.policies) - set(POLICIES + (DEFAULT,)):
        raise ValueError(f"{cls.__name__}.policies must be a subset of {POLICIES + (DEFAULT,)}")
    _REGISTRY[cls.name] = cls
    return cls


def resolve_policy(cls, policy: str) -> str:
    """`policy`, or for "default" the transport's own default_policy (if it
    supports it, else its first policy)."""
    if policy != DEFAULT or DEFAULT in cls.policies:
        return policy
    return cls.default_policy if cls.default_policy in cls.policies else cls.policies[0]


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; known: {', '.join(_REGISTRY)}") from None


def all_transports() -> list[type]:
    return list(_REGISTRY.values())


def check_available(cls) -> str | None:
    """None if the transport can run here, else the reason it is skipped."""
    try:
        cls.check()
    except Unavailable as e:
        return str(e)
    return None


def load_plugin(spec: str) -> None:
    """Import a module (dotted name or a .py path) that registers adapters."""
    if spec.endswith(".py") or os.sep in spec:
        import importlib.util
        path = os.path.abspath(spec)
        mod_name = "vringipc_bench_plugin_" + os.path.splitext(os.path.basename(path))[0]
        s = importlib.util.spec_from_file_location(mod_name, path)
        if s is None or s.loader is None:
            raise ImportError(f"cannot load plugin {spec}")
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    else:
        importlib.import_module(spec)


def _spin_s(policy: str) -> float:
    return {"spin": BUSY_SPIN_S, "block": 0.0, "adaptive": ADAPTIVE_SPIN_S}[policy]


def _spin_kw(policy: str) -> dict:
    """vringipc's spin argument for a policy; none for "default" (the
    library's own default wait, whatever it is)."""
    return {} if policy == DEFAULT else {"spin": _spin_s(policy)}


def _arena(max_msg: int, depth: int) -> int:
    """Bytes of shared buffer for `depth` messages of max_msg (at least two
    whole messages, at least 1 MiB, at most 256 MiB unless one message needs more)."""
    want = min(max(max_msg * depth, 1 << 20), 256 << 20)
    return max(want, 2 * max_msg + 4096)


# =============================================================================
# vringipc
# =============================================================================

@register
class VringChannel(Transport):
    """vringipc.Channel: SPSC, bytes, one copy in and one copy out."""

    name = "vringipc.Channel"
    policies = POLICIES + (DEFAULT,)     # "default": Channel() as constructed by users
    default_policy = DEFAULT
    batch = True
    note = "SPSC; send/recv copy once each way"

    def __init__(self, max_msg, policy, depth=64):
        from vringipc import Channel
        self.ch = Channel(capacity=_arena(max_msg + 64, depth), num=256, **_spin_kw(policy))

    def sender(self):
        ch = self.ch
        ch.loan(8).cancel()                 # claim the producer role now, so that
        return Endpoint(send=ch.send, send_many=ch.send_many,  # ch.send is the Cython method
                        close=ch.close)

    def receiver(self):
        ch = self.ch
        ch.poll(0)                          # claim the consumer role
        return Endpoint(recv=ch.recv, recv_many=ch.recv_many, close=ch.close)

    def close(self):
        self.ch.close()


@register
class VringQueue(Transport):
    """vringipc.Queue: MPMC, pickles the bytes object like multiprocessing."""

    name = "vringipc.Queue"
    policies = POLICIES + (DEFAULT,)     # "default": Queue() as constructed by users
    default_policy = DEFAULT
    mpmc = True
    note = "MPMC, pickle protocol 5"

    def __init__(self, max_msg, policy, depth=64):
        from vringipc import Queue
        self.q = Queue(capacity=_arena(max_msg + 256, depth), **_spin_kw(policy))

    def sender(self):
        return Endpoint(send=self.q.put, close=self.q.close)

    def receiver(self):
        return Endpoint(recv=self.q.get, close=self.q.close)

    def close(self):
        self.q.close()


# =============================================================================
# the standard library
# =============================================================================

class _MpQueueRecv(PolledEndpoint):
    def __init__(self, q, policy):
        self.q = q
        self.get_nowait = q.get_nowait
        self.recv_blocking = q.get
        super().__init__(policy)

    def try_recv(self):
        try:
            return self.get_nowait()
        except _queue.Empty:
            return None

    def close(self):
        self.q.close()


def _mp_close_sender(q):
    def close():
        q.close()
        q.join_thread()          # flush the feeder thread before the process exits
    return close


@register
class MpQueue(Transport):
    """multiprocessing.Queue (fork context): pickles, feeder thread, pipe."""

    name = "mp.Queue"
    policies = POLICIES
    mpmc = True
    note = "pickle + feeder thread + pipe; spin = get_nowait() loop"

    def __init__(self, max_msg, policy, depth=64):
        import multiprocessing as mp
        self.policy = policy
        # bounded, so a fast producer cannot pile up gigabytes in its feeder buffer
        self.q = mp.get_context("fork").Queue(maxsize=max(4, min(1024, (64 << 20) // max_msg)))

    def sender(self):
        return Endpoint(send=self.q.put, close=_mp_close_sender(self.q))

    def receiver(self):
        return _MpQueueRecv(self.q, self.policy)

    def close(self):
        self.q.close()
        self.q.join_thread()


@register
class MpSimpleQueue(Transport):
    """multiprocessing.SimpleQueue: pickles, a pipe and a lock per side."""

    name = "mp.SimpleQueue"
    mpmc = True
    note = "pickle + pipe + locks; no non-blocking get"

    def __init__(self, max_msg, policy, depth=64):
        import multiprocessing as mp
        self.q = mp.get_context("fork").SimpleQueue()

    def sender(self):
        return Endpoint(send=self.q.put, close=self.q.close)

    def receiver(self):
        return Endpoint(recv=self.q.get, close=self.q.close)

    def close(self):
        self.q.close()


class _ConnRecv(PolledEndpoint):
    def __init__(self, conn, policy):
        self.conn = conn
        self.recv_blocking = conn.recv_bytes
        self.poll = conn.poll
        super().__init__(policy)

    def try_recv(self):
        return self.recv_blocking() if self.poll() else None

    def close(self):
        self.conn.close()


@register
class MpPipe(Transport):
    """multiprocessing.Pipe(duplex=False) with send_bytes / recv_bytes."""

    name = "mp.Pipe"
    policies = POLICIES
    note = "send_bytes/recv_bytes (no pickle); spin = poll() loop"

    def __init__(self, max_msg, policy, depth=64):
        import multiprocessing as mp
        self.policy = policy
        self.r, self.w = mp.get_context("fork").Pipe(duplex=False)

    def sender(self):
        self.r.close()
        return Endpoint(send=self.w.send_bytes, close=self.w.close)

    def receiver(self):
        self.w.close()
        return _ConnRecv(self.r, self.policy)

    def close(self):
        self.r.close()
        self.w.close()


# --- byte streams with a length prefix (os.pipe, Unix socket) ----------------------

_LEN = struct.Struct("<Q")


class _StreamRecv(PolledEndpoint):
    """Reads length-prefixed messages from a byte stream into a fresh
    bytearray (one copy), with the three wait policies."""

    def __init__(self, read_into, fd, policy, close):
        # read_into(mv, nonblocking) -> bytes read (0 = EOF), BlockingIOError if none
        self.read_into = read_into
        self.fd = fd
        self.hdr = bytearray(8)
        self.close = close
        super().__init__(policy)

    def _fill(self, mv, nonblocking, first):
        got = 0
        n = len(mv)
        read_into = self.read_into
        while got < n:
            try:
                k = read_into(mv[got:], nonblocking)
            except BlockingIOError:
                if first and got == 0:
                    return None          # nothing there yet
                if self.policy == "adaptive":
                    select.select([self.fd], [], [])
                continue
            if k == 0:
                raise EOFError("stream closed")
            got += k
        return got

    def _read_msg(self, nonblocking):
        if self._fill(memoryview(self.hdr), nonblocking, True) is None:
            return None
        (n,) = _LEN.unpack(self.hdr)
        buf = bytearray(n)
        self._fill(memoryview(buf), nonblocking, False)
        return buf

    def try_recv(self):
        return self._read_msg(True)

    def recv_blocking(self):
        if self.policy != "block":
            select.select([self.fd], [], [])
            m = self._read_msg(True)
            if m is not None:
                return m
            return self.recv_blocking()
        return self._read_msg(False)


def _fd_reader(fd):
    readv = os.readv

    def read_into(mv, nonblocking):
        return readv(fd, [mv])
    return read_into


def _fd_writer(fd):
    writev = os.writev
    pack = _LEN.pack

    def send(data):
        n = len(data)
        done = writev(fd, [pack(n), data])
        if done < n + 8:                 # partial write: finish it
            mv = memoryview(pack(n) + bytes(data))[done:] if done < 8 else memoryview(data)[done - 8:]
            while mv:
                mv = mv[os.write(fd, mv):]
    return send


@register
class OsPipe(Transport):
    """os.pipe with an 8-byte length prefix per message."""

    name = "os.pipe"
    policies = POLICIES
    note = "raw pipe, length-prefixed; spin = O_NONBLOCK read loop"

    def __init__(self, max_msg, policy, depth=64):
        self.policy = policy
        self.r, self.w = os.pipe()

    def sender(self):
        os.close(self.r)
        return Endpoint(send=_fd_writer(self.w), close=lambda: os.close(self.w))

    def receiver(self):
        os.close(self.w)
        if self.policy != "block":
            os.set_blocking(self.r, False)
        return _StreamRecv(_fd_reader(self.r), self.r, self.policy, lambda: os.close(self.r))

    def close(self):
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


@register
class UnixSocket(Transport):
    """socket.socketpair(AF_UNIX, SOCK_STREAM), one direction, length-prefixed."""

    name = "unix.socket"
    policies = POLICIES
    note = "socketpair SOCK_STREAM, length-prefixed; spin = MSG_DONTWAIT loop"

    def __init__(self, max_msg, policy, depth=64):
        self.policy = policy
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def sender(self):
        self.b.close()
        s = self.a
        pack = _LEN.pack
        sendmsg = s.sendmsg

        def send(data):
            n = len(data)
            done = sendmsg([pack(n), data])
            if done < n + 8:
                s.sendall((pack(n) + bytes(data))[done:])
        return Endpoint(send=send, close=s.close)

    def receiver(self):
        self.a.close()
        s = self.b
        recv_into = s.recv_into
        dontwait = socket.MSG_DONTWAIT

        def read_into(mv, nonblocking):
            return recv_into(mv, 0, dontwait if nonblocking else 0)
        return _StreamRecv(read_into, s.fileno(), self.policy, s.close)

    def close(self):
        self.a.close()
        self.b.close()


# =============================================================================
# optional peers
# =============================================================================

class _FasterFifoRecv(PolledEndpoint):
    def __init__(self, q, policy):
        self.q = q
        self.get_nowait = q.get_nowait
        super().__init__(policy)

    def try_recv(self):
        try:
            return self.get_nowait()
        except _queue.Empty:
            return None

    def recv_blocking(self):
        return self.q.get(True, 3600.0)

    def recv_many(self, max_messages):
        return self.q.get_many(True, 3600.0, max_messages)

    def close(self):
        pass


@register
class FasterFifo(Transport):
    """faster_fifo.Queue: MPMC circular buffer in shared memory, pickles."""

    name = "faster-fifo"
    policies = POLICIES
    mpmc = True
    batch = True
    requires = "faster_fifo"
    note = "MPMC, pickle; put_many/get_many for batch"

    def __init__(self, max_msg, policy, depth=64):
        import faster_fifo
        self.policy = policy
        self.max_msg = max_msg
        self.q = faster_fifo.Queue(max_size_bytes=_arena(max_msg + 256, depth))

    def sender(self):
        q = self.q

        def send(data):
            q.put(data, True, 3600.0)

        def send_many(msgs):
            q.put_many(msgs, True, 3600.0)
        return Endpoint(send=send, send_many=send_many, close=lambda: None)

    def receiver(self):
        # its receive buffer grows on demand; start it large enough
        self.q.reallocate_msg_buffer(max(self.max_msg + 4096, 5000))
        return _FasterFifoRecv(self.q, self.policy)

    def close(self):
        self.q.close()


class _ZmqRecv(PolledEndpoint):
    def __init__(self, sock, ctx, policy):
        import zmq
        self.sock, self.ctx = sock, ctx
        self._recv = sock.recv
        self._noblock = zmq.NOBLOCK
        self._again = zmq.Again
        self.recv_blocking = sock.recv
        super().__init__(policy)

    def try_recv(self):
        try:
            return self._recv(self._noblock)
        except self._again:
            return None

    def close(self):
        self.sock.close(0)
        self.ctx.term()


@register
class PyZmq(Transport):
    """pyzmq PUSH -> PULL over ipc:// (a Unix socket), one context per process."""

    name = "pyzmq"
    policies = POLICIES
    requires = "zmq"
    note = "PUSH/PULL over ipc://; spin = recv(NOBLOCK) loop"

    def __init__(self, max_msg, policy, depth=64):
        self.policy = policy
        self.dir = tempfile.mkdtemp(prefix="vrbench-zmq-")
        self.addr = f"ipc://{self.dir}/s"

    def sender(self):
        import zmq
        ctx = zmq.Context()
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 10000)       # deliver what is queued before closing
        s.connect(self.addr)

        def close():
            s.close()
            ctx.term()
        return Endpoint(send=s.send, close=close)

    def receiver(self):
        import zmq
        ctx = zmq.Context()
        s = ctx.socket(zmq.PULL)
        s.bind(self.addr)
        return _ZmqRecv(s, ctx, self.policy)

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


class _IoxEnd(Endpoint):
    """A node, a service and a publisher or subscriber of iceoryx2, in this process."""

    def __init__(self, service_name, max_msg, role):
        import iceoryx2 as iox2
        self.iox2 = iox2
        try:
            iox2.set_log_level(iox2.LogLevel.Error)
        except Exception:
            pass
        self.node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        self.service = (self.node.service_builder(iox2.ServiceName.new(service_name))
                        .publish_subscribe(iox2.Slice[ctypes.c_uint8])
                        .enable_safe_overflow(False)        # lossless: the publisher waits
                        .subscriber_max_buffer_size(16)
                        .history_size(0)
                        .open_or_create())
        self.pub = self.sub = None
        if role == "send":
            self.pub = (self.service.publisher_builder().initial_max_slice_len(max_msg)
                        .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
                        .create())
            loan = self.pub.loan_slice_uninit
            memmove = ctypes.memmove

            def send(data):
                n = len(data)
                s = loan(n)
                memmove(s.payload().as_ptr(), data, n)
                if s.assume_init().send() == 0:
                    raise RuntimeError("iceoryx2 delivered a sample to no subscriber")
            self.send = send
        else:
            self.sub = self.service.subscriber_builder().create()
            receive = self.sub.receive
            string_at = ctypes.string_at

            def recv():
                while True:
                    s = receive()
                    if s is not None:
                        p = s.payload()
                        b = string_at(p.as_ptr(), p.len())
                        s.delete()
                        return b
            self.recv = recv

    def ready(self):
        if self.pub is not None:
            for _ in range(1000):
                self.pub.update_connections()
                n = self.service.dynamic_config.number_of_subscribers
                if (n() if callable(n) else n) >= 1:
                    break
                time.sleep(0.001)

    def close(self):
        for obj in (self.pub, self.sub, self.service, self.node):
            if obj is not None:
                try:
                    obj.delete()
                except Exception:
                    pass
        self.pub = self.sub = self.service = self.node = None


@register
class Iceoryx2(Transport):
    """iceoryx2 publish-subscribe (ipc service), Slice[c_uint8] payloads:
    loan + memmove + send; receive + copy out + release."""

    name = "iceoryx2"
    policies = ("spin",)
    default_policy = "spin"
    requires = "iceoryx2"
    note = "zero-copy pub/sub, polled (receive() loop): spin only"

    def __init__(self, max_msg, policy, depth=64):
        self.service = f"vrbench/{os.getpid()}/{secrets.token_hex(6)}"
        self.max_msg = max_msg

    def sender(self):
        return _IoxEnd(self.service, self.max_msg, "send")

    def receiver(self):
        return _IoxEnd(self.service, self.max_msg, "recv")
