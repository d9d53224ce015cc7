"""Channel lifecycle (issue 8): close() while other threads are blocked or hold
loans / views, use after close, fork with live loans / views, producer
takeover with timeout / block=False, and the asyncio wrappers' close.

Whatever may crash (a use of an unmapped ring) runs in a forked child, so a
segfault fails the test instead of the whole run.  No assertion depends on
timing: timeouts only bound waits that must end for another reason."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time

import numpy as np
import pytest

from vringipc import Channel, ChannelClosed, Empty, Full, PeerDead, Queue
from vringipc import aio
from vringipc.aio import AsyncChannel, AsyncQueue

from forking import Forked, Gate, wait_for

WAIT = 10.0          # bound for a wait that must end for another reason


# --- helpers -------------------------------------------------------------------------------

def _in_child(fn, *args):
    """fn(*args) in a forked child; fails (with the signal) if it crashed or raised."""
    with Forked(fn, *args) as p:
        code = p.join(30)
    assert code == 0, f"child exited with {code}" + (" (crashed)" if code < 0 else "")


def _sleeping(thread: threading.Thread) -> bool:
    """True once the thread sleeps in the kernel (poll on the eventfds)."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "S"
    except OSError:
        return False


class Blocked:
    """call() in a thread; wait until it sleeps; outcome() once it returned."""

    def __init__(self, call):
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()
        time.sleep(0.05)                      # past the spin phase (50 us)
        wait_for(lambda: _sleeping(self.thread) or not self.thread.is_alive(),
                 "the call to block")
        if not self.thread.is_alive():
            raise AssertionError(f"the call did not block: {self.result!r}")

    def _run(self, call):
        try:
            self.result = ("returned", call())
        except BaseException as e:          # noqa: BLE001 - reported to the test
            self.result = ("raised", e)

    def outcome(self, timeout: float = WAIT):
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("the blocked call did not wake up")
        return self.result


def _fill(c: Channel) -> None:
    """Send until the channel is full (no consumer)."""
    for _ in range(1000):
        try:
            c.send(b"x" * 1000, block=False)
        except Full:
            return
    raise AssertionError("channel never filled")


_CONSUMER_CALLS = {
    "recv": lambda c: c.recv(),
    "recv_timeout": lambda c: c.recv(timeout=60),
    "recv_into": lambda c: c.recv_into(bytearray(4096)),
    "recv_view": lambda c: c.recv_view(),
    "recv_many": lambda c: c.recv_many(),
    "poll_forever": lambda c: c.poll(None),
    "poll_timeout": lambda c: c.poll(60),
}
_PRODUCER_CALLS = {
    "send": lambda c: c.send(b"y" * 1000),
    "send_timeout": lambda c: c.send(b"y" * 1000, timeout=60),
    "send_many": lambda c: c.send_many([b"y" * 1000, b"z"]),
    "loan": lambda c: c.loan(1000),
}


def _close_while_blocked(op: str) -> None:
    c = Channel(capacity=4096, num=8)
    if op in _CONSUMER_CALLS:
        call = _CONSUMER_CALLS[op]
        with pytest.raises(Empty):
            c.recv_nowait()                   # consumer role, nothing there
    else:
        call = _PRODUCER_CALLS[op]
        _fill(c)
    b = Blocked(lambda: call(c))
    c.close()
    kind, exc = b.outcome()
    if kind != "raised" or not isinstance(exc, ValueError) or "closed" not in str(exc):
        raise AssertionError(f"{op}: expected ValueError('... closed'), got {kind} {exc!r}")
    # the last call has left: the eventfds and the mapping are released
    if c._ring.kick_fds != [-1] or not c._ring.segment.closed:
        raise AssertionError("resources not released after the blocked call returned")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", sorted(_CONSUMER_CALLS) + sorted(_PRODUCER_CALLS))
def test_close_wakes_blocked_call(op):
    _in_child(_close_while_blocked, op)


