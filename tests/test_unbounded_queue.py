"""maxsize=0 is unbounded, as in the stdlib (issue 9): put() never blocks and
never raises Full, the ring's size does not bound the item count, and the
items wait in shared memory, so a producer may exit right after put().
Where the stdlib defines the behaviour the test runs against it too."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue

import numpy as np
import pytest

from vringipc import Queue

from forking import Forked

WAIT = 20.0


def _mp_queue():
    return mp.get_context("fork").Queue()


QUEUES = {"vringipc": Queue, "multiprocessing": _mp_queue}


@pytest.fixture(params=sorted(QUEUES))
def make_queue(request):
    made = []

    def make():
        q = QUEUES[request.param]()
        made.append(q)
        return q
    yield make
    for q in made:
        q.close()
        q.join_thread()


@pytest.mark.timeout(120)
def test_a_million_small_items_before_any_consumer(make_queue):
    q = make_queue()
    n = 1_000_000 if isinstance(q, Queue) else 200_000     # the stdlib's is slow at it
    for i in range(n):
        q.put_nowait(i)                          # never Full, never blocks
    for i in range(n):
        assert q.get(timeout=WAIT) == i


@pytest.mark.timeout(60)
def test_64_one_mib_arrays_before_any_consumer(make_queue):
    q = make_queue()
    for i in range(64):
        q.put_nowait(np.full(1 << 20, i % 251, dtype=np.uint8))
    for i in range(64):
        a = q.get(timeout=WAIT)
        assert a.nbytes == 1 << 20 and a[0] == i % 251 and a[-1] == i % 251


@pytest.mark.timeout(120)
def test_ten_100_mib_arrays_and_the_memory_comes_back():
    q = Queue()
    for i in range(10):
        q.put(np.full(100 << 20, i, dtype=np.uint8))
    assert q._core.reserved_bytes >= 1000 << 20       # committed as it came
    for i in range(10):
        a = q.get(timeout=WAIT)
        assert a[0] == i and a[-1] == i
    del a
    assert q._core.reserved_bytes <= 4 << 20          # given back after the drain
    q.close()


@pytest.mark.timeout(60)
def test_trims_are_rate_limited_and_a_sleeping_consumer_finishes_them():
    # A stream whose bursts pass the retained chunks drains over and over:
    # giving the chunks back at every drain made each burst commit (zero)
    # them again.  A process trims at most every trim_every_ns; what it
    # skipped is given back by a consumer that sleeps on the drained queue.
    q = Queue()
    burst = [np.full(1 << 20, i, dtype=np.uint8) for i in range(12)]
    q._core.trim_every_ns = 3600 * 10**9
    for rnd in range(3):
        for a in burst:
            q.put(a)
        for i in range(len(burst)):
            assert q.get(timeout=WAIT)[0] == i
        if rnd == 0:
            assert q._core.reserved_bytes <= 4 << 20      # the first drain trims
        else:
            assert q._core.reserved_bytes >= 12 << 20     # later ones within the hour do not
    q._core.trim_every_ns = 10_000_000
    with pytest.raises(queue.Empty):
        q.get(timeout=0.5)                                 # sleeps > one slice: trims
    assert q._core.reserved_bytes <= 4 << 20
    q.close()


def _put_and_exit(q, n):
    for i in range(n):
        q.put(("item", i))
    os._exit(0)                                        # no feeder thread to wait for


@pytest.mark.timeout(60)
def test_a_producer_may_exit_right_after_put():
    """Better than the stdlib: its feeder thread would hold the exit (or,
    with os._exit, lose what it had not flushed); here every item put is in
    shared memory when put() returns."""
    q = Queue()
    with Forked(_put_and_exit, q, 50_000) as k:
        assert k.join() == 0
    assert [q.get(timeout=WAIT) for _ in range(50_000)] == [("item", i) for i in range(50_000)]
    assert q.qsize() == 0 and q.empty()
    q.close()


def test_items_beyond_the_ring_keep_fifo_order_and_qsize():
    q = Queue(num=8)                                   # a tiny ring: batches at once
    for i in range(5000):
        q.put(b"%d" % i if i % 2 else i)
    assert q.qsize() == 5000
    for i in range(5000):
        assert q.get(timeout=WAIT) == (b"%d" % i if i % 2 else i)
    assert q.qsize() == 0
    q.close()
