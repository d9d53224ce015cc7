"""vringipc.Queue.get_nocopy(): zero-copy NumPy arrays over the shared segment.

get_nocopy() returns objects whose out-of-band buffers are read-only views of
the queue's shared memory, pinned (producers cannot reuse the bytes) until the
last view is garbage-collected, or until the process holding them dies.
get() returns private, writable copies.  Children are forked and always reaped;
no assertion depends on timing."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import numpy as np
import pytest

from vringipc import Full, Queue

from forking import Forked, Pipe

WAIT = 20.0
N = 5000                     # float64 elements: 40 KB messages in a 256 KB queue
CAP = 256 * 1024


@pytest.fixture
def q():
    qq = Queue(capacity=CAP)
    yield qq
    gc.collect()
    qq.close()


def in_segment(q, arr) -> bool:
    seg = np.frombuffer(q._ring.segment.buf, np.uint8)
    try:
        return bool(np.shares_memory(arr, seg))
    finally:
        del seg


def traffic_until_full(q, tag: float, rounds: int = 100) -> bool:
    """put_nowait/get 40 KB messages round after round (the consumer keeps up,
    the arena head goes round and round, around any pinned message): True
    once a put finds no room."""
    for i in range(rounds):
        try:
            q.put_nowait(np.full(N, tag + i))
        except Full:
            return True
        b = q.get(timeout=WAIT)
        assert b[0] == tag + i and b[-1] == tag + i
    return False


# --- what get_nocopy / get return -------------------------------------------------------------

def test_get_nocopy_returns_read_only_views_of_the_segment(q):
    a = np.arange(1000, dtype=np.float64)
    f = np.asfortranarray(np.arange(60, dtype=np.int32).reshape(6, 10))
    q.put(a)
    q.put({"f": f, "pair": [a[:10].copy(), np.ones(3, np.uint8)], "s": "text"})
    x = q.get_nocopy()
    assert np.array_equal(x, a)
    assert in_segment(q, x)
    assert not x.flags.writeable
    with pytest.raises(ValueError):
        x[0] = 1.0
    with pytest.raises(ValueError):
        x.setflags(write=True)
    d = q.get_nocopy()
    assert d["s"] == "text"
    assert np.array_equal(d["f"], f) and d["f"].flags.f_contiguous
    for arr in (d["f"], *d["pair"]):
        assert in_segment(q, arr) and not arr.flags.writeable
    assert np.array_equal(d["pair"][0], a[:10])
    assert q._core.held_messages() == 2
    del x, d, arr
    gc.collect()
    assert q._core.held_messages() == 0


def test_get_returns_private_writable_copies(q):
    a = np.arange(1000, dtype=np.float64)
    q.put(a)
    q.put(a)
    x = q.get()
    assert np.array_equal(x, a)
    assert not in_segment(q, x)
    assert x.flags.writeable
    x[:] = -1                                   # does not touch the queued copy
    y = q.get()
    assert np.array_equal(y, a) and not np.shares_memory(x, y)
    assert q._core.held_messages() == 0


# --- pinning -----------------------------------------------------------------------------------

def test_nocopy_array_is_pinned_until_collected(q):
    q.put(np.full(N, -1.0))
    a = q.get_nocopy()
    s = a[::7]                                  # a view of the view keeps the pin too
    assert q._core.held_messages() == 1
    # The consumer keeps up and the arena head comes round again and again:
    # the producers go around the held bytes and never overwrite them.
    assert not traffic_until_full(q, 0.0), "the stream stalled behind a pinned message"
    assert (a == -1.0).all(), "producers ran over a pinned message"
    del a
    gc.collect()
    assert q._core.held_messages() == 1         # s still pins it
    assert not traffic_until_full(q, 1000.0)
    assert (s == -1.0).all()
    del s
    gc.collect()
    assert q._core.held_messages() == 0
    assert not traffic_until_full(q, 2000.0), "traffic did not resume after release"


def _hold_nocopy(q, pipe_up: Pipe, pipe_down: Pipe):
    a = q.get_nocopy()
    ok = bool((a == -1.0).all()) and not a.flags.writeable
    pipe_up.send(b"g" if ok else b"b")
    assert pipe_down.recv(60) == b"c"           # parent: "check it now"
    pipe_up.send(b"k" if (a == -1.0).all() else b"x")
    while True:
        signal.pause()                          # holding `a` until killed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reap", [True, pytest.param(False)], ids=["reaped", "zombie"])
def test_pin_of_a_dead_consumer_is_reclaimed(q, reap):
    up, down = Pipe(), Pipe()
    k = None
    try:
        q.put(np.full(N, -1.0))
        k = Forked(_hold_nocopy, q, up, down)
        assert up.recv() == b"g"
        assert q._core.held_messages() == 1
        assert not traffic_until_full(q, 0.0), "the stream stalled behind the child's pin"
        down.send(b"c")
        assert up.recv() == b"k", "the child's nocopy array changed under it"
        os.kill(k.pid, signal.SIGKILL)
        if reap:
            k.kill()                            # reap
        else:                                   # dead, but left a zombie for now
            os.waitid(os.P_PID, k.pid, os.WEXITED | os.WNOWAIT)
        assert not traffic_until_full(q, 1000.0), "the dead consumer's pin was not reclaimed"
        assert q._core.held_messages() == 0
    finally:
        if k is not None:
            k.kill()
        up.close()
        down.close()


def test_nocopy_array_from_an_exited_thread_stays_pinned(q):
    q.put(np.full(N, -1.0))
    box = []
    t = threading.Thread(target=lambda: box.append((q.get_nocopy(), threading.get_native_id())))
    t.start()
    t.join()
    a, tid = box.pop()
    # Thread.join() returns before the OS thread is gone: wait until it is.
    end = time.monotonic() + WAIT
    while True:
        try:
            os.kill(tid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < end, "the thread did not go away"
        time.sleep(0.001)
    full = traffic_until_full(q, 0.0)
    assert (a == -1.0).all(), "a live nocopy array was overwritten"
    assert not full
    assert q._core.held_messages() == 1


def _close_while_held():
    qq = Queue(capacity=CAP)
    qq.put(np.arange(N, dtype=np.float64))
    a = qq.get_nocopy()
    qq.close()                                  # the mapping must outlive the close
    assert np.array_equal(a, np.arange(N, dtype=np.float64))
    del a
    gc.collect()


@pytest.mark.timeout(30)
def test_nocopy_array_outlives_queue_close():
    k = Forked(_close_while_held)               # a dangling mapping would crash: in a child
    try:
        assert k.join() == 0
    finally:
        k.kill()


def test_nocopy_in_a_loop_does_not_leak_pins(q):
    for i in range(200):
        q.put(np.full(N, float(i)), timeout=WAIT)
        a = q.get_nocopy(timeout=WAIT)
        assert a[0] == i and a[-1] == i
        del a
    gc.collect()
    assert q._core.held_messages() == 0
    assert not traffic_until_full(q, 0.0)
