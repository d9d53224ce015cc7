"""Queue lifecycle and threads (issue 8): the conditions users live in.

Several threads of several processes on one queue, close() while another
thread is blocked, fork with live zero-copy results, a stopped lock owner,
PeerDead with threads, JoinableQueue.join when workers die, the arena
position wrap, raw messages.  Where the stdlib defines the behaviour the
same test runs against multiprocessing's queues.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as stdqueue
import signal
import threading
import time

import numpy as np
import pytest

from vringipc import JoinableQueue, PeerDead, Queue, SimpleQueue
from vringipc._ring import LOCK_TID_MASK, QUEUE_OFFSETS, QueueCore
from vringipc.queue import MSG_PICKLE, MSG_RAW_BYTES

from forking import Forked, Gate, reaped, wait_for

WAIT = 10.0


def _mp_queue(**kw):
    return mp.get_context("fork").Queue(**kw)


QUEUES = {"vringipc": lambda **kw: Queue(capacity=8 << 20, **kw), "multiprocessing": _mp_queue}


@pytest.fixture(params=sorted(QUEUES))
def make_queue(request):
    made = []

    def make(**kw):
        q = QUEUES[request.param](**kw)
        made.append(q)
        return q
    yield make
    for q in made:
        q.close()
        if hasattr(q, "join_thread"):
            q.join_thread()


# --- N threads in each of M processes ------------------------------------------------

def _item(src: int, i: int):
    """Item i of producer thread src: bytes, a dict or a NumPy array."""
    k = i % 3
    if k == 0:
        return b"%d:%d:" % (src, i) + b"b" * (16 + i % 200)
    if k == 1:
        return {"src": src, "i": i, "pad": "x" * (i % 50)}
    return np.full(8 + i % 40, src * 1_000_000 + i, dtype=np.int64)


def _producer_proc(q, base: int, threads: int, per_thread: int):
    def run(t):
        src = base + t
        for i in range(per_thread):
            q.put(_item(src, i))
    ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def _consumer_proc(q, out, threads: int, count: int, errors):
    got = []
    lock = threading.Lock()
    remaining = [count]

    def run():
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            obj = q.get(timeout=WAIT)
            try:
                if type(obj) is np.ndarray:
                    v = int(obj[0])
                    src, i = divmod(v, 1_000_000)
                    assert obj.dtype == np.int64 and len(obj) == 8 + i % 40 and (obj == v).all()
                    assert i % 3 == 2
                else:
                    src, i = _decode_plain(obj)
                with lock:
                    got.append((src, i))
            except BaseException as e:       # a wrong object: report it, keep going
                with lock:
                    errors.put(repr(e)[:200])
    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put(got)


def _decode_plain(obj):
    if type(obj) is bytes:
        src, i, pad = obj.split(b":", 2)
        src, i = int(src), int(i)
        assert i % 3 == 0 and pad == b"b" * (16 + i % 200), "bytes item damaged"
        return src, i
    assert type(obj) is dict, f"expected a dict, got {type(obj).__name__}"
    assert obj["i"] % 3 == 1 and obj["pad"] == "x" * (obj["i"] % 50)
    return obj["src"], obj["i"]


@pytest.mark.timeout(120)
def test_threads_in_several_processes_every_item_once_and_of_its_type(make_queue):
    """2 producer processes x 3 threads, 2 consumer processes x 3 threads:
    bytes, dicts and NumPy arrays each arrive exactly once, as what was put."""
    ctx = mp.get_context("fork")
    q = make_queue()
    out, errors = ctx.Queue(), ctx.Queue()
    P, PT, PER = 2, 3, 1500
    total = P * PT * PER
    C, CT = 2, 3
    per_consumer = [total // C + (1 if k < total % C else 0) for k in range(C)]
    prods = [ctx.Process(target=_producer_proc, args=(q, 100 * (p + 1), PT, PER)) for p in range(P)]
    cons = [ctx.Process(target=_consumer_proc, args=(q, out, CT, per_consumer[k], errors))
            for k in range(C)]
    for p in prods + cons:
        p.start()
    try:
        got = []
        for _ in cons:
            got += out.get(timeout=90)
        for p in prods + cons:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in prods + cons:
            if p.is_alive():
                p.kill()
                p.join()
    errs = []
    while not errors.empty():
        errs.append(errors.get())
    assert errs == []
    expected = {(100 * (p + 1) + t, i) for p in range(P) for t in range(PT) for i in range(PER)}
    assert len(got) == total and set(got) == expected
    out.close()
    errors.close()


@pytest.mark.timeout(60)
def test_threads_of_one_process_get_the_right_objects():
    """The bug of issue 8 item 1: mixed bytes and pickles, four consumer
    threads; a kind kept on the shared core made pickles come back as bytes."""
    q = Queue(capacity=4 << 20)
    N = 20000
    bad, got = [], []
    lock = threading.Lock()

    def consume(n):
        for _ in range(n):
            obj = q.get(timeout=WAIT)
            ok = (type(obj) is bytes and obj.startswith(b"raw")) or \
                 (type(obj) is tuple and obj[0] == "obj")
            with lock:
                (got if ok else bad).append(obj)

    def produce(k):
        for i in range(N // 2):
            q.put(b"raw%06d" % i + b"." * 16 if (i + k) % 2 else ("obj", i))
    ts = [threading.Thread(target=consume, args=(N // 4,)) for _ in range(4)]
    ts += [threading.Thread(target=produce, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    q.close()
    assert bad == [] and len(got) == N


# --- close() while another thread is blocked ------------------------------------------

def _close_while_blocked(kind: str, report_fd: int):
    """In a child: a thread blocks in the call, the main thread closes the
    queue; the thread must get a clear exception (a segfault kills the child)."""
    if kind == "simple.get":
        q = SimpleQueue(capacity=1 << 20)
    elif kind == "join":
        q = JoinableQueue(capacity=1 << 20)
        q.put("task")
    else:
        q = Queue(1 if kind == "put" else 0, capacity=1 << 20)
        if kind == "put":
            q.put("fill")
    result = []

    def blocked():
        try:
            if kind in ("get", "simple.get"):
                q.get()
            elif kind == "get_nocopy":
                q.get_nocopy()
            elif kind == "put":
                q.put("more")
            elif kind == "join":
                q.join()
            result.append("returned")
        except BaseException as e:
            result.append(type(e).__name__ + ": " + str(e))
    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.3)                   # well inside the sleep, past the spin
    q.close()
    t.join(5)
    os.write(report_fd, ("alive" if t.is_alive() else result[0]).encode())


@pytest.mark.parametrize("kind", ["get", "get_nocopy", "put", "join", "simple.get"])
@pytest.mark.timeout(30)
def test_close_while_another_thread_is_blocked(kind):
    r, w = os.pipe()
    with Forked(_close_while_blocked, kind, w) as k:
        code = k.join()
    os.close(w)
    msg = os.read(r, 500).decode()
    os.close(r)
    assert code == 0, f"child died ({code}): {msg}"
    if kind == "simple.get":
        assert msg.startswith("OSError") or msg.startswith("ValueError"), msg
    else:
        assert msg.startswith("ValueError") and "closed" in msg, msg


def test_sizes_keep_answering_after_close(make_queue):
    """qsize() and full() answer after close(), as the stdlib's do."""
    q = make_queue(maxsize=3)
    q.put(1)
    q.put(2)
    time.sleep(0.1)                   # mp.Queue's feeder thread
    q.close()
    assert q.qsize() == 2
    assert q.full() is False
    with pytest.raises(ValueError):
        q.put(3)
    with pytest.raises(ValueError):
        q.get_nowait()


