"""Tests of vringipc.aio: AsyncChannel and AsyncQueue never block the event loop.

Every test runs on the default asyncio loop and on uvloop (when installed).
"The loop is not blocked" is shown without timing: a ticker coroutine must
keep running while a call waits, and in the cross-process tests the peer only
finishes its work after the ticker has ticked K times (it releases a gate),
so a call that blocked the loop would never complete.  Timeouts only bound
waits that must end for another reason."""

from __future__ import annotations

import asyncio
import select

import pytest

import vringipc
from vringipc import (
    Channel,
    ChannelClosed,
    Empty,
    JoinableQueue,
    PeerDead,
    Queue,
    SimpleQueue,
)
from vringipc import aio
from vringipc._ring import QUEUE_OFFSETS, ChannelSender, QueueCore
from vringipc.aio import AsyncChannel, AsyncQueue

from forking import Forked, Gate

try:
    import uvloop
except ImportError:          # pragma: no cover
    uvloop = None

WAIT = 10.0          # generous bound for a wait that must end for another reason
TICKS = 20           # ticks the ticker must make before the peer finishes

HAS_ARM = hasattr(ChannelSender, "arm")
HAS_SLEEP_BEGIN = hasattr(QueueCore, "sleep_begin")


# --- helpers ------------------------------------------------------------------------

@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.close()


class Ticker:
    """Counts its turns on the loop; opens `gate` after `open_after` of them."""

    def __init__(self, gate: Gate | None = None, open_after: int = TICKS, period: float = 0.001):
        self.ticks = 0
        self.gate = gate
        self.open_after = open_after
        self.period = period
        self.stopped = False
        self.task = None

    def start(self) -> "Ticker":
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self.stopped:
            self.ticks += 1
            if self.gate is not None and self.ticks == self.open_after:
                self.gate.set()
            await asyncio.sleep(self.period)

    async def stop(self) -> int:
        self.stopped = True
        await self.task
        return self.ticks


LOOPS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param("uvloop", id="uvloop",
                 marks=pytest.mark.skipif(uvloop is None, reason="uvloop not installed")),
]


