"""The wait policy of issue 10 (cython_src/vr_wait.h): each side of a Queue /
Channel publishes a hint word (its CPU, RUNNING or ASLEEP) in the segment
header; waiters poll only while the peer runs on another CPU and yield or
sleep otherwise.  Hints never carry a wake-up: these tests check that the
words say what they should and that a waiter is served whatever they say
(asleep, forged, garbage).  No timing is asserted."""

from __future__ import annotations

import contextlib
import os

import pytest

from forking import Forked, Pipe, wait_for
from vringipc import Channel, Queue, SimpleQueue
from vringipc.errors import Empty, Full
from vringipc import layout as L
from vringipc._ring import WAIT_ASLEEP, WAIT_OFFSETS, WAIT_RUNNING, wait_hint

PROD, CONS = WAIT_OFFSETS["queue_producer"], WAIT_OFFSETS["queue_consumer"]
DRV, DEV = WAIT_OFFSETS["channel_driver"], WAIT_OFFSETS["channel_device"]


_AFFINITY = os.sched_getaffinity(0)


def _buf(obj):
    ring = obj._ring if not isinstance(obj, SimpleQueue) else obj._q._ring
    return ring.segment.buf


def _running_here(buf, off):
    cpu, st = wait_hint(buf, off)
    return st == WAIT_RUNNING and cpu in os.sched_getaffinity(0)


def test_offsets_are_free_lines_of_the_header():
    # own 64-byte lines, inside the reserved block (Channel) / the free
    # application lines below the process table (Queue)
    assert all(off % 64 == 0 for off in WAIT_OFFSETS.values())
    assert L.DEVICE_LIVENESS_OFF + 128 <= DRV < DEV < L.APP_AREA_OFF
    assert 0x548 + 4 <= PROD < CONS < 0x600
    from vringipc._ring import QUEUE_OFFSETS
    assert max(QUEUE_OFFSETS.values()) < PROD


def test_queue_hints_follow_put_and_get():
    q = Queue()
    try:
        buf = _buf(q)
        assert wait_hint(buf, PROD) == (-1, 0) and wait_hint(buf, CONS) == (-1, 0)
        q.put(1)
        assert _running_here(buf, PROD)
        assert q.get() == 1
        assert _running_here(buf, CONS)
    finally:
        q.close()


def test_queue_consumer_asleep_is_published_and_woken():
    """A consumer blocked in get() says ASLEEP; a put wakes it; the next get
    says RUNNING again."""
    q = Queue(spin=0)
    out = Pipe()
    try:
        def child():
            out.send(b"h" if q.get() == "hello" else b"?")
            q.get()
        with Forked(child) as f:
            buf = _buf(q)
            wait_for(lambda: wait_hint(buf, CONS)[1] == WAIT_ASLEEP, "consumer hint ASLEEP")
            q.put("hello")
            assert out.recv() == b"h"
            q.put("bye")
            assert f.join() == 0
        assert wait_hint(buf, CONS)[1] == WAIT_RUNNING
    finally:
        q.close()


@pytest.mark.parametrize("forged", ["same_cpu_running", "asleep", "garbage", "other_cpu"])
def test_queue_waiter_served_whatever_the_peer_hint_says(forged):
    """The hint only chooses poll / yield / sleep: a lying or garbage peer
    word never loses a message, with spinning (default) and without."""
    q = Queue()
    out = Pipe()
    try:
        buf = _buf(q)
        me = min(os.sched_getaffinity(0))
        word = {"same_cpu_running": ((me + 1) << 2) | WAIT_RUNNING,
                "asleep": ((me + 1) << 2) | WAIT_ASLEEP,
                "garbage": 0xFFFFFFFF,
                "other_cpu": ((me + 2) << 2) | WAIT_RUNNING}[forged]

        def child():
            for _ in range(50):
                q._ring.words.store32(PROD, word)        # re-forge before every wait
                out.send(bytes([q.get()]))
        with Forked(child) as f:
            for i in range(50):
                q.put(i)
                assert out.recv() == bytes([i])
            assert f.join() == 0
    finally:
        q.close()


def test_queue_full_put_waits_and_is_served():
    """A producer waiting for room (the put side of the policy) is served."""
    q = Queue(maxsize=1)
    try:
        q.put(0)

        def child():
            for i in range(1, 20):
                q.put(i)
        with Forked(child) as f:
            got = [q.get() for _ in range(20)]
            assert f.join() == 0
        assert got == list(range(20))
        assert wait_hint(_buf(q), PROD)[1] in (WAIT_RUNNING, WAIT_ASLEEP)
        stats = q._core.wait_stats()
        assert set(stats) == {"get", "put"}
    finally:
        q.close()