def _close_keeps_fds_while_blocked() -> None:
    # Between the close and the blocked call's return, nothing it polls is closed.
    c = Channel(capacity=4096, num=8)
    with pytest.raises(Empty):
        c.recv_nowait()
    rx = c._rx
    held = threading.Event()

    def slow_check():
        # runs inside the blocked call (with the call entered): close under it
        held.set()
        c.close()
        if c._ring.kick_fds == [-1] or c._ring.segment.closed:
            raise AssertionError("closed the fds under a call in flight")
    rx.check = slow_check
    t = threading.Thread(target=lambda: _swallow(rx.wait, 60), daemon=True)
    t.start()
    if not held.wait(WAIT):
        raise AssertionError("check never ran")
    t.join(WAIT)
    if t.is_alive():
        raise AssertionError("wait did not return")
    if c._ring.kick_fds != [-1]:
        raise AssertionError("fds not released after the call left")


def _swallow(fn, *args):
    try:
        fn(*args)
    except ValueError:
        pass


@pytest.mark.timeout(60)
def test_close_from_inside_a_call_defers_the_fds():
    _in_child(_close_keeps_fds_while_blocked)


def _close_during_big_copies(delay: float) -> None:
    c = Channel(capacity=32 << 20, num=8)
    big = os.urandom(8 << 20)
    buf = bytearray(8 << 20)
    out = []

    def pump():
        try:
            while True:
                c.send(big)                   # nogil memcpy into the arena
                c.recv_into(buf)              # nogil memcpy out of it
        except ValueError as e:
            out.append(e)
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    time.sleep(delay)
    c.close()
    t.join(WAIT)
    if t.is_alive() or not out:
        raise AssertionError("the copying thread did not stop with ValueError")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delay", [0.0, 0.003, 0.02, 0.05])
def test_close_during_big_copies(delay):
    _in_child(_close_during_big_copies, delay)


def _peerdead_in_two_threads() -> None:
    c = Channel(capacity=4096, num=8)
    go = Gate()

    def producer():
        c.send(b"hello")
        go.wait()                             # exit (without close) when told

    with Forked(producer) as p:
        assert c.recv(timeout=WAIT) == b"hello"
        a = Blocked(lambda: c.recv())
        b = Blocked(lambda: c.poll(None))
        go.set()
        for blocked in (a, b):
            kind, exc = blocked.outcome()
            if kind != "raised" or not isinstance(exc, PeerDead):
                raise AssertionError(f"expected PeerDead, got {kind} {exc!r}")
        if p.join() != 0:
            raise AssertionError("producer failed")
    c.close()


@pytest.mark.timeout(60)
def test_peer_death_wakes_every_blocked_thread():
    _in_child(_peerdead_in_two_threads)


# --- loans and views after close -----------------------------------------------------------

def _loan_after_close() -> None:
    c = Channel(capacity=4096, num=8)
    ln = c.loan(100)
    c.close()
    with pytest.raises(ValueError):
        memoryview(ln)                        # was: NULL base + offset (segfault)
    with pytest.raises(ValueError):
        ln.commit()
    with pytest.raises(ValueError):
        with ln:
            pass
    assert c._ring.kick_fds[0] >= 0, "the live loan must keep the channel's resources"
    ln.cancel()
    assert c._ring.kick_fds == [-1] and c._ring.segment.closed


@pytest.mark.timeout(30)
def test_loan_after_close_raises():
    _in_child(_loan_after_close)


def _view_after_close() -> None:
    c = Channel(capacity=4096, num=8)
    c.send(b"kept")
    v = c.recv_view()
    c.close()
    assert bytes(v) == b"kept"                # pinned: still mapped and readable
    assert c._ring.kick_fds[0] >= 0, "the live view must keep the channel's resources"
    v.release()
    assert c._ring.kick_fds == [-1] and c._ring.segment.closed
    with pytest.raises(ValueError):
        memoryview(v)
    with pytest.raises(ValueError):
        v.tobytes()


@pytest.mark.timeout(30)
def test_view_after_close_then_release():
    _in_child(_view_after_close)


# --- fork with live views and loans ----------------------------------------------------------