# --- fork with a live zero-copy result ------------------------------------------------

def _drop_and_exit(holder):
    holder.clear()                     # drops the inherited array (its HeldMessage too)


@pytest.mark.timeout(30)
def test_forked_child_cannot_unpin_the_parents_zero_copy_result():
    q = Queue(capacity=64 << 10, num=64)
    q.put(np.full(4096, 7, dtype=np.uint8))
    kept = [q.get_nocopy(timeout=WAIT)]
    assert (kept[0] == 7).all()
    with Forked(_drop_and_exit, kept) as k:
        assert k.join() == 0
    assert q._core.held_messages() == 1          # still pinned for this process
    # Producers keep going: enough traffic to wrap the 64 KiB arena many
    # times over if the pin were gone.  With it, they stop at the pinned
    # bytes (MemoryError naming the held message), and the parent's array
    # keeps its content.
    for i in range(200):
        try:
            q.put(np.full(4096, 9, dtype=np.uint8), timeout=0.2)
        except MemoryError as e:             # unbounded: "arena full ... held"
            assert "held by zero-copy" in str(e)
            break
        q.get(timeout=WAIT)
    assert (kept[0] == 7).all()
    kept.clear()
    assert q._core.held_messages() == 0
    q.close()


# --- PeerDead and threads ---------------------------------------------------------------