@pytest.fixture(params=LOOPS)
def run(request):
    """run(coroutine_function, *args): run it to completion on a fresh loop of
    the parametrized kind, bounded by WAIT; afterwards no fd reader of ours
    may be left registered on that loop."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def runner(fn, *args, timeout: float = WAIT * 2):
        async def main():
            loop = asyncio.get_running_loop()
            try:
                return await asyncio.wait_for(fn(*args), timeout)
            finally:
                left = aio._readers.get(loop)
                assert not left, f"fd readers left registered: {left}"
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(main())
    runner.loop_kind = request.param
    return runner


def _sleepers(q, which: str) -> int:
    return q._ring.words.load32(QUEUE_OFFSETS[which])


# --- AsyncChannel: receive ----------------------------------------------------------

def _producer_gated(ch: Channel, gate: Gate, n: int) -> None:
    for i in range(n // 2):
        ch.send(b"m%d" % i)
    gate.wait()                        # the parent's ticker opens it
    for i in range(n // 2, n):
        ch.send(b"m%d" % i)
    ch.close()


@pytest.mark.timeout(60)
def test_channel_recv_does_not_block_loop(run, gate):
    n = 2000
    ch = Channel(capacity=1 << 14, num=64)
    with Forked(_producer_gated, ch, gate, n) as child:
        async def main():
            ach = AsyncChannel(ch)
            ticker = Ticker(gate).start()
            got = []
            with pytest.raises(ChannelClosed):
                while True:
                    got.append(await ach.recv())
            return got, await ticker.stop()

        got, ticks = run(main)
        assert child.join() == 0
    ch.close()
    assert got == [b"m%d" % i for i in range(n)]
    assert ticks >= TICKS


def _producer_then_close(ch: Channel, gate: Gate, msgs) -> None:
    for m in msgs:
        ch.send(m)
    gate.wait()
    ch.close()


@pytest.mark.timeout(60)
def test_channel_recv_view_recv_into_recv_many(run, gate):
    msgs = [bytes([i]) * (100 + i) for i in range(40)]
    ch = Channel(capacity=1 << 16, num=64)
    with Forked(_producer_then_close, ch, gate, msgs) as child:
        async def main():
            ach = AsyncChannel(ch)
            out = []
            with await ach.recv_view() as v:
                out.append(bytes(v))
            buf = bytearray(1000)
            k = await ach.recv_into(buf)
            out.append(bytes(buf[:k]))
            while len(out) < len(msgs):
                out.extend(await ach.recv_many(7))
            ticker = Ticker(gate).start()       # producer closes once it ticked
            with pytest.raises(ChannelClosed):
                await ach.recv_many()
            await ticker.stop()
            return out
        out = run(main)
        assert child.join() == 0
    ch.close()
    assert out == msgs


@pytest.mark.timeout(60)
def test_channel_recv_is_woken_by_the_kick_not_by_polling(run, gate):
    # With a 30 s check interval, only the eventfd can end these waits in time.
    ch = Channel(capacity=1 << 14)
    with Forked(_producer_gated, ch, gate, 2) as child:
        async def main():
            ach = AsyncChannel(ch, check_interval=30.0)
            assert await ach.recv() == b"m0"
            ticker = Ticker(gate).start()
            assert await asyncio.wait_for(ach.recv(), WAIT) == b"m1"
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(ach.recv(), WAIT)
            await ticker.stop()
        run(main)
        assert child.join() == 0
    ch.close()


@pytest.mark.timeout(30)
def test_channel_fairness_yields_while_data_is_ready(run):
    # Everything is already there, so no recv ever waits: the wrapper must
    # still yield now and then (yield_every), or the ticker never runs.
    ch = Channel(capacity=1 << 16, num=256)

    async def main(yield_every):
        ach = AsyncChannel(ch, yield_every=yield_every)
        for i in range(200):
            ch.send(b"%d" % i)
        ticker = Ticker(period=0).start()
        await asyncio.sleep(0)              # let the ticker start
        before = ticker.ticks
        for i in range(200):
            assert await ach.recv() == b"%d" % i
        during = ticker.ticks - before
        await ticker.stop()
        return during

    assert run(main, 16) >= 200 // 16 - 1
    assert run(main, 0) == 0                # the control: no yield, no ticks
    ch.close()


# --- AsyncChannel: cancellation and closing -----------------------------------------

@pytest.mark.timeout(30)
def test_channel_cancelled_recv_loses_nothing(run):
    ch = Channel(capacity=4096, num=8)       # one process holds both roles

    async def main():
        ach = AsyncChannel(ch)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ach.recv(), 0.05)
        ch.send(b"one")
        assert await asyncio.wait_for(ach.recv(), WAIT) == b"one"

        # Cancel a waiting recv right after the message is published.
        task = asyncio.create_task(ach.recv())
        while not ach._waiters:
            await asyncio.sleep(0)
        ch.send(b"two")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.wait_for(ach.recv(), WAIT) == b"two"

        # Cancel after the eventfd fired but before the task resumed (in
        # whichever order the loop runs them, nothing is lost or duplicated).
        task = asyncio.create_task(ach.recv())
        while not ach._waiters:
            await asyncio.sleep(0)
        ch.send(b"three")
        while any(not w.fut.done() for w in list(ach._waiters)):
            await asyncio.sleep(0)
        task.cancel()
        got = []
        try:
            got.append(await task)
        except asyncio.CancelledError:
            pass
        if not got:
            got.append(await asyncio.wait_for(ach.recv(), WAIT))
        assert got == [b"three"]
        with pytest.raises(Empty):
            ch.recv_nowait()

        # recv_view: same guarantee.
        task = asyncio.create_task(ach.recv_view())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ch.send(b"four")
        with await asyncio.wait_for(ach.recv_view(), WAIT) as v:
            assert bytes(v) == b"four"
        assert ch.views_outstanding == 0

    run(main)
    ch.close()


@pytest.mark.timeout(30)
def test_channel_close_wakes_pending_recv(run):
    ch = Channel(capacity=4096)

    async def main():
        ach = AsyncChannel(ch)
        task = asyncio.create_task(ach.recv())
        while not ach._waiters:
            await asyncio.sleep(0)
        ach.close()
        with pytest.raises(ValueError):
            await asyncio.wait_for(task, WAIT)
        with pytest.raises(ValueError):
            await ach.recv()
        with pytest.raises(ValueError):
            await ach.send(b"x")

    run(main)
    assert ch._closed


def _producer_one_then_hang(ch: Channel, gate: Gate) -> None:
    ch.send(b"last words")
    gate.set()
    select.select([], [], [], WAIT * 3)


@pytest.mark.timeout(60)
def test_channel_recv_raises_peer_dead_when_producer_is_killed(run, gate):
    ch = Channel(capacity=4096)
    with Forked(_producer_one_then_hang, ch, gate) as child:
        gate.wait()

        async def main():
            ach = AsyncChannel(ch, check_interval=30.0)   # the pidfd must wake us
            assert await ach.recv() == b"last words"
            task = asyncio.create_task(ach.recv())
            while not ach._waiters:
                await asyncio.sleep(0)
            child.kill()
            with pytest.raises(PeerDead):
                await asyncio.wait_for(task, WAIT)
        run(main)
    ch.close()


@pytest.mark.timeout(60)
def test_channel_producer_close_ends_pending_recv(run, gate):
    ch = Channel(capacity=4096)
    with Forked(_producer_then_close, ch, gate, [b"a"]) as child:
        async def main():
            ach = AsyncChannel(ch, check_interval=30.0)   # the close's kick wakes us
            assert await ach.recv() == b"a"
            task = asyncio.create_task(ach.recv())
            while not ach._waiters:
                await asyncio.sleep(0)
            gate.set()
            with pytest.raises(ChannelClosed):
                await asyncio.wait_for(task, WAIT)
        run(main)
        assert child.join() == 0
    ch.close()


# --- AsyncChannel: send --------------------------------------------------------------

def _consumer_gated(ch: Channel, gate: Gate, n: int, size: int) -> None:
    gate.wait()
    for i in range(n):
        m = ch.recv(timeout=WAIT)
        assert m == bytes([i & 0xff]) * size, i
    with pytest.raises(ChannelClosed):
        ch.recv(timeout=WAIT)


@pytest.mark.timeout(60)
def test_channel_send_waits_for_room_without_blocking_loop(run, gate):
    n, size = 300, 500
    ch = Channel(capacity=4096, num=8)          # fills after a few messages
    with Forked(_consumer_gated, ch, gate, n, size) as child:
        async def main():
            ach = AsyncChannel(ch)
            ticker = Ticker(gate).start()       # the consumer starts after TICKS
            for i in range(n):
                await ach.send(bytes([i & 0xff]) * size)
            ach.close()                         # producer close: consumer sees the end
            return await ticker.stop()
        ticks = run(main)
        assert child.join() == 0
    assert ticks >= TICKS


@pytest.mark.timeout(30)
def test_channel_cancelled_send_sends_nothing(run):
    ch = Channel(capacity=256, num=4)

    async def main():
        ach = AsyncChannel(ch)
        sent = 0
        while True:                           # fill it
            try:
                ch.send(b"%03d" % sent + b"." * 60, False)
            except vringipc.Full:
                break
            sent += 1
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ach.send(b"never"), 0.05)
        got = [ch.recv_nowait() for _ in range(sent)]
        with pytest.raises(Empty):
            ch.recv_nowait()                  # the cancelled send left nothing
        await ach.send(b"after")
        assert await ach.recv() == b"after"
        return got

    got = run(main)
    assert [g[:3] for g in got] == [b"%03d" % i for i in range(len(got))]
    ch.close()


@pytest.mark.skipif(not HAS_ARM, reason="ChannelSender.arm() not in this build (polling fallback)")
@pytest.mark.timeout(60)
def test_channel_send_is_woken_by_the_call_eventfd(run, gate):
    n, size = 50, 1000
    ch = Channel(capacity=4096, num=8)
    with Forked(_consumer_gated, ch, gate, n, size) as child:
        async def main():
            ach = AsyncChannel(ch, check_interval=30.0)
            assert ach.send_uses_eventfd
            ticker = Ticker(gate).start()
            for i in range(n):
                await asyncio.wait_for(ach.send(bytes([i & 0xff]) * size), WAIT)
            ach.close()
            await ticker.stop()
        run(main)
        assert child.join() == 0


# --- AsyncQueue ---------------------------------------------------------------------

def _queue_producer_gated(q, gate: Gate, n: int) -> None:
    for i in range(n // 2):
        q.put((i, "x" * (i % 50)))
    gate.wait()
    for i in range(n // 2, n):
        q.put((i, "x" * (i % 50)))


@pytest.mark.timeout(60)
def test_queue_get_does_not_block_loop(run, gate):
    n = 1000
    q = Queue(capacity=1 << 16)
    with Forked(_queue_producer_gated, q, gate, n) as child:
        async def main():
            aq = AsyncQueue(q)
            ticker = Ticker(gate).start()
            got = [await aq.get() for _ in range(n)]
            assert _sleepers(q, "get_sleepers") == 0
            return got, await ticker.stop()
        got, ticks = run(main)
        assert child.join() == 0
    q.close()
    assert got == [(i, "x" * (i % 50)) for i in range(n)]
    assert ticks >= TICKS


@pytest.mark.timeout(60)
def test_queue_get_is_woken_by_the_kick_not_by_polling(run, gate):
    q = Queue(capacity=1 << 16)
    with Forked(_queue_producer_gated, q, gate, 2) as child:
        async def main():
            aq = AsyncQueue(q, check_interval=30.0)
            assert await aq.get() == (0, "")
            ticker = Ticker(gate).start()
            assert await asyncio.wait_for(aq.get(), WAIT) == (1, "x")
            await ticker.stop()
        run(main)
        assert child.join() == 0
    q.close()


def _queue_consumer_gated(q, gate: Gate, n: int) -> None:
    gate.wait()
    for i in range(n):
        assert q.get(timeout=WAIT) == i


@pytest.mark.timeout(60)
def test_queue_put_waits_for_room_without_blocking_loop(run, gate):
    n = 200
    q = Queue(maxsize=4, capacity=1 << 16)
    with Forked(_queue_consumer_gated, q, gate, n) as child:
        async def main():
            aq = AsyncQueue(q, check_interval=30.0)   # call-eventfd driven
            ticker = Ticker(gate).start()
            for i in range(n):
                await asyncio.wait_for(aq.put(i), WAIT)
            assert _sleepers(q, "put_sleepers") == 0
            return await ticker.stop()
        ticks = run(main)
        assert child.join() == 0
    q.close()
    assert ticks >= TICKS


def _joinable_worker(q, gate: Gate, n: int) -> None:
    gate.wait()
    for _ in range(n):
        q.get(timeout=WAIT)
        q.task_done()


@pytest.mark.timeout(60)
def test_joinable_queue_async_join(run, gate):
    n = 20
    q = JoinableQueue(capacity=1 << 16)
    for i in range(n):
        q.put(i)
    with Forked(_joinable_worker, q, gate, n) as child:
        async def main():
            aq = AsyncQueue(q, check_interval=30.0)   # join-eventfd driven
            ticker = Ticker(gate).start()
            await asyncio.wait_for(aq.join(), WAIT)
            assert q._core.unfinished_tasks() == 0
            assert _sleepers(q, "join_sleepers") == 0
            await ticker.stop()
        run(main)
        assert child.join() == 0
    q.close()


@pytest.mark.timeout(30)
def test_queue_cancelled_get_loses_nothing_and_withdraws(run):
    q = Queue(capacity=1 << 16)

    async def main():
        aq = AsyncQueue(q)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(aq.get(), 0.05)
        assert _sleepers(q, "get_sleepers") == 0       # announcement withdrawn
        task = asyncio.create_task(aq.get())
        while not aq._waiters:
            await asyncio.sleep(0)
        assert _sleepers(q, "get_sleepers") == 1       # announced while waiting
        q.put("one")
        task.cancel()
        got = []
        try:
            got.append(await task)
        except asyncio.CancelledError:
            pass
        assert _sleepers(q, "get_sleepers") == 0
        if not got:
            got.append(await asyncio.wait_for(aq.get(), WAIT))
        assert got == ["one"]
        assert q.empty()

    run(main)
    q.close()


@pytest.mark.timeout(30)
def test_queue_cancelled_put_puts_nothing(run):
    q = Queue(maxsize=2, capacity=1 << 16)

    async def main():
        aq = AsyncQueue(q)
        await aq.put(1)
        await aq.put(2)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(aq.put(3), 0.05)
        assert _sleepers(q, "put_sleepers") == 0
        assert [await aq.get(), await aq.get()] == [1, 2]
        assert q.empty()

    run(main)
    q.close()


class _CountingWords:
    """Forwards to a SharedWords, keeping the net add32 per offset."""

    def __init__(self, words):
        self._w = words
        self.net = {}

    def add32(self, off, v):
        self.net[off] = (self.net.get(off, 0) + (v if v < 1 << 31 else v - (1 << 32)))
        return self._w.add32(off, v)

    def __getattr__(self, name):
        return getattr(self._w, name)


@pytest.mark.timeout(30)
def test_queue_close_wakes_pending_get(run):
    q = Queue(capacity=1 << 16)
    counting = q._ring.words = _CountingWords(q._ring.words)
    off = QUEUE_OFFSETS["get_sleepers"]

    async def main():
        aq = AsyncQueue(q)
        task = asyncio.create_task(aq.get())
        while not aq._waiters:
            await asyncio.sleep(0)
        assert q._ring.words.load32(off) == 1
        aq.close()                              # withdraws, wakes, closes
        if not HAS_SLEEP_BEGIN:
            assert counting.net.get(off, 0) == 0
        with pytest.raises(ValueError):
            await asyncio.wait_for(task, WAIT)
        with pytest.raises(ValueError):
            await aq.put(1)

    run(main)
    assert q._closed


@pytest.mark.timeout(30)
def test_simple_queue_wrapper(run):
    q = SimpleQueue(capacity=1 << 16)

    async def main():
        async with AsyncQueue(q) as aq:
            getter = asyncio.create_task(aq.get())
            await asyncio.sleep(0.01)
            await aq.put({"k": [1, 2, 3]})
            assert await asyncio.wait_for(getter, WAIT) == {"k": [1, 2, 3]}

    run(main)


def _queue_user_exits(q) -> None:
    q.put("bye")


@pytest.mark.timeout(60)
def test_queue_get_raises_peer_dead_when_everyone_else_is_gone(run):
    q = Queue(capacity=1 << 16)
    with pytest.raises(Empty):
        q.get_nowait()                  # register this process before the child
    with Forked(_queue_user_exits, q) as child:
        assert child.join() == 0

        async def main():
            aq = AsyncQueue(q)
            assert await aq.get() == "bye"
            with pytest.raises(PeerDead):
                await asyncio.wait_for(aq.get(), WAIT)
            assert _sleepers(q, "get_sleepers") == 0
        run(main)
    q.close()


@pytest.mark.timeout(30)
def test_queue_peer_dead_when_peer_died_before_we_registered():
    # Blocking API, no asyncio: the child uses the queue and exits before the
    # parent's first call; the parent's _register() takes over the dead
    # child's slot, _check_peers() then sees no other process at all.
    q = Queue(capacity=1 << 16)
    try:
        with Forked(_queue_user_exits, q) as child:
            assert child.join() == 0
        assert q.get(timeout=WAIT) == "bye"
        with pytest.raises(PeerDead):
            q.get()                     # blocked for good: the only other user is gone
        with pytest.raises(Empty):
            q.get(timeout=0.2)          # with a timeout: Empty, as multiprocessing
    finally:
        q.close()