def _child_drops_view(held, how):
    # `held` has the only references (the forked test frame has none)
    del held["arr"]
    if how == "release":
        held["v"].release()
    held.clear()
    gc.collect()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["drop", "release"])
def test_forked_child_dropping_a_view_gives_nothing_back(how):
    with Channel(capacity=4096, num=8) as c:
        data = os.urandom(1000)
        c.send(data)
        held = {"v": c.recv_view()}
        held["arr"] = np.frombuffer(held["v"], np.uint8)
        before = bytes(c._ring.segment.buf)
        with Forked(_child_drops_view, held, how) as p:
            assert p.join() == 0
        assert bytes(c._ring.segment.buf) == before, "the child wrote shared memory"
        # Had the child completed it, the producer would take its bytes back
        # and write over them.  As it is, traffic goes around the held view.
        for k in range(40):
            c.send(bytes([k]) * 1000, block=False)
            assert c.recv(timeout=WAIT) == bytes([k]) * 1000
        assert c._tx.pinned[0] == 1, "the view's bytes were given back"
        assert held["arr"].tobytes() == data and bytes(held["v"]) == data
        assert c.views_outstanding == 1
        del held["arr"]
        held.pop("v").release()
        assert c.views_outstanding == 0
        c.send(b"after", timeout=WAIT)
        assert c.recv(timeout=WAIT) == b"after"


def _child_with_loan(held, how):
    ln = held["ln"]
    with pytest.raises(ValueError):
        memoryview(ln)
    with pytest.raises(ValueError):
        ln.commit()
    if how == "cancel":
        ln.cancel()                           # forgets it; the parent's loan is intact
    del ln
    held.clear()                              # drop: the last reference in the child
    gc.collect()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["cancel", "drop"])
def test_forked_child_cannot_commit_or_cancel_a_loan(how):
    with Channel(capacity=4096, num=8) as c:
        held = {"ln": c.loan(100)}
        with memoryview(held["ln"]) as mv:
            mv[:] = b"L" * 100
        before = bytes(c._ring.segment.buf)
        with Forked(_child_with_loan, held, how) as p:
            assert p.join() == 0
        assert bytes(c._ring.segment.buf) == before, "the child wrote shared memory"
        held.pop("ln").commit()
        assert c.recv(timeout=WAIT) == b"L" * 100
        for k in range(20):
            c.send(b"%d" % k)
            assert c.recv(timeout=WAIT) == b"%d" % k
        with pytest.raises(Empty):
            c.recv_nowait()


# --- producer takeover honours block / timeout ------------------------------------------------

def _send_and_exit(c, msgs):
    for m in msgs:
        c.send(m)


@pytest.mark.timeout(60)
def test_takeover_honours_block_and_timeout():
    with Channel(capacity=4096, num=8) as c:
        with pytest.raises(Empty):
            c.recv_nowait()                   # we are the (idle) consumer
        with Forked(_send_and_exit, c, [b"one", b"two"]) as p:
            assert p.join() == 0
        # the dead producer left two messages: taking over needs them drained
        with pytest.raises(Full):
            c.send(b"three", block=False)
        with pytest.raises(Full):
            c.send_many([b"three"], block=False)
        with pytest.raises(Full):
            c.loan(10, block=False)
        with pytest.raises(Full):
            c.send(b"three", timeout=0.2)
        with pytest.raises(Full):
            c.send(b"three", timeout=0)
        assert c._tx is None
        assert c.recv(timeout=WAIT) == b"one"
        assert c.recv(timeout=WAIT) == b"two"
        c.send(b"three", timeout=0.5)
        assert c.recv(timeout=WAIT) == b"three"


@pytest.mark.timeout(60)
def test_takeover_wait_ends_when_closed_by_another_thread():
    def body():
        c = Channel(capacity=4096, num=8)
        with pytest.raises(Empty):
            c.recv_nowait()
        with Forked(_send_and_exit, c, [b"one"]) as p:
            assert p.join() == 0
        out = []
        t = threading.Thread(target=lambda: _record(out, c.send, b"x"), daemon=True)
        t.start()
        time.sleep(0.05)
        c.close()
        t.join(WAIT)
        if t.is_alive() or not out or not isinstance(out[0], ValueError):
            raise AssertionError(f"takeover wait did not end with ValueError: {out!r}")
    _in_child(body)


