"""asyncio integration: await Channel and Queue operations without ever
blocking the event loop.

::

    from vringipc.aio import AsyncChannel, AsyncQueue

    ach = AsyncChannel(ch)                  # wraps a vringipc.Channel
    data = await ach.recv()                 # bytes
    with await ach.recv_view() as msg:      # MessageView, zero copy
        ...
    await ach.send(b"...")                  # waits (asynchronously) for room when full
    msgs = await asyncio.wait_for(ach.recv_many(), timeout=1.0)

    aq = AsyncQueue(q)                      # wraps a Queue / JoinableQueue / SimpleQueue
    await aq.put(obj)
    obj = await aq.get()
    await aq.join()                         # JoinableQueue

Every operation first tries the non-blocking call (``recv(block=False)``,
``get(block=False)``...); only when that finds nothing (or no room) does it
wait, by registering the ring's eventfd with ``loop.add_reader`` and awaiting
a future.  So the loop is never blocked, any other coroutine keeps running,
and a waiting call can be cancelled at any time (``asyncio.wait_for``,
``task.cancel()``): a cancelled call has taken nothing, so the next call gets
the message (nothing is lost) and a cancelled send has sent nothing.  Works
with the default asyncio loop and with uvloop (anything with add_reader).

How each wait is driven:

* ``AsyncChannel`` receive: eventfd-driven.  ``recv(block=False)`` re-arms the
  consumer's notifications (and drains the kick eventfd) before it raises
  Empty, so waiting for the kick eventfd to become readable cannot miss a
  message published after the check.
* ``AsyncChannel.send`` when full: eventfd-driven if the Cython core has
  ``ChannelSender.arm(size)`` (enables the consumer's "used" notifications,
  then re-checks for room: True = still full, safe to wait on the call
  eventfd); otherwise an adaptive polling fallback (16 plain yields to the
  loop, then ``asyncio.sleep`` of 50 us doubling up to 5 ms, restarting
  with each send), which never blocks the loop either but costs a wake-up
  every 5 ms while the consumer stays stalled.
* ``AsyncQueue`` get/put/join: eventfd-driven.  Queue consumers (producers,
  joiners) are only signalled while the shared GET_SLEEPERS (PUT_SLEEPERS,
  JOIN_SLEEPERS) count is non-zero, so a waiter announces itself there, then
  re-checks, then waits on the eventfd, and withdraws the announcement when it
  stops waiting (also on cancellation).  It uses ``QueueCore.sleep_begin /
  sleep_end`` when the core has them (an explicit SC fence between the
  announcement and the re-check, pairing with the fence in the core's _wake);
  otherwise the segment's atomic fetch-add (SharedWords.add32, a locked
  read-modify-write: a full barrier on x86-64, and release->acquire ordered on
  AArch64) followed by the acquire loads of the re-check.  Either way every
  wait is also bounded by ``check_interval`` (default 0.1 s), after which the
  condition is re-checked and peer liveness tested (PeerDead), exactly as the
  blocking calls do: a wake-up that is lost (another consumer drained the
  shared eventfd) costs latency, never a message.

Cooperative fairness: a call that succeeds without waiting does not yield to
the loop, so a consumer that always finds data ready would starve other
tasks.  Every ``yield_every`` consecutive non-waiting calls (default 64, 0 =
never) the wrapper yields once (``await asyncio.sleep(0)``) *before* taking a
message, so a cancellation at that point loses nothing.

What may still take a short time inside the loop: copying a message in/out
(memcpy; use recv_view / get_nocopy for large payloads) and the Queue's
cross-process lock (held only for a memcpy).  Taking over the producer role
of a Channel from a dead producer (which waits until the consumer has drained
its messages) polls like a full channel.

``close()`` wakes every pending call of this wrapper (which then raise
ValueError, as the closed channel / queue does) and removes their fd readers
*before* it closes the wrapped object, whose eventfds may be closed at once.
Called from another thread, it has the loop do that and waits for it (at most
CLOSE_WAIT seconds, in case the loop is not running).  Closing the wrapped
Channel directly does the same (the Channel tells its AsyncChannels); a Queue
closed directly ends a pending call within ``check_interval``.  Whichever way,
a call never touches the fds after the close: it raises ValueError.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref

from vringipc.errors import Empty, Full

__all__ = ["AsyncChannel", "AsyncQueue"]

CHECK_INTERVAL = 0.1            # seconds between liveness checks while waiting
BACKOFF_YIELDS = 16             # polling fallback: first just yield to the loop this often,
BACKOFF_MIN = 50e-6             # then sleep this long,
BACKOFF_MAX = 5e-3              # doubling up to this
YIELD_EVERY = 64
CLOSE_WAIT = 1.0                # close() from another thread: wait this long for the loop


# --- fd readiness: one reader per (loop, fd), any number of waiters ------------------

# loop -> {fd: set of _Waiter}.  A reader is registered while at least one
# waiter waits on the fd, and removed as soon as it fires (the eventfds are
# level-triggered: a reader left in place would spin).
_readers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, set]]" = \
    weakref.WeakKeyDictionary()


def _fire(loop, fd: int) -> None:
    table = _readers.get(loop)
    waiters = table.pop(fd, None) if table is not None else None
    loop.remove_reader(fd)
    for w in list(waiters or ()):
        w.fds.discard(fd)
        w.wake(fd)


class _Waiter:
    """A future that completes with the fd that became readable, or None when
    the timeout passed or the owner woke it (close)."""

    __slots__ = ("loop", "thread", "fut", "fds", "timer", "__weakref__")

    def __init__(self, loop, fds, timeout):
        self.loop = loop
        self.thread = threading.get_ident()     # the loop's thread
        self.fut = loop.create_future()
        self.fds: set[int] = set()
        self.timer = None
        table = _readers.get(loop)
        if table is None:
            table = _readers[loop] = {}
        try:
            for fd in fds:
                if fd in self.fds:
                    continue
                s = table.get(fd)
                if s is None:
                    loop.add_reader(fd, _fire, loop, fd)
                    s = table[fd] = set()
                s.add(self)
                self.fds.add(fd)
        except BaseException:
            self.detach()
            raise
        if timeout is not None:
            self.timer = loop.call_later(timeout, self.wake, None)

    def wake(self, result) -> None:
        self.detach()
        if not self.fut.done():
            self.fut.set_result(result)

    def detach(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        table = _readers.get(self.loop)
        for fd in self.fds:
            s = table.get(fd) if table is not None else None
            if s is None:
                continue
            s.discard(self)
            if not s:
                del table[fd]
                self.loop.remove_reader(fd)
        self.fds.clear()


def _drain(fd: int) -> None:
    """Clear an (O_NONBLOCK) eventfd; another waiter may have drained it already."""
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        pass


class _Base:
    """Waiter bookkeeping shared by the two wrappers."""

    def __init__(self, check_interval: float, yield_every: int):
        if check_interval <= 0:
            raise ValueError("check_interval must be positive")
        self._check_interval = check_interval
        self._yield_every = yield_every
        self._streak = 0
        self._waiters: "weakref.WeakSet[_Waiter]" = weakref.WeakSet()
        self._closed = False

    def _due(self) -> bool:
        """Fairness: True once every `yield_every` calls that did not have to
        wait, when the caller should yield to the loop (a plain call, so the
        fast path awaits nothing)."""
        if not self._yield_every:
            return False
        self._streak += 1
        if self._streak < self._yield_every:
            return False
        self._streak = 0
        return True

    async def _fair(self) -> None:
        """Called before a non-blocking attempt: yield to the loop when due."""
        if self._due():
            await asyncio.sleep(0)

    def _check_open(self) -> None:
        """ValueError once this wrapper or the wrapped object is closed."""
        raise NotImplementedError

    async def _wait(self, fds, timeout):
        """Wait until one of `fds` is readable (returns it) or `timeout` passes
        (returns None).  Resets the fairness streak: we did yield.  ValueError
        if closed before or while waiting (the fds may be closed by then)."""
        self._check_open()
        self._streak = 0
        w = _Waiter(asyncio.get_running_loop(), fds, timeout)
        self._waiters.add(w)
        try:
            fired = await w.fut
        finally:
            w.detach()
            self._waiters.discard(w)
        self._check_open()
        return fired

    async def _backoff(self, step: int) -> int:
        """One polling step: the first BACKOFF_YIELDS only yield to the loop
        (room usually appears within microseconds, as the blocking calls'
        spin assumes), then sleep BACKOFF_MIN doubling up to BACKOFF_MAX.
        Returns the next step."""
        self._streak = 0
        if step < BACKOFF_YIELDS:
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(min(BACKOFF_MIN * (1 << min(step - BACKOFF_YIELDS, 20)),
                                    BACKOFF_MAX))
        return step + 1

    def _wake_all(self) -> None:
        """Wake every pending wait and remove its readers, now: from another
        thread the waiters' loops do it, and we wait for them (CLOSE_WAIT)."""
        here = threading.get_ident()
        remote: dict = {}
        for w in list(self._waiters):
            if w.thread == here:
                w.wake(None)
            else:
                remote.setdefault(w.loop, []).append(w)
        done = []
        for loop, ws in remote.items():
            ev = threading.Event()

            def run(ws=ws, ev=ev):
                for w in ws:
                    w.wake(None)
                ev.set()
            try:
                loop.call_soon_threadsafe(run)
            except RuntimeError:        # loop closed: its selector (and readers) are gone
                continue
            done.append(ev)
        end = time.monotonic() + CLOSE_WAIT
        for ev in done:
            ev.wait(max(end - time.monotonic(), 0.0))


