"""Channel: one producer, one consumer, raw bytes, zero-copy both ways.

::

    ch = vringipc.Channel(capacity=64 << 20)        # up to 64 MiB in flight (committed as used)
    # producer process
    ch.send(b"bytes")                               # one copy, into shared memory
    with ch.loan(frame.nbytes) as buf:              # no copy: write in place
        np.copyto(np.frombuffer(buf, frame.dtype).reshape(frame.shape), frame)
    # consumer process
    data = ch.recv()                                # bytes (a copy, safe to keep)
    with ch.recv_view() as msg:                     # MessageView into shared memory
        arr = np.frombuffer(msg, np.uint8)          # read-only, no copy

The first process to call a send method becomes the producer, the first to
call a receive method the consumer; a second live producer (or consumer) is
refused.  Each message is one contiguous allocation in the arena and one
virtio descriptor.  Blocking calls take ``timeout`` (seconds, None = forever),
spin briefly and then sleep on an eventfd; when the peer process dies they
raise PeerDead instead of waiting forever, and after the producer's clean
``close()`` the consumer gets ChannelClosed (an EOFError) once it has read
everything.

Memory follows the data: `capacity` is address space.  Creating a channel
commits only its header, rings and consumer state (a few pages); the producer
commits the arena in 1 MiB chunks as messages occupy it (an out-of-memory
machine, cgroup or /dev/shm then raises MemoryError in the sending call,
never SIGBUS) and gives back all but the first few MiB whenever nothing is in
flight over them.  A message pins only its own bytes: a kept MessageView (or
a pending loan) does not stop later traffic from reusing the space around it.
If kept views take so much room that a blocked send can never proceed (the
consumer has read everything else and waits for more, and nothing has been
released for a second), the send raises MemoryError naming the held views and
bytes instead of hanging; a send that times out says so in its Full.

A Channel reaches other processes by fork (inherited), as a
multiprocessing.Process argument under spawn/forkserver (pickled with its fds),
or, with ``backend="shm"``, by name from an unrelated process (see
vringipc.handoff for passing the eventfds over a Unix socket).
"""

from __future__ import annotations

import os
import time
import weakref

from vringipc import layout as L
from vringipc import peers
from vringipc._ring import ChannelReceiver, ChannelSender, _commit_range
from vringipc.errors import ChannelClosed, Full, PeerDead, VringError
from vringipc.ring import SharedRing

__all__ = ["Channel"]

# Capacity is address space, committed only as data arrives (see the module
# docstring), so the default can be generous: 1 GiB lets large frames and
# bursts through without tuning, at the cost of idle address space only; it
# stays well below the 4 GiB limit of a descriptor's length.
DEFAULT_CAPACITY = 1 << 30
DEFAULT_NUM = 256

_live_channels: "weakref.WeakSet[Channel]" = weakref.WeakSet()


def _state_bytes(num: int) -> int:
    """Size of the consumer state area at the end of the arena window: a
    64-byte header (fetch record, completion journal) and one byte per head."""
    return L.align_up(64 + num, 64)


