"""Drop-in replacements for multiprocessing.Queue, SimpleQueue and JoinableQueue.

Same signatures, defaults and exceptions as the stdlib classes
(``put/get(block=True, timeout=None)``, ``queue.Full``/``queue.Empty``,
``ValueError`` after ``close()``, ``task_done``/``join``), usable as
multiprocessing.Process arguments under fork, spawn and forkserver, with any
number of producer and consumer processes.  Differences, all deliberate:

* There is no feeder thread: ``put()`` writes the pickled object straight into
  shared memory before returning, so a process can always exit and
  ``join_thread()``/``cancel_join_thread()`` are no-ops.
* ``maxsize=0`` means unbounded, as in the stdlib: ``put()`` never blocks and
  never raises Full, and the items wait in shared memory, not in a feeder
  thread, so a producer may exit right after put() and everything it put is
  still delivered.  The ring does not bound the item count: once its `num`
  entries are in use, producers pack further messages into one descriptor (a
  batch, see _queue.pxi).  What bounds it is `capacity`, the arena's bytes:
  address space (default 16 GiB) committed only as data arrives; running out
  of it, or of memory, raises MemoryError.  One narrow exception: the
  allocator keeps a steady stream in the arena's first megabytes by wrapping
  early (see _queue.pxi); if the consumers then stall while the producers add
  more than the low region holds, a put waits for them (put_nowait raises
  Full) although most of the arena is free.  A positive maxsize keeps its
  exact stdlib meaning.  An object whose pickle can never fit raises
  MessageTooLarge (a ValueError) at once.
* ``qsize()`` works everywhere (it reads two counters in the segment) and is
  approximate, like the stdlib's.
* A call blocked without a timeout raises PeerDead once every other process
  that used the queue has died and no other thread of this process has used
  it, instead of hanging (with a timeout it ends with Empty/Full at the
  deadline, as the stdlib's does).  ``JoinableQueue.join(timeout=None)``
  takes a timeout and raises PeerDead the same way.
* ``close()`` wakes every call blocked in another thread of this process
  (it raises ValueError, like any call on a closed queue); the eventfds are
  closed when the last of them has returned.  ``qsize()`` and ``full()`` keep
  answering after close, as the stdlib's do.

Lifecycle and threads: several threads of one process may use one queue;
per-call state lives in C locals and return values, never on shared
objects.  Zero-copy results (``get_nocopy``) pin their bytes for the process
that took them: a forked child that inherits and drops one releases nothing.

Raw messages: ``get_message()``/``put_message()`` move a message as it lies
in shared memory -- its kind, main bytes and out-of-band buffers -- without
serializing, for bridges and relays that must never unpickle.

MPMC on a split ring: a split ring has one driver and one device.  Here each
side (all producers, all consumers) shares its ring state in the segment and
takes a short cross-process lock that holds only a memcpy, never Python code.
Pickling happens before the producer lock, unpickling after the consumer
lock.  Each side commits with a single atomic store, so a process SIGKILLed
inside the lock leaves a consistent queue; the next process takes the lock
over from the dead owner.  Cost: two uncontended atomic operations per call;
under contention, producers (or consumers) serialize on the copy.

Serialization: pickle protocol 5 with out-of-band buffers.  A NumPy array (or
any PickleBuffer-aware object) is copied once, from its own memory into the
arena.  ``get()`` copies the message out once and returns ordinary objects
(writable arrays over that private copy).  ``get_nocopy()`` returns objects
whose out-of-band buffers are read-only views of shared memory, pinned until
they are garbage-collected.  Unpickling runs code: a queue is for processes
that trust each other (use Channel's bytes API across a trust boundary).
"""

from __future__ import annotations

import os
import pickle
import threading

from multiprocessing import context as _mp_context
from multiprocessing import reduction as _mp_reduction

from vringipc import layout as L
from vringipc import peers
from vringipc._ring import KINDS, QueueCore, _mp_dumps, queue_window_overhead
from vringipc.errors import Empty, Full, PeerDead  # noqa: F401  (re-exported names)
from vringipc.ring import SharedRing, make_eventfd

__all__ = ["Queue", "SimpleQueue", "JoinableQueue", "Full", "Empty"]

# The arena is address space, not memory: only the chunks that hold data are
# committed (see "Sizing" in the README and _queue.pxi).  16 GiB lets an
# unbounded queue take what a program puts before its workers start (a
# million small items, ten 100 MiB arrays) while a thousand queues still fit
# in a 47-bit address space with room to spare.
DEFAULT_CAPACITY = 16 << 30
# Ring entries: messages each in a descriptor of their own before the
# producers start packing them into batches (maxsize=0), or the item limit
# rounded up (maxsize > 0).  1024 keeps the committed rings of an idle queue
# near 40 KiB.
DEFAULT_NUM = 1024