# --- Channel ------------------------------------------------------------------------

class AsyncChannel(_Base):
    """asyncio front end of a vringipc.Channel (one producer, one consumer).

    ``AsyncChannel(channel, *, check_interval=0.1, yield_every=64)``.  The
    roles are the Channel's: the first process to send is the producer, the
    first to receive the consumer.  Errors are the Channel's (PeerDead,
    ChannelClosed, MessageTooLarge, ValueError once closed).  For a timeout use
    ``asyncio.wait_for`` / ``asyncio.timeout``."""

    def __init__(self, channel, *, check_interval: float = CHECK_INTERVAL,
                 yield_every: int = YIELD_EVERY):
        super().__init__(check_interval, yield_every)
        self._ch = channel
        hooks = getattr(channel, "_close_hooks", None)
        if hooks is not None:           # the channel wakes us when it is closed directly
            hooks.append(weakref.WeakMethod(self._wake_all))

    @property
    def channel(self):
        return self._ch

    def _check_open(self) -> None:
        if self._closed or self._ch._closed:
            raise ValueError("channel is closed")

    @property
    def send_uses_eventfd(self) -> bool:
        """True if a send that finds the channel full waits on the call eventfd
        (the core has ChannelSender.arm); False = polling fallback."""
        from vringipc._ring import ChannelSender
        return hasattr(ChannelSender, "arm") and self._ch._ring is not None \
            and self._ch._ring.call_fds[0] >= 0

    # --- consumer ---------------------------------------------------------------------
    async def _receive(self, attempt, tried: bool = False):
        """Take a message with attempt() (a non-blocking receive), waiting for
        the kick eventfd while it raises Empty.  tried = the caller's own
        attempt just raised Empty (so start by waiting)."""
        ch = self._ch
        woke = False
        step = 0
        while True:
            if tried:
                tried = False
            else:
                try:
                    return attempt()        # arms the kick eventfd before raising Empty
                except Empty:
                    pass
            rx = ch._rx
            if (woke or rx.peer_fd < 0) and rx.check is not None:
                # Nothing after a wake-up (or not watching the producer yet):
                # raises PeerDead / ChannelClosed if it is gone, and points
                # peer_fd at its pidfd so that its exit wakes us.
                rx.check()
            if rx.kick_fd < 0:              # attached without eventfds: poll
                step = await self._backoff(step)
                self._check_open()
                woke = True
                continue
            fds = (rx.kick_fd, rx.peer_fd) if rx.peer_fd >= 0 else (rx.kick_fd,)
            await self._wait(fds, self._check_interval)
            woke = True

    # The public methods try once inline (no extra coroutine, no closure) and
    # only fall back to _receive when they have to wait.
    async def recv(self) -> bytes:
        """The next message as bytes."""
        if self._due():
            await asyncio.sleep(0)
        try:
            return self._ch.recv(False)
        except Empty:
            ch = self._ch
            return await self._receive(lambda: ch.recv(False), True)

    async def recv_view(self):
        """The next message as a read-only MessageView of shared memory (no
        copy); release it (or use ``with``) to give its buffer back."""
        if self._due():
            await asyncio.sleep(0)
        try:
            return self._ch.recv_view(False)
        except Empty:
            ch = self._ch
            return await self._receive(lambda: ch.recv_view(False), True)

    async def recv_into(self, buffer) -> int:
        """Copy the next message into `buffer`; returns its length."""
        ch = self._ch
        await self._fair()
        return await self._receive(lambda: ch.recv_into(buffer, False))

    async def recv_many(self, max_messages: int = 1 << 30) -> list:
        """Wait for one message, then take every message already there (up to
        max_messages) with one notification for all."""
        ch = self._ch
        await self._fair()
        return await self._receive(lambda: ch.recv_many(max_messages, False))

    # --- producer ---------------------------------------------------------------------
    async def send(self, data) -> None:
        """Copy a bytes-like message into shared memory and publish it, waiting
        (without blocking the loop) while the channel is full."""
        if self._due():
            await asyncio.sleep(0)
        try:
            self._ch.send(data, False)
        except Full:
            await self._send_wait(data)

    async def _send_wait(self, data) -> None:
        ch = self._ch
        nbytes = None
        woke = False
        step = 0
        next_check = None
        loop = None
        tried = True
        while True:
            if tried:
                tried = False
            else:
                try:
                    ch.send(data, False)
                    return
                except Full:
                    pass
            tx = ch._tx
            if tx is None:
                # not the producer yet: taking over from a dead one, which
                # waits for the consumer to drain its messages (send raised
                # Full for that): poll
                step = await self._backoff(step)
                self._check_open()
                continue
            arm = getattr(tx, "arm", None)
            if arm is not None and tx.call_fd >= 0:
                if (woke or tx.peer_fd < 0) and tx.check is not None:
                    tx.check()              # still full after a wake-up: consumer gone?
                if nbytes is None:
                    nbytes = memoryview(data).nbytes
                if not arm(nbytes):         # room appeared while arming: retry now
                    continue
                fds = (tx.call_fd, tx.peer_fd) if tx.peer_fd >= 0 else (tx.call_fd,)
                try:
                    await self._wait(fds, self._check_interval)
                finally:
                    disarm = getattr(tx, "disarm", None)
                    if disarm is not None and not tx.closed:
                        disarm()
                woke = True
                continue
            # Fallback: the core cannot arm "used" notifications for us, so
            # poll with a growing sleep; check consumer liveness periodically.
            if loop is None:
                loop = asyncio.get_running_loop()
                next_check = loop.time() + self._check_interval
            elif loop.time() >= next_check:
                next_check = loop.time() + self._check_interval
                if tx.check is not None:
                    tx.check()
            step = await self._backoff(step)
            self._check_open()

    # --- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """Wake this wrapper's pending calls (they raise ValueError), then close
        the channel.  Call from the loop's thread."""
        self._closed = True
        self._wake_all()
        self._ch.close()

    async def __aenter__(self) -> "AsyncChannel":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AsyncChannel {self._ch!r}>"