def _use_and_exit(q):
    q.put("from child")


@pytest.mark.timeout(30)
def test_no_false_peerdead_while_a_thread_of_this_process_can_answer():
    """A put blocked on a full queue once every other process has exited is
    not PeerDead while a consumer thread of the same process is about to get."""
    q = Queue(1, capacity=1 << 20)
    with Forked(_use_and_exit, q) as k:
        assert k.join() == 0
    got = []

    def consumer():
        got.append(q.get(timeout=WAIT))      # used the queue: counts as a peer
        time.sleep(0.5)                      # the put below blocks meanwhile
        got.append(q.get(timeout=WAIT))
    t = threading.Thread(target=consumer)
    t.start()
    wait_for(lambda: got, "first get")
    q.put("x")                               # fills the queue
    q.put("y")                               # blocks until the thread gets "x"
    t.join(10)
    assert got == ["from child", "x"]
    assert q.get(timeout=WAIT) == "y"
    q.close()


@pytest.mark.timeout(30)
def test_peerdead_when_no_thread_and_no_process_is_left():
    q = Queue(1, capacity=1 << 20)
    with Forked(_use_and_exit, q) as k:
        assert k.join() == 0
    with pytest.raises(PeerDead):
        q.put("never taken")                 # the child's item fills the queue
    q.close()


# --- JoinableQueue.join ----------------------------------------------------------------

def _take_and_die(q):
    q.get(timeout=WAIT)
    os.kill(os.getpid(), signal.SIGKILL)     # mid-task: task_done() never comes


@pytest.mark.timeout(30)
def test_join_raises_peerdead_when_the_worker_dies_mid_task():
    q = JoinableQueue(capacity=1 << 20)
    q.put("task")
    with Forked(_take_and_die, q) as k:
        assert k.join() == -signal.SIGKILL
    assert q.join(timeout=0.2) is False      # the timeout form reports, never raises
    with pytest.raises(PeerDead):
        q.join()
    q.close()


@pytest.mark.timeout(30)
def test_join_with_timeout_and_worker_threads():
    q = JoinableQueue(capacity=1 << 20)
    for i in range(5):
        q.put(i)

    def worker():
        for _ in range(5):
            q.get(timeout=WAIT)
            time.sleep(0.01)
            q.task_done()
    t = threading.Thread(target=worker)
    t.start()
    assert q.join() is True                   # no PeerDead: the worker is a thread
    t.join(10)
    assert q.join(timeout=0) is True
    q.close()


# --- the lock: a stopped owner, Ctrl-C, deadline, a reused thread id ------------------

def _hold_lock_and_stop(q, which, gate):
    # "inside the lock": this process's tid in the lock word, then stopped
    # (as under a debugger) -- alive, so nobody may take the lock over.
    q._ring.words.store32(QUEUE_OFFSETS[which], os.getpid())
    gate.set()
    os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(60)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("which", ["prod_lock", "cons_lock"])
@pytest.mark.timeout(30)
def test_stopped_lock_owner_sigint_and_deadline(which):
    q = Queue(capacity=1 << 20)
    q.put("a")
    g = Gate()
    with Forked(_hold_lock_and_stop, q, which, g) as k:
        g.wait()
        wait_for(lambda: open(f"/proc/{k.pid}/stat").read().split(") ")[1][0] == "T", "stopped")
        call = (lambda **kw: q.put("b", **kw)) if which == "prod_lock" else \
               (lambda **kw: q.get(**kw))
        # with a timeout: Full/Empty at the deadline, not a hang
        t0 = time.monotonic()
        with pytest.raises((stdqueue.Full, stdqueue.Empty)):
            call(timeout=0.3)
        assert time.monotonic() - t0 < 5
        # without one: Ctrl-C (here SIGALRM raising) interrupts the wait
        old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(_Interrupt()))
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(_Interrupt):
                call()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        k.kill()                                 # now the owner is gone: taken over
    call(timeout=WAIT)
    assert q._core.stolen_locks == 1
    q.close()