def test_channel_hints_and_asleep_receiver_woken():
    ch = Channel(spin=0)
    out = Pipe()
    try:
        buf = ch._ring.segment.buf

        def child():
            out.send(b"p" if ch.recv() == b"ping" else b"?")
        with Forked(child) as f:
            wait_for(lambda: wait_hint(buf, DEV)[1] == WAIT_ASLEEP, "receiver hint ASLEEP")
            ch.send(b"ping")
            assert out.recv() == b"p"
            assert f.join() == 0
        assert _running_here(buf, DRV)
    finally:
        ch.close()


def test_channel_ping_pong_on_one_cpu():
    """Both processes on one CPU (the yield path): every message arrives."""
    a, b = Channel(), Channel()
    cpu = min(os.sched_getaffinity(0))
    try:
        def child():
            os.sched_setaffinity(0, {cpu})
            for _ in range(200):
                b.send(a.recv())
        with Forked(child) as f:
            os.sched_setaffinity(0, {cpu})
            try:
                for i in range(200):
                    a.send(b"%d" % i)
                    assert b.recv() == b"%d" % i
            finally:
                os.sched_setaffinity(0, _AFFINITY)
            assert f.join() == 0
    finally:
        a.close()
        b.close()


def test_bare_buffer_rings_have_no_hints():
    """A ring over a plain buffer (no vringipc header) never writes hint words."""
    from vringipc._ring import ChannelReceiver
    buf = bytearray(1 << 16)
    rx = ChannelReceiver(buf, 16, 0x1000, 0x1100, 0x2000, 0x3000, 0x1000, spin_ns=1000)
    with pytest.raises(Empty):
        rx.recv(timeout=0.001)
    assert not any(buf[0x300:0x400])
    rx.close()


def _echo_n(qa, qb, n):
    for _ in range(n):
        qb.put(qa.get())


def _put_n(q, n):
    for i in range(n):
        q.put(i)


@pytest.mark.timeout(25)
def test_a_long_spin_misses_no_put_or_take():
    # A waiter that spins (here up to 30 s, the benchmark's "spin" policy)
    # must notice a put or take that lands between its failed attempt and
    # the start of its spin.  It once did not, and spun out its whole budget:
    # a ping-pong stalled 30 s in about one run of `vringipc bench compare`
    # in two.  Two thousand round trips (the get side) and a maxsize-1 stream
    # (the put side) each take well under a second when nothing is missed;
    # one miss costs 30 s, past this test's timeout (the calls have none: a
    # timeout would end the spin early and hide the miss).
    qa, qb = Queue(spin=30.0), Queue(spin=30.0)
    with Forked(_echo_n, qa, qb, 2000) as c:
        for i in range(2000):
            qa.put(i)
            assert qb.get() == i
        assert c.join() == 0
    q1 = Queue(1, spin=30.0)
    with Forked(_put_n, q1, 2000) as c:
        assert [q1.get() for _ in range(2000)] == list(range(2000))
        assert c.join() == 0
    for q in (qa, qb, q1):
        q.close()


def _put_rounds(q, arr, fit, rounds, go):
    for _ in range(rounds):
        os.read(go, 1)
        for _ in range(fit):
            q.put(arr)


@pytest.mark.timeout(25)
@pytest.mark.parametrize("producer", ["thread", "process"])
def test_a_put_waiting_for_room_held_by_views_does_not_spin_out(producer):
    # Room held by zero-copy views comes back when the consumer drops them,
    # and no take comes with it: a put that spun waiting for a take spun its
    # whole budget (here 30 s, past this test's timeout) before it slept and
    # was woken by the release.  Each round the consumer holds a full arena,
    # lets the producer start its next round (whose first put must wait),
    # then releases.  (Before the fix: failed 4 runs of 4.)
    np = pytest.importorskip("numpy")
    import threading
    import time
    arr = np.ones(100 << 10, np.uint8)
    q = Queue(64, capacity=1 << 20, spin=30.0)
    held = []
    while True:                                   # how many fit: the arena's room
        try:
            q.put(arr, block=False)
        except Full:
            break
        held.append(q.get_nocopy())
    fit = len(held)
    assert 2 <= fit < 64                          # the arena bounds it, not maxsize
    held.clear()
    rounds = 10
    r, w = os.pipe()
    args = (q, arr, fit, rounds, r)
    t = threading.Thread(target=_put_rounds, args=args, daemon=True)
    try:
        with (Forked(_put_rounds, *args) if producer == "process"
              else contextlib.nullcontext()) as c:
            if producer == "thread":
                t.start()
            os.write(w, b"g")
            for k in range(rounds):
                held = [q.get_nocopy(timeout=20) for _ in range(fit)]
                assert all((a == 1).all() for a in held)
                if k + 1 < rounds:
                    os.write(w, b"g")             # its next put waits for room
                    time.sleep(0.05)
                held.clear()                      # the release: room, no take
            if producer == "thread":
                t.join(20)
                assert not t.is_alive()
            else:
                assert c.join() == 0
    finally:
        os.close(r)
        os.close(w)
        q.close()