# Process table in the header's application area: who has used the queue.
PEERS_OFF = 0x600
PEER_ENTRY = 16                        # u32 pid, u32 flags, u64 start time
MAX_PEERS = (L.HDR_SIZE - PEERS_OFF) // PEER_ENTRY


# message kinds (header word 1), as get_message()/put_message() see them
MSG_PICKLE, MSG_CUSTOM, MSG_RAW_BYTES = KINDS["pickle"], KINDS["custom"], KINDS["raw_bytes"]
_pid = [os.getpid()]          # this process's pid without a syscall per call


def _reset_pid() -> None:
    _pid[0] = os.getpid()


os.register_at_fork(after_in_child=_reset_pid)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Queue:
    """A process-shared FIFO queue with the API of multiprocessing.Queue.

    ``Queue(maxsize=0, *, ctx=None, capacity=16 GiB, num=None, backend="memfd",
    dumps=None, loads=None)``: `capacity` is the arena size in bytes (the
    largest message and the most bytes in flight; address space, committed
    only as data arrives), `num` the ring size
    (messages in flight; default 4096, or the power of two above maxsize),
    `backend` "memfd" (nothing in /dev/shm, reaches children) or "shm" (named,
    attachable), `dumps`/`loads` a custom serializer (bytes-like in, object out)."""

    _core: QueueCore | None = None
    _ring: SharedRing | None = None
    _closed = False
    _joinable = False

    def __init__(self, maxsize: int = 0, *, ctx=None, capacity: int = DEFAULT_CAPACITY,
                 num: int | None = None, backend: str = "memfd", name: str | None = None,
                 mode: int = 0o600, dumps=None, loads=None, spin: float = 50e-6,
                 _state=None):
        if _state is not None:
            self._setup(*_state)
            return
        if maxsize < 0:
            maxsize = 0
        if num is None:
            num = DEFAULT_NUM if maxsize <= 0 else min(32768, max(2, _next_pow2(maxsize + 1)))
        side = queue_window_overhead(num, capacity)
        ring = SharedRing.create(num=num, arena_size=capacity + side, indirect=False, reserve=side,
                                 event_idx=False, max_msg=min(capacity, 0xFFFFFFFF),
                                 backend=backend, name=name, mode=mode, app_kind=L.APP_QUEUE)
        try:
            join_fd = make_eventfd()
        except BaseException:
            ring.close()
            ring.unlink()
            raise
        self._setup(ring, join_fd, maxsize, dumps, loads, spin, True)

    def _setup(self, ring, join_fd, maxsize, dumps, loads, spin, init=False):
        self._ring = ring
        self._join_fd = join_fd
        self._maxsize = maxsize
        self._dumps = dumps
        self._loads = loads
        self._spin = spin
        r = ring.layout.rings[0]
        self._core = QueueCore(ring.segment.buf, *r.ring_args(), max_msg=ring.layout.max_msg,
                               init=init, maxsize=maxsize, kick_fd=ring.kick_fds[0],
                               call_fd=ring.call_fds[0], join_fd=join_fd,
                               spin_ns=int(spin * 1e9))
        self._core.check = self._check_peers
        self._core.first_use = self._register
        self._registered_pid = 0
        self._threads: set = set()         # idents of this process's threads that used it
        self._closed = False
        if init:
            self._register()               # the creator counts as a user (it may put)
        # Hot path: q.put / q.get are the Cython methods themselves (they
        # pickle, register this process once, and check closed).  A
        # JoinableQueue's put also counts the task, so only its get is bound.
        if loads is None:
            self.get = self._core.get
        if dumps is None and not self._joinable:
            self.put = self._core.put

    # --- peers ---------------------------------------------------------------------
    def _register(self) -> None:
        """Record this process in the queue's process table (once per process)
        and the calling thread among this process's users."""
        me, start = peers.Identity.me()
        if self._registered_pid != me:
            self._threads = set()          # a forked child has only its own threads
        self._threads.add(threading.get_ident())
        if self._registered_pid == me:
            return
        words = self._ring.words
        # A free slot first: the entries of dead processes are what lets a
        # blocked call see that everyone else is gone, so they are reused only
        # when the table is full.
        for reuse_dead in (False, True):
            for i in range(MAX_PEERS):
                off = PEERS_OFF + i * PEER_ENTRY
                pid = words.load32(off)
                if pid == me:
                    self._registered_pid = me
                    return
                if pid == 0 or (reuse_dead and not peers.alive(pid, words.load64(off + 8))):
                    if words.cas32(off, pid, me):
                        words.store64(off + 8, start)
                        self._registered_pid = me
                        return
        self._registered_pid = me          # table full of live processes: not tracked

    def _check_peers(self) -> None:
        """Called every 100 ms while blocked: raise PeerDead if every other
        process that has used this queue is gone and no other live thread of
        this process has used it (nobody could wake us)."""
        me = os.getpid()
        current = threading.get_ident()
        live = {t.ident for t in threading.enumerate()}
        if any(t != current and t in live for t in self._threads):
            return
        words = self._ring.words
        others = 0
        for i in range(MAX_PEERS):
            off = PEERS_OFF + i * PEER_ENTRY
            pid = words.load32(off)
            if pid == 0 or pid == me:
                continue
            if peers.alive(pid, words.load64(off + 8)):
                return
            others += 1
        if others:
            raise PeerDead("every other process using this queue has exited")

    # --- the multiprocessing.Queue API ----------------------------------------------
    def _check_closed(self) -> None:
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    def _decode(self, kind: int, main, bufs):
        """Object from a message (kind, main bytes, out-of-band buffers)."""
        if kind == MSG_RAW_BYTES:
            return main if type(main) is bytes else bytes(main)
        if self._loads is not None:
            # A queue with its own serializer never unpickles, whatever the
            # message claims to be (the kind is written by the producer).
            return self._loads(main)
        if kind != MSG_PICKLE:
            raise pickle.UnpicklingError(f"queue message of kind {kind}: this queue has no "
                                         "custom loads")
        return pickle.loads(main, buffers=bufs) if bufs else pickle.loads(main)

    def put(self, obj, block: bool = True, timeout: float | None = None) -> None:
        """Put obj into the queue (see multiprocessing.Queue.put)."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if self._registered_pid != _pid[0]:
            self._register()
        # Serialize before taking any lock (as the stdlib does).
        if self._dumps is not None:
            main, bufs, kind = self._dumps(obj), None, MSG_CUSTOM
        elif type(obj) is bytes:
            main, bufs, kind = obj, None, MSG_RAW_BYTES
        else:
            bufs: list = []
            main = _mp_dumps(obj, bufs.append)
            if bufs:
                bufs = [b.raw() for b in bufs]
            kind = MSG_PICKLE
        self._put_message(kind, main, bufs, block, timeout)

    def _put_message(self, kind, main, bufs, block, timeout) -> None:
        if not self._joinable:
            self._core.put_msg(kind, main, bufs, block, timeout)
            return
        self._core.task_add(1)
        try:
            self._core.put_msg(kind, main, bufs, block, timeout)
        except BaseException:
            self._core.task_add(-1)
            raise

    def get(self, block: bool = True, timeout: float | None = None):
        """Remove and return an item (see multiprocessing.Queue.get)."""
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if self._registered_pid != _pid[0]:
            self._register()
        kind, main, bufs = self._core.get_msg(block, timeout)
        return self._decode(kind, main, bufs)     # unserialize after releasing the lock

    def get_nocopy(self, block: bool = True, timeout: float | None = None):
        """Like get(), but out-of-band buffers (NumPy arrays, PickleBuffers) are
        read-only views of shared memory: no copy.  The message's bytes stay
        reserved until every object built on them is garbage-collected, so
        holding many makes producers block."""
        self._check_closed()
        if self._registered_pid != os.getpid():
            self._register()
        kind, main, bufs = self._core.get_msg(block, timeout, True)
        return self._decode(kind, main, bufs)

    def get_message(self, block: bool = True, timeout: float | None = None):
        """Take one message as it lies in shared memory, without
        unserializing it: ``(kind, main, buffers)`` with kind MSG_PICKLE,
        MSG_CUSTOM or MSG_RAW_BYTES, main a bytes-like object and buffers a
        list of bytes-like objects (out-of-band pickle buffers).  For bridges
        and relays: nothing from the queue is ever run.  Empty as get()."""
        self._check_closed()
        if self._registered_pid != _pid[0]:
            self._register()
        return self._core.get_msg(block, timeout)

    def put_message(self, kind: int, main, buffers=(), block: bool = True,
                    timeout: float | None = None) -> None:
        """Put a message taken with get_message() (here or in another queue)
        as it is.  Full and timeouts as put(); a JoinableQueue counts it."""
        self._check_closed()
        if self._registered_pid != _pid[0]:
            self._register()
        self._put_message(kind, main, list(buffers) if buffers else None, block, timeout)

    def put_nowait(self, obj) -> None:
        return self.put(obj, False)

    def get_nowait(self):
        return self.get(False)

    def qsize(self) -> int:
        """Approximate number of items in the queue (from the ring indices;
        keeps answering after close(), as the stdlib's does)."""
        return self._core.qsize()

    def empty(self) -> bool:
        return self._core.qsize() == 0

    def full(self) -> bool:
        return bool(self._maxsize) and self._core.qsize() >= self._maxsize

    def close(self) -> None:
        """This process will use the queue no more (get/put raise ValueError).
        Nothing to flush: every put is already in shared memory."""
        if self._closed:
            return
        self._closed = True
        self.__dict__.pop("put", None)
        self.__dict__.pop("get", None)
        # Calls blocked in other threads wake up and raise ValueError; the
        # eventfds they poll are closed only after the last one has returned.
        # The mapping stays (qsize() keeps answering) until this object goes.
        self._core.close(self._release_fds)

    def _release_fds(self) -> None:
        ring = self._ring
        if ring.segment is not None and ring.segment.owner:
            ring.unlink()
        if ring._owns_fds:
            for fd in ring.kick_fds + ring.call_fds:
                if fd >= 0:
                    os.close(fd)
        ring.kick_fds = [-1] * len(ring.kick_fds)
        ring.call_fds = [-1] * len(ring.call_fds)
        if self._join_fd >= 0:
            os.close(self._join_fd)
            self._join_fd = -1

    def join_thread(self) -> None:
        """No feeder thread to join: only checks, as the stdlib does, that the
        queue was closed first."""
        assert self._closed, f"Queue {self!r} not closed"

    def cancel_join_thread(self) -> None:
        """No feeder thread: nothing to cancel, a process can always exit."""

    # --- extras ---------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Largest message in bytes (after pickling)."""
        return self._core.max_message

    def fileno(self) -> int:
        """An eventfd that becomes readable when an item is put while a
        consumer is asleep in get(); use with the asyncio helpers."""
        return self._ring.kick_fds[0]

    def __getstate__(self):
        _mp_context.assert_spawning(self)
        return (self._ring, _mp_reduction.DupFd(self._join_fd), self._maxsize, self._dumps,
                self._loads, self._spin, self._joinable)

    def __setstate__(self, state):
        ring, join_fd, maxsize, dumps, loads, spin, joinable = state
        self._joinable = joinable
        self._setup(ring, join_fd.detach(), maxsize, dumps, loads, spin)
        self._register()                   # a child that received it counts as a user

    def __del__(self):
        try:
            self.close()
            if self._ring is not None:
                # unmap once no call is in flight and no zero-copy result is alive
                self._core.close(self._ring.close)
        except Exception:
            pass

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"<vringipc.{kind} maxsize={self._maxsize}{' closed' if self._closed else ''}>"


class JoinableQueue(Queue):
    """multiprocessing.JoinableQueue: Queue plus task_done() and join()."""

    _joinable = True

    def task_done(self) -> None:
        """Indicate that a formerly enqueued task is complete.  ValueError if
        called more times than there were items."""
        self._check_closed()
        self._core.task_done()

    def join(self, timeout: float | None = None) -> bool:
        """Block until every item put has been matched by a task_done().
        With a timeout, returns False if that did not happen in time (the
        stdlib's join() takes none; a call without one behaves as there).
        Without a timeout, raises PeerDead when tasks are unfinished and no
        one is left who could finish them (every other process that used the
        queue has died, and no other thread of this one used it)."""
        self._check_closed()
        if self._registered_pid != _pid[0]:
            self._register()
        return self._core.join(timeout)


class SimpleQueue:
    """multiprocessing.SimpleQueue: put, get, empty and close."""

    def __init__(self, *, ctx=None, **kw):
        self._q = Queue(0, **kw)

    def _check(self) -> None:
        # multiprocessing.SimpleQueue fails on its closed pipe: OSError
        if self._q._closed:
            raise OSError("handle is closed")

    def put(self, obj) -> None:
        self._check()
        self._q.put(obj)

    def get(self):
        self._check()
        return self._q.get()

    def empty(self) -> bool:
        self._check()
        return self._q.empty()

    def close(self) -> None:
        self._q.close()

    def __getstate__(self):
        _mp_context.assert_spawning(self)
        return self._q.__getstate__()

    def __setstate__(self, state):
        self._q = Queue.__new__(Queue)
        self._q.__setstate__(state)

    def __repr__(self) -> str:
        return "<vringipc.SimpleQueue>"