# --- Queue --------------------------------------------------------------------------

def _queue_offsets():
    from vringipc._ring import QUEUE_OFFSETS
    return QUEUE_OFFSETS


_GET, _PUT, _JOIN = 0, 1, 2


class _Announcement:
    """This process counted once in a queue's *_SLEEPERS word (so producers /
    consumers / task_done signal the eventfd).  Withdrawn exactly once, by the
    waiter or by AsyncQueue.close(), whichever comes first."""

    __slots__ = ("which", "active", "__weakref__")

    def __init__(self, which: int):
        self.which = which
        self.active = True


class AsyncQueue(_Base):
    """asyncio front end of a vringipc.Queue, JoinableQueue or SimpleQueue
    (any number of producer and consumer processes, some asyncio, some not).

    ``AsyncQueue(queue, *, check_interval=0.1, yield_every=64)``.  Errors are
    the queue's (PeerDead when every other process that used it is gone,
    MessageTooLarge, ValueError once closed)."""

    def __init__(self, queue, *, check_interval: float = CHECK_INTERVAL,
                 yield_every: int = YIELD_EVERY):
        super().__init__(check_interval, yield_every)
        inner = getattr(queue, "_q", None)          # SimpleQueue wraps a Queue
        self._queue = queue
        self._q = inner if inner is not None and not hasattr(queue, "_core") else queue
        self._announced: "weakref.WeakSet[_Announcement]" = weakref.WeakSet()
        offs = _queue_offsets()
        self._word_off = {_GET: offs["get_sleepers"], _PUT: offs["put_sleepers"],
                          _JOIN: offs["join_sleepers"]}

    @property
    def queue(self):
        return self._queue

    def _check_open(self) -> None:
        if self._closed or self._q._closed:
            raise ValueError("queue is closed")

    # --- the sleepers protocol ------------------------------------------------------------
    def _announce(self, which: int) -> tuple[_Announcement, bool]:
        """Count ourselves as a sleeper, then re-check.  Returns the
        announcement and whether the condition may still hold (get: empty,
        join: unfinished tasks; put: always True, the caller retries its put)."""
        q = self._q
        core = q._core
        ann = _Announcement(which)
        begin = getattr(core, "sleep_begin", None)
        if begin is not None:
            still = bool(begin(which))          # fetch-add, SC fence, re-check
        else:
            q._ring.words.add32(self._word_off[which], 1)
            # The locked fetch-add orders the announcement before the loads
            # below (x86-64: full barrier; AArch64: release -> acquire), which
            # pairs with the SC fence in QueueCore._wake between the index
            # store and the sleepers load.
            if which == _GET:
                still = core.qsize() == 0
            elif which == _JOIN:
                still = core.unfinished_tasks() != 0
            else:
                still = True
        self._announced.add(ann)
        return ann, still

    def _withdraw(self, ann: _Announcement) -> None:
        if not ann.active:
            return
        ann.active = False
        self._announced.discard(ann)
        q = self._q
        if q._closed or q._ring is None or q._ring.words is None:
            return
        end = getattr(q._core, "sleep_end", None)
        if end is not None:
            end(ann.which)
        else:
            q._ring.words.add32(self._word_off[ann.which], 0xFFFFFFFF)   # -1

    async def _sleep(self, fd: int) -> None:
        if fd < 0:                   # no eventfd (attached in polling mode)
            await asyncio.sleep(min(self._check_interval, BACKOFF_MAX))
            self._check_open()
            return
        fired = await self._wait((fd,), self._check_interval)
        if fired is not None:
            _drain(fd)               # still open: _wait raises once closed

    # --- consumer ---------------------------------------------------------------------
    async def _take(self, attempt, tried: bool = False):
        q = self._q
        slept = False
        while True:
            if tried:
                tried = False
            else:
                try:
                    return attempt()
                except Empty:
                    pass
            if slept:
                q._check_peers()        # nothing after a wait: is anybody left?
            ann, still = self._announce(_GET)
            try:
                if not still:
                    continue
                await self._sleep(q._ring.kick_fds[0])
                slept = True
            finally:
                self._withdraw(ann)

    async def get(self):
        """Remove and return an item."""
        if self._due():
            await asyncio.sleep(0)
        try:
            return self._q.get(False)
        except Empty:
            q = self._q
            return await self._take(lambda: q.get(False), True)

    async def get_nocopy(self):
        """Like get(), out-of-band buffers as read-only views of shared memory."""
        q = self._q
        await self._fair()
        return await self._take(lambda: q.get_nocopy(False))

    # --- producer ---------------------------------------------------------------------
    async def put(self, obj) -> None:
        """Put obj into the queue, waiting (without blocking the loop) while it
        is full."""
        q = self._q
        await self._fair()
        slept = False
        while True:
            try:
                q.put(obj, False)
                return
            except Full:
                pass
            if slept:
                q._check_peers()
            ann, _ = self._announce(_PUT)
            try:
                # Retry once announced: a consumer that freed room before it
                # could see the announcement is caught here, one after it
                # signals the call eventfd.
                try:
                    q.put(obj, False)
                    return
                except Full:
                    pass
                await self._sleep(q._ring.call_fds[0])
                slept = True
            finally:
                self._withdraw(ann)

    # --- JoinableQueue ------------------------------------------------------------------
    async def join(self) -> None:
        """Wait until every item put has been matched by a task_done()."""
        q = self._q
        if not getattr(q, "_joinable", False):
            raise TypeError("join() needs a JoinableQueue")
        q._check_closed()
        while True:
            if q._core.unfinished_tasks() == 0:
                return
            ann, still = self._announce(_JOIN)
            try:
                if not still:
                    return
                await self._sleep(q._join_fd)
            finally:
                self._withdraw(ann)

    def task_done(self) -> None:
        self._q.task_done()

    def qsize(self) -> int:
        return self._q.qsize()

    def empty(self) -> bool:
        return self._q.empty()

    # --- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """Withdraw this wrapper's sleeper announcements, wake its pending calls
        (they raise ValueError), then close the queue.  Call from the loop's
        thread."""
        self._closed = True
        for ann in list(self._announced):
            self._withdraw(ann)
        self._wake_all()
        self._queue.close()

    async def __aenter__(self) -> "AsyncQueue":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AsyncQueue {self._queue!r}>"