def _after_fork_in_child() -> None:
    for ch in list(_live_channels):
        ch._forget_roles()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Channel:
    """A one-way, single-producer single-consumer message channel over a split
    ring in shared memory.  See the module docstring."""

    _ring: SharedRing | None = None
    _BOUND = ("send", "send_many", "recv", "recv_view", "recv_many", "recv_into")
    _tx: ChannelSender | None = None
    _rx: ChannelReceiver | None = None
    _closed = False
    _needs_quiesce = False

    def __init__(self, capacity: int = DEFAULT_CAPACITY, *, num: int = DEFAULT_NUM,
                 backend: str = "memfd", name: str | None = None, mode: int = 0o600,
                 spin: float = 50e-6, _ring: SharedRing | None = None):
        """`capacity`: the largest message and the most bytes in flight
        (default 1 GiB of address space: memory is committed only for the
        bytes messages occupy, see the module docstring); `num`: the most
        messages in flight; `backend`: "memfd" or "shm" (named: attach())."""
        if _ring is None:
            if capacity < 64:
                raise ValueError("capacity must be at least 64 bytes")
            capacity = L.align_up(capacity, 64)
            _ring = SharedRing.create(num=num, arena_size=capacity + _state_bytes(num),
                                      indirect=False, max_msg=min(capacity, 0xFFFFFFFF),
                                      backend=backend, name=name, mode=mode,
                                      app_kind=L.APP_CHANNEL, reserve=0)
            try:
                # the consumer state area (end of the window) is written
                # without a reservation of its own: commit it now
                r = _ring.layout.rings[0]
                _commit_range(_ring.segment.buf, r.win_off + capacity, _state_bytes(num))
            except BaseException:
                _ring.close()
                _ring.unlink()
                raise
        elif _ring.layout.app_kind != L.APP_CHANNEL:
            _ring.close()
            raise ValueError("segment is not a vringipc Channel")
        self._ring = _ring
        self._spin_ns = int(spin * 1e9)
        self._pidfd = -1
        self._pidfd_owner = None
        # weak callables run first thing in close() (vringipc.aio: wake the
        # waits that poll our eventfds before they are closed)
        self._close_hooks: list = []
        _live_channels.add(self)

    # --- identity -------------------------------------------------------------
    @property
    def name(self) -> str | None:
        """The segment name (shm backend), for Channel.attach()."""
        return self._ring.name if self._ring else None

    @property
    def capacity(self) -> int:
        """Arena bytes: the largest message, and the most that can be in flight."""
        return self._window()[5]

    def _window(self) -> tuple:
        """Ring arguments with the window cut short of the consumer state area
        (the last _state_bytes(num) bytes of the ring's arena window)."""
        r = self._ring.layout.rings[0]
        return (r.num, r.desc_off, r.avail_off, r.used_off, r.win_off,
                r.win_size - _state_bytes(r.num))

    @classmethod
    def attach(cls, name: str, kick_fd: int = -1, call_fd: int = -1) -> "Channel":
        """Open a channel created with backend="shm" by name, e.g. from an
        unrelated process.  Without the eventfds both ends poll (spin + yield)
        instead of sleeping; vringipc.handoff passes them over a socket."""
        ring = SharedRing.attach(name, [kick_fd], [call_fd])
        ring._owns_fds = kick_fd >= 0
        return cls(_ring=ring)

    # --- roles ------------------------------------------------------------------
    def _await_quiescent(self, block: bool, deadline: float | None) -> None:
        """Taking over from an earlier producer: its allocation state died with
        it, so wait until the consumer has completed everything it published
        (used idx == avail idx) before allocating anew.  Honours the caller's
        block / deadline (time.monotonic(), None = forever): Full if the
        consumer has not caught up in time."""
        r = self._ring.layout.rings[0]
        words = self._ring.words
        while True:
            self._check_open()                              # closed by another thread?
            avail = words.load32(r.avail_off) >> 16        # u16 flags | u16 idx
            used = words.load32(r.used_off) >> 16
            if avail == used:
                return
            left = (avail - used) & 0xffff
            cpid, cstart, cstate = peers.read_peer(words, L.DEVICE_LIVENESS_OFF)
            if cpid and cstate != L.PEER_ATTACHED or (cpid and not peers.alive(cpid, cstart)):
                raise PeerDead("taking over as producer: the consumer is gone and "
                               f"{left} messages of the previous producer are still unconsumed")
            if not block or (deadline is not None and time.monotonic() >= deadline):
                raise Full(f"taking over as producer: {left} messages of the previous producer "
                           "are still unconsumed")
            time.sleep(0.001)

    def _claim(self, block_off: int, what: str) -> bool:
        """Take a role; True if it was held before by another (dead or closed)
        process."""
        words = self._ring.words
        me, _ = peers.Identity.me()
        took_over = False
        for _ in range(100):
            pid, start, state = peers.read_peer(words, block_off)
            if pid == me:
                break
            took_over = pid != 0
            if pid and state == L.PEER_ATTACHED and peers.alive(pid, start):
                raise VringError(f"this channel already has a live {what} (pid {pid}); a "
                                 f"Channel is single-producer single-consumer: use Queue for more")
            if words.cas32(block_off + L.PEER_PID, pid, me):
                break
        peers.claim(words, block_off)
        return took_over

    def _sender(self, block: bool = True, deadline: float | None = None) -> ChannelSender:
        if self._tx is None:
            self._check_open()
            if self._claim(L.DRIVER_LIVENESS_OFF, "producer"):
                self._needs_quiesce = True
            if self._needs_quiesce:
                # (retried on every call until it succeeds: a failed wait must
                # not let a later call allocate over the old producer's bytes)
                self._await_quiescent(block, deadline)
                self._needs_quiesce = False
            win = self._window()
            self._tx = ChannelSender(self._ring.segment.buf, *win,
                                     features=self._ring.layout.features,
                                     kick_fd=self._ring.kick_fds[0],
                                     call_fd=self._ring.call_fds[0], spin_ns=self._spin_ns,
                                     state_off=win[4] + win[5])
            self._tx.check = self._check_consumer
            # Hot path: from now on ch.send / ch.send_many are the Cython
            # methods themselves (no Python frame in between).
            self.send = self._tx.send
            self.send_many = self._tx.send_many
        return self._tx

    def _receiver(self) -> ChannelReceiver:
        if self._rx is None:
            self._check_open()
            took_over = self._claim(L.DEVICE_LIVENESS_OFF, "consumer")
            r = self._ring.layout.rings[0]
            win = self._window()
            self._rx = ChannelReceiver(self._ring.segment.buf, *win,
                                       features=self._ring.layout.features,
                                       max_msg=self._ring.layout.max_msg, max_iov=r.max_iov,
                                       kick_fd=self._ring.kick_fds[0],
                                       call_fd=self._ring.call_fds[0], spin_ns=self._spin_ns,
                                       state_off=win[4] + win[5])
            if took_over:
                # the previous consumer died (or closed): finish its work; what
                # it still held is lost (at most once) and goes back to the producer
                self._rx.recover()
            self._rx.check = self._check_producer
            self._rx.on_empty = self._producer_gone
            self.recv = self._rx.recv
            self.recv_view = self._rx.recv_view
            self.recv_many = self._rx.recv_many
            self.recv_into = self._rx.recv_into
        return self._rx

    def _forget_roles(self) -> None:
        # In a forked child: the parent's private ring state is not ours.
        self._tx = None
        self._rx = None
        self._close_hooks = []          # the parent's event loops are not ours
        for attr in self._BOUND:
            self.__dict__.pop(attr, None)
        if self._pidfd >= 0:
            try:
                os.close(self._pidfd)
            except OSError:
                pass
            self._pidfd = -1
        self._pidfd_owner = None

    def _watch(self, side, block_off: int) -> None:
        """Keep a pidfd on the current peer, so waits wake when it exits.  If a
        different process has taken the peer's role, follow it."""
        pid, start, state = peers.read_peer(self._ring.words, block_off)
        if side.peer_fd >= 0 and self._pidfd_owner == (pid, start):
            return
        # Open the new pidfd before closing the old one, so the fd number
        # changes (the waiters compare numbers to see that we re-pointed).
        new_fd = peers.open_pidfd(pid, start) if pid and state == L.PEER_ATTACHED else -1
        if self._pidfd >= 0:
            os.close(self._pidfd)
        self._pidfd = new_fd
        side.peer_fd = new_fd
        self._pidfd_owner = (pid, start) if new_fd >= 0 else None

    def _check_consumer(self) -> None:
        pid, start, state = peers.read_peer(self._ring.words, L.DEVICE_LIVENESS_OFF)
        if pid and state == L.PEER_CLOSED:
            raise ChannelClosed("the consumer closed the channel")
        if pid and not peers.alive(pid, start):
            raise PeerDead(f"the consumer (pid {pid}) exited")
        self._watch(self._tx, L.DEVICE_LIVENESS_OFF)

    def _check_producer(self) -> None:
        pid, start, state = peers.read_peer(self._ring.words, L.DRIVER_LIVENESS_OFF)
        self._watch(self._rx, L.DRIVER_LIVENESS_OFF)
        if not pid or (state != L.PEER_CLOSED and peers.alive(pid, start)):
            return
        # Gone: but what it published before going is delivered first (look
        # only now, after seeing it gone, so nothing it sent can be missed).
        if self._rx.pending():
            return
        if state == L.PEER_CLOSED:
            raise ChannelClosed("the producer closed the channel")
        raise PeerDead(f"the producer (pid {pid}) exited")

    def _producer_gone(self) -> None:
        pid, start, state = peers.read_peer(self._ring.words, L.DRIVER_LIVENESS_OFF)
        if state == L.PEER_CLOSED:
            raise ChannelClosed("the producer closed the channel")

    def _check_open(self) -> None:
        if self._closed or self._ring is None:
            raise ValueError("channel is closed")

    # --- producer API -------------------------------------------------------------
    def _producer(self, block: bool, timeout: float | None):
        """(sender, what is left of timeout): the first call may have to wait
        for a takeover (see _await_quiescent), within the same block/timeout."""
        if self._tx is not None:
            return self._tx, timeout
        if timeout is None or not block:
            return self._sender(block), timeout
        deadline = time.monotonic() + max(timeout, 0.0)
        tx = self._sender(block, deadline)
        return tx, max(deadline - time.monotonic(), 0.0)

    def send(self, data, block: bool = True, timeout: float | None = None) -> None:
        """Copy a bytes-like message into shared memory and publish it.  Blocks
        while the arena or ring is full; raises Full on timeout or when not
        blocking, MessageTooLarge if it can never fit."""
        tx, timeout = self._producer(block, timeout)
        tx.send(data, block, timeout)

    def send_nowait(self, data) -> None:
        self.send(data, False)

    def send_many(self, messages, block: bool = True, timeout: float | None = None) -> int:
        """Send an iterable of messages with one notification per batch."""
        tx, timeout = self._producer(block, timeout)
        return tx.send_many(messages, block, timeout)

    def loan(self, size: int, block: bool = True, timeout: float | None = None):
        """Reserve `size` bytes of shared memory to fill in place (no copy).

        ``with ch.loan(n) as buf:`` gives a writable memoryview and publishes it
        when the block ends (cancels it if the block raises).  Or keep the Loan
        and call ``commit(nbytes)`` / ``cancel()``.  Views of the loan must be
        released before it is committed (BufferError otherwise)."""
        self._check_open()
        tx, timeout = self._producer(block, timeout)
        return tx.loan(size, block, timeout)

    def trim(self) -> int:
        """Producer side: take back what the consumer has finished and, if
        nothing is in flight, give back the committed memory past the first
        few MiB now (otherwise done by the next send).  Returns the bytes the
        producer has committed.  0 in a process that is not the producer."""
        if self._tx is None:
            return 0
        self._check_open()
        self._tx.reclaim()
        return self._tx.reserved_bytes

    # --- consumer API ---------------------------------------------------------------
    def recv(self, block: bool = True, timeout: float | None = None) -> bytes:
        """The next message as bytes.  Raises Empty on timeout / when not
        blocking, PeerDead if the producer died, ChannelClosed after it closed."""
        return self._receiver().recv(block, timeout)

    def recv_nowait(self) -> bytes:
        return self.recv(False)

    def recv_into(self, buffer, block: bool = True, timeout: float | None = None) -> int:
        """Copy the next message into `buffer`; returns its length."""
        return self._receiver().recv_into(buffer, block, timeout)

    def recv_view(self, block: bool = True, timeout: float | None = None):
        """The next message as a read-only MessageView of shared memory (no
        copy).  Its buffer returns to the producer after ``release()`` (or the
        end of a ``with`` block) once no memoryview/array of it is alive, or when
        it is garbage-collected.  Later traffic never overwrites it."""
        return self._receiver().recv_view(block, timeout)

    def recv_many(self, max_messages: int = 1 << 30, block: bool = True,
                  timeout: float | None = None) -> list[bytes]:
        """Wait for one message, then take every message already there (up to
        max_messages), with one notification for all."""
        return self._receiver().recv_many(max_messages, block, timeout)

    def poll(self, timeout: float | None = 0.0) -> bool:
        """True if a message can be received now (waiting up to `timeout`)."""
        self._check_open()
        rx = self._receiver()
        if rx.pending():
            return True
        if timeout is not None and timeout <= 0:
            return False
        return rx.wait(timeout)

    def fileno(self) -> int:
        """The consumer's eventfd, for select/poll/asyncio.  It becomes readable
        after a receive call found nothing (which arms it): the pattern is
        ``try: ch.recv_nowait() except Empty: wait for fileno()``."""
        self._check_open()
        rx = self._receiver()
        if self._ring.kick_fds[0] < 0:
            raise ValueError("channel attached without eventfds (polling mode): nothing to select on")
        rx.arm()
        return self._ring.kick_fds[0]

    @property
    def views_outstanding(self) -> int:
        """MessageViews handed out and not yet given back (diagnostics)."""
        return self._rx.views_outstanding if self._rx is not None else 0

    # --- lifecycle ----------------------------------------------------------------
    def close(self) -> None:
        """Close this process's end.  A producer's close wakes the consumer,
        which raises ChannelClosed once it has read everything.  The creator of
        a named (shm) segment also unlinks the name.  Idempotent.

        A call blocked in another thread of this process wakes up and raises
        ValueError.  The eventfds, the pidfd and the mapping are closed once
        no call is in flight any more and every Loan / MessageView is gone."""
        if self._closed or self._ring is None:
            return
        self._closed = True
        for ref in self._close_hooks:
            hook = ref()
            if hook is not None:
                hook()
        self._close_hooks = []
        words = self._ring.words
        for attr in self._BOUND:
            self.__dict__.pop(attr, None)
        ends = []
        if self._tx is not None:
            peers.release(words, L.DRIVER_LIVENESS_OFF)
            self._tx.flush_kick()
            ends.append(self._tx)
        if self._rx is not None:
            peers.release(words, L.DEVICE_LIVENESS_OFF)
            if self._ring.call_fds[0] >= 0:
                os.eventfd_write(self._ring.call_fds[0], 1)
            ends.append(self._rx)
        if self._ring.segment.owner:
            self._ring.unlink()         # the name only: the memory lives on while mapped
        _live_channels.discard(self)
        # Each end runs its finalizer when it is idle (maybe at once); the
        # last one to finish closes what they share.
        left = [len(ends)]

        def end_finished() -> None:
            left[0] -= 1
            if left[0] == 0:
                self._release_resources()

        for end in ends:
            end.close(end_finished)
        if not ends:
            self._release_resources()

    def _release_resources(self) -> None:
        """The eventfds, the mapping and the pidfd (once nothing uses them)."""
        self._ring.close()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if not self._closed and self._ring is not None:
                self.close()
        except Exception:
            pass

    def __reduce__(self):
        # multiprocessing start (spawn/forkserver): SharedRing pickles the fds.
        return (_rebuild_channel, (self._ring, self._spin_ns / 1e9))

    def __repr__(self) -> str:
        role = "producer" if self._tx is not None else "consumer" if self._rx is not None else "unbound"
        state = "closed" if self._closed else f"{self.capacity} bytes"
        return f"<vringipc.Channel {self.name or 'memfd'} {state} {role}>"


def _rebuild_channel(ring: SharedRing, spin: float) -> Channel:
    return Channel(_ring=ring, spin=spin)