def _record(out, fn, *args):
    try:
        fn(*args)
        out.append("returned")
    except BaseException as e:                # noqa: BLE001
        out.append(e)


# --- asyncio ----------------------------------------------------------------------------------

def _no_readers(loop) -> bool:
    return not aio._readers.get(loop)


async def _pending(coro_fn):
    task = asyncio.ensure_future(coro_fn())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()
    return task


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["wrapper", "channel", "thread"])
def test_async_channel_close_ends_pending_recv(how):
    async def main():
        ch = Channel(capacity=4096, num=8)
        ach = AsyncChannel(ch, check_interval=30.0)     # only the close can end the wait
        task = await _pending(ach.recv)
        loop = asyncio.get_running_loop()
        kick = ch._ring.kick_fds[0]
        if how == "wrapper":
            ach.close()
        elif how == "channel":
            ch.close()
        else:
            await loop.run_in_executor(None, ach.close)
        assert _no_readers(loop), "readers left on the closed eventfds"
        with pytest.raises(ValueError, match="closed"):
            await asyncio.wait_for(task, WAIT)
        assert ch._closed and ch._ring.kick_fds == [-1] and kick >= 0
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_async_channel_close_ends_pending_send():
    async def main():
        ch = Channel(capacity=4096, num=8)
        ach = AsyncChannel(ch, check_interval=30.0)
        _fill(ch)
        task = await _pending(lambda: ach.send(b"y" * 1000))
        await asyncio.get_running_loop().run_in_executor(None, ach.close)
        with pytest.raises(ValueError, match="closed"):
            await asyncio.wait_for(task, WAIT)
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_async_send_during_takeover_does_not_block_the_loop():
    async def main(c):
        ach = AsyncChannel(c)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)
        t = asyncio.ensure_future(ticker())
        send = asyncio.ensure_future(ach.send(b"three"))
        await asyncio.sleep(0.05)
        assert not send.done() and ticks > 1            # waiting, and the loop runs
        assert c.recv(timeout=WAIT) == b"one"            # drain: the takeover completes
        await asyncio.wait_for(send, WAIT)
        t.cancel()
        assert c.recv(timeout=WAIT) == b"three"

    with Channel(capacity=4096, num=8) as c:
        with pytest.raises(Empty):
            c.recv_nowait()
        with Forked(_send_and_exit, c, [b"one"]) as p:
            assert p.join() == 0
        asyncio.run(main(c))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["wrapper", "thread"])
def test_async_queue_close_ends_pending_get(how):
    async def main():
        q = Queue()
        aq = AsyncQueue(q, check_interval=30.0)
        task = await _pending(aq.get)
        loop = asyncio.get_running_loop()
        if how == "wrapper":
            aq.close()
        else:
            await loop.run_in_executor(None, aq.close)
        assert _no_readers(loop)
        with pytest.raises(ValueError, match="closed"):
            await asyncio.wait_for(task, WAIT)
    asyncio.run(main())


@pytest.mark.timeout(60)
def test_async_queue_closed_directly_ends_pending_get():
    async def main():
        q = Queue()
        aq = AsyncQueue(q, check_interval=0.05)
        task = await _pending(aq.get)
        q.close()                               # not through the wrapper
        with pytest.raises(ValueError, match="closed"):
            await asyncio.wait_for(task, WAIT)
    asyncio.run(main())


def test_channel_closed_error_is_unchanged_for_peer_close():
    # a clean producer close is still ChannelClosed for the consumer, not ValueError
    with Channel(capacity=4096, num=8) as c:
        def prod(ch):
            ch.send(b"a")
            ch.close()
        with Forked(prod, c) as p:
            assert p.join() == 0
        assert c.recv(timeout=WAIT) == b"a"
        with pytest.raises(ChannelClosed):
            c.recv(timeout=WAIT)