@pytest.mark.timeout(30)
def test_lock_owner_with_a_reused_thread_id_is_taken_over():
    """The word names a live thread id whose start time is not the recorded
    one: the owner died and its id was handed out again."""
    q = Queue(capacity=1 << 20)
    live = os.getppid()                          # alive, but not the owner
    word = (0x1234 << 32) | live                 # a start time that does not match
    off = QUEUE_OFFSETS["prod_lock"]
    q._ring.words.store32(off, word & 0xffffffff)
    q._ring.words.store32(off + 4, word >> 32)
    q.put("x", timeout=WAIT)
    assert q._core.stolen_locks == 1
    assert q._ring.words.load32(off) & LOCK_TID_MASK == 0
    assert q.get(timeout=WAIT) == "x"
    q.close()


def test_foreign_pid_namespace_is_refused():
    q = Queue(capacity=1 << 20)
    q._ring.words.store64(QUEUE_OFFSETS["pidns"], 1)     # "created elsewhere"
    r = q._ring.layout.rings[0]
    with pytest.raises(OSError, match="PID namespace"):
        QueueCore(q._ring.segment.buf, *r.ring_args(), init=False)
    q.close()


# --- arena positions across the wrap ------------------------------------------------------

@pytest.mark.parametrize("capacity", [100_000, 1_500_000, 3_000_017])
def test_position_wrap_keeps_every_message(capacity):
    q = Queue(capacity=capacity, num=64)
    core = q._core
    mod = core.position_modulus
    size = core.arena_bytes
    assert size & (size - 1) and mod % size == 0 and mod <= 1 << 48     # not a power of two
    core._set_head_position(mod - 3 * size // 2)                        # wraps within the test
    rng = np.random.default_rng(capacity)
    backlog = []
    total = 0
    while total < 4 * size:
        n = int(rng.integers(1, size // 5))
        payload = rng.integers(0, 255, n, dtype=np.uint8).tobytes()
        q.put(payload)
        backlog.append(payload)
        total += n
        if len(backlog) > 3 or rng.random() < 0.5:
            assert q.get(timeout=WAIT) == backlog.pop(0)
    while backlog:
        assert q.get(timeout=WAIT) == backlog.pop(0)
    q.close()


# --- raw messages ---------------------------------------------------------------------

class _Bomb:
    def __reduce__(self):
        return (os.abort, ())                     # unpickling this would kill us


def test_get_message_never_unpickles_and_put_message_relays():
    a = Queue(capacity=1 << 20)
    b = Queue(capacity=1 << 20)
    a.put(_Bomb())
    a.put(b"raw bytes")
    arr = np.arange(1000, dtype=np.float32)
    a.put({"arr": arr})
    kind, main, bufs = a.get_message(timeout=WAIT)
    assert kind == MSG_PICKLE and bufs == [] and b"abort" in bytes(main)
    kind, main, bufs = a.get_message(timeout=WAIT)
    assert kind == MSG_RAW_BYTES and bytes(main) == b"raw bytes"
    b.put_message(kind, main, bufs)
    kind, main, bufs = a.get_message(timeout=WAIT)
    assert kind == MSG_PICKLE and len(bufs) == 1 and bytes(bufs[0]) == arr.tobytes()
    b.put_message(kind, main, bufs)
    assert b.get(timeout=WAIT) == b"raw bytes"
    assert (b.get(timeout=WAIT)["arr"] == arr).all()
    with pytest.raises(ValueError):
        b.put_message(7, b"x")
    a.close()
    b.close()


def test_corrupt_message_header_is_a_clear_error():
    q = Queue(capacity=1 << 20)
    # a "message" whose header claims more buffers than it has bytes
    q._core.put_parts([np.array([1000, 0, 10, 0], dtype=np.uint32).tobytes() + b"x" * 70])
    with pytest.raises(pickle.UnpicklingError, match="corrupt"):
        q.get(timeout=WAIT)
    q.close()
