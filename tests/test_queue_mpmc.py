"""vringipc.Queue with many producer and consumer processes: MPMC correctness,
large objects, MessageTooLarge, blocking and wake-ups across processes, and
SIGKILL robustness (killed producers/consumers, dead lock owners, PeerDead).

Children are forked (fork is the start method that lets a test share plain
memory, e.g. counters in an anonymous shared mmap, with them) and always
reaped.  No assertion depends on timing: timeouts only bound waits that must
end for another reason."""

from __future__ import annotations

import mmap
import os
import random
import select
import signal
import threading
import time
import zlib

import numpy as np
import pytest

from vringipc import JoinableQueue, MessageTooLarge, PeerDead, Queue
from vringipc._ring import LOCK_TID_MASK, QUEUE_OFFSETS

from forking import Forked, reaped, wait_for

WAIT = 20.0           # bound for a wait that must end for another reason


# --- helpers ---------------------------------------------------------------------------------

def shared_i64(n: int) -> np.ndarray:
    """n int64 counters in anonymous MAP_SHARED memory, shared with forked children."""
    return np.frombuffer(mmap.mmap(-1, 8 * n), dtype=np.int64)


def word(q, name: str) -> int:
    v = q._ring.words.load32(QUEUE_OFFSETS[name])
    return v & LOCK_TID_MASK if name.endswith("_lock") else v     # owner tid, no WAITERS bit


def kill_preferably_inside(k: "Forked", q, lock: str, rnd: random.Random,
                           attempts: int = 400) -> bool:
    """SIGKILL child k, preferably while it holds `lock` (its pid in the lock
    word): stop it (SIGSTOP), look at the word, kill if it is the owner, else
    let it run a little and retry.  Reaps it.  True if killed inside the lock."""
    for attempt in range(attempts):
        os.kill(k.pid, signal.SIGSTOP)
        pid, st = os.waitpid(k.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(st), "child exited instead of stopping"
        inside = word(q, lock) == k.pid
        if inside or attempt == attempts - 1:
            break                               # killed while still stopped
        os.kill(k.pid, signal.SIGCONT)
        time.sleep(rnd.random() * 0.002)
    k.kill()
    assert os.waitstatus_to_exitcode(k.status) == -signal.SIGKILL
    return inside


@pytest.fixture
def queues():
    made = []

    def make(*a, **kw):
        q = (kw.pop("cls", None) or Queue)(*a, **kw)
        made.append(q)
        return q
    yield make
    for q in made:
        q.close()


def _item(p: int, seq: int, rng: random.Random):
    payload = rng.randbytes(rng.randrange(0, 200))
    return (p, seq, payload, zlib.crc32(payload))


def _consume(q, path, stats=None, slot=0):
    """Get (p, seq, payload, crc) items until None; check every crc; save the
    (p, seq) pairs in arrival order to path."""
    got, bad = [], 0
    while True:
        item = q.get(timeout=WAIT)
        if item is None:
            break
        p, seq, payload, crc = item
        if zlib.crc32(payload) != crc:
            bad += 1
        got.append((p, seq))
    np.save(path, np.array(got, dtype=np.int64).reshape(-1, 2))
    if stats is not None:
        stats[slot] = q._core.stolen_locks
    if bad:
        raise AssertionError(f"{bad} corrupt payloads")


def _load(paths):
    return [np.load(p) for p in paths]


def check_per_consumer_order(per_consumer):
    """Within what one consumer got, each producer's sequence numbers increase."""
    for arr in per_consumer:
        for p in np.unique(arr[:, 0]):
            seqs = arr[arr[:, 0] == p, 1]
            assert np.all(np.diff(seqs) > 0), f"producer {p}: order broken within a consumer"


def delivered_by_producer(per_consumer):
    allgot = np.concatenate(per_consumer) if per_consumer else np.empty((0, 2), np.int64)
    keys = allgot[:, 0] * (1 << 32) + allgot[:, 1]
    uniq, counts = np.unique(keys, return_counts=True)
    dups = uniq[counts > 1]
    assert dups.size == 0, f"{dups.size} items delivered more than once, e.g. " \
                           f"{[(int(k >> 32), int(k & 0xffffffff)) for k in dups[:5]]}"
    out: dict[int, np.ndarray] = {}
    for p in np.unique(allgot[:, 0]):
        out[int(p)] = np.sort(allgot[allgot[:, 0] == p, 1])
    return out


# --- MPMC ------------------------------------------------------------------------------------

def _producer(q, p, n):
    rng = random.Random(p)
    for seq in range(n):
        q.put(_item(p, seq, rng))


@pytest.mark.timeout(120)
def test_4_producers_4_consumers_100k(queues, tmp_path):
    NP, NC, PER = 4, 4, 25_000
    q = queues(200, num=256, capacity=1 << 20)      # back-pressure: maxsize
    paths = [tmp_path / f"c{i}.npy" for i in range(NC)]
    with reaped() as kids:
        cons = [Forked(_consume, q, paths[i]) for i in range(NC)]
        kids += cons
        prods = [Forked(_producer, q, p, PER) for p in range(NP)]
        kids += prods
        for k in prods:
            assert k.join(90) == 0
        for _ in range(NC):
            q.put(None)
        for k in cons:
            assert k.join(60) == 0
    per_consumer = _load(paths)
    assert sum(len(a) for a in per_consumer) == NP * PER
    got = delivered_by_producer(per_consumer)        # also: nothing duplicated
    for p in range(NP):
        assert np.array_equal(got[p], np.arange(PER)), f"producer {p}: items lost"
    check_per_consumer_order(per_consumer)
    assert q.qsize() == 0 and q.empty()


def _big_producer(q, back):
    rng = np.random.default_rng(7)
    for i in range(2):
        a = rng.standard_normal((10 << 20) // 8)                 # 10 MB float64
        q.put(("array", zlib.crc32(a), a))
        b = rng.bytes(10 << 20)
        q.put(("bytes", zlib.crc32(b), b))
    f = np.asfortranarray(rng.integers(0, 1 << 30, (1280, 2048), dtype=np.int32))  # 10 MB
    q.put(("fortran", zlib.crc32(f.tobytes(order="A")), f))
    nc = rng.standard_normal((1280, 2048))[:, ::2]               # 10 MB, non-contiguous
    q.put(("noncontig", zlib.crc32(np.ascontiguousarray(nc)), nc))
    x = back.get(timeout=WAIT)
    q.put(("echo", zlib.crc32(x), x.shape))


@pytest.mark.timeout(90)
def test_10mb_objects_between_processes(queues):
    q, back = queues(), queues()
    with reaped() as kids:
        k = Forked(_big_producer, q, back)
        kids.append(k)
        for _ in range(2):
            for want in ("array", "bytes"):
                tag, crc, obj = q.get(timeout=WAIT)
                assert tag == want
                assert len(memoryview(obj).cast("B")) == 10 << 20
                assert zlib.crc32(obj) == crc
        tag, crc, f = q.get(timeout=WAIT)
        assert tag == "fortran" and f.flags.f_contiguous and f.shape == (1280, 2048)
        assert zlib.crc32(f.tobytes(order="A")) == crc
        tag, crc, nc = q.get(timeout=WAIT)
        assert tag == "noncontig" and nc.shape == (1280, 1024)
        assert zlib.crc32(np.ascontiguousarray(nc)) == crc
        x = np.random.default_rng(3).standard_normal((1024, 1280))        # 10 MB back
        back.put(x)
        tag, crc, shape = q.get(timeout=WAIT)
        assert (tag, crc, shape) == ("echo", zlib.crc32(x), x.shape)
        assert k.join() == 0


# --- MessageTooLarge -------------------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("cls", [Queue, JoinableQueue])
def test_message_too_large_raises_at_once(queues, cls):
    q = queues(1, capacity=64 * 1024, cls=cls)        # maxsize 1
    assert q.capacity == 64 * 1024
    for bad in (bytes(100_000), np.zeros(20_000), [bytes(40_000), bytes(40_000)]):
        for put in (q.put, q.put_nowait, lambda o: q.put(o, timeout=5),
                    lambda o: q.put(o, block=False)):
            with pytest.raises(MessageTooLarge) as ei:
                put(bad)
            assert isinstance(ei.value, ValueError)
    assert q.qsize() == 0 and q.empty()
    q.put("small")
    # A full queue (maxsize=1) does not turn it into a block or Full: it can never fit.
    with pytest.raises(MessageTooLarge):
        q.put(bytes(q.capacity + 1))
    assert q.get(timeout=WAIT) == "small"
    # Close to the capacity fits (after the arena head has moved, so the
    # message wraps to the start of the arena).
    for _ in range(3):
        big = os.urandom(q.capacity - 512)
        q.put(big, timeout=WAIT)
        assert q.get(timeout=WAIT) == big
    if cls is JoinableQueue:
        for _ in range(4):
            q.task_done()
        q.join()                     # the failed puts were not counted as tasks
        with pytest.raises(ValueError):
            q.task_done()


# --- blocking / wake-ups ---------------------------------------------------------------------

def _blocked_put(q, obj):
    q.put(obj, timeout=WAIT)


def _blocked_get(q, expected):
    got = q.get(timeout=WAIT)
    assert got == expected, got


@pytest.mark.timeout(60)
def test_blocking_put_wakes_when_a_consumer_gets(queues):
    q = queues(2)
    q.put("a")
    q.put("b")
    assert q.full()
    with reaped() as kids:
        k = Forked(_blocked_put, q, "c")
        kids.append(k)
        wait_for(lambda: word(q, "put_sleepers") >= 1, "the child to sleep in put()")
        assert q.qsize() == 2
        assert q.get(timeout=WAIT) == "a"
        assert k.join() == 0
        assert [q.get(timeout=WAIT) for _ in range(2)] == ["b", "c"]


@pytest.mark.timeout(60)
def test_blocking_get_wakes_when_a_producer_puts(queues):
    q = queues()
    with reaped() as kids:
        k = Forked(_blocked_get, q, {"x": 1})
        kids.append(k)
        wait_for(lambda: word(q, "get_sleepers") >= 1, "the child to sleep in get()")
        q.put({"x": 1})
        assert k.join() == 0
    assert q.empty()


def _echo_plus_one(a, b, n):
    for _ in range(n):
        b.put(a.get(timeout=WAIT) + 1, timeout=WAIT)


def _stream(q, n):
    for i in range(n):
        q.put(i, timeout=WAIT)


@pytest.mark.timeout(60)
def test_maxsize_1_ping_pong_and_stream(queues):
    N = 2000
    a, b = queues(1), queues(1)
    with reaped() as kids:
        k = Forked(_echo_plus_one, a, b, N)
        kids.append(k)
        for i in range(N):
            a.put(i, timeout=WAIT)
            assert b.get(timeout=WAIT) == i + 1
        assert k.join() == 0
    q = queues(1)
    with reaped() as kids:
        k = Forked(_stream, q, 3 * N)
        kids.append(k)
        for i in range(3 * N):
            assert q.qsize() <= 1
            assert q.get(timeout=WAIT) == i
        assert k.join() == 0
    assert a.empty() and b.empty() and q.empty()


# --- SIGKILL: producers ----------------------------------------------------------------------

def _survivor(q, p, n_min, flags, counts):
    """Put until at least n_min items AND the parent says the kills are done."""
    rng = random.Random(p)
    seq = 0
    while seq < n_min or not flags[0]:
        q.put(_item(p, seq, rng), timeout=WAIT)
        seq += 1
        counts[p] = seq
    flags[1 + p] = q._core.stolen_locks


def _payload_pool(seed: int, n: int = 4):
    """NumPy payloads of 64-256 KB with their crc32: pickled out-of-band, their
    bytes are copied only inside the queue lock, which a process then holds a
    good part of the time."""
    rng = np.random.default_rng(seed)
    pool = [rng.integers(0, 256, int(rng.integers(64 << 10, 256 << 10)), dtype=np.uint8)
            for _ in range(n)]
    return [(a, zlib.crc32(a)) for a in pool]


def _victim(q, p, counts, slot, stolen):
    """Put forever; counts[slot] = number of puts that returned, stolen[slot]
    = locks this victim took over from an earlier victim (the next victim
    competes with the survivors for a dead one's lock)."""
    pool = _payload_pool(p)
    seq = 0
    while True:
        payload, crc = pool[seq % len(pool)]
        q.put((p, seq, payload, crc), timeout=WAIT)
        stolen[slot] = q._core.stolen_locks
        seq += 1
        counts[slot] = seq


@pytest.mark.timeout(120)
def test_producers_killed_while_others_put(queues, tmp_path):
    NS, NV, NC, PER = 3, 6, 2, 3000
    q = queues(100, num=128, capacity=4 << 20)
    flags = shared_i64(1 + NS)
    scounts = shared_i64(NS)
    vcounts = shared_i64(NV)
    vstolen = shared_i64(NV)
    stats = shared_i64(NC)
    paths = [tmp_path / f"c{i}.npy" for i in range(NC)]
    rnd = random.Random(1234)
    inside = 0
    with reaped() as kids:
        cons = [Forked(_consume, q, paths[i], stats, i) for i in range(NC)]
        kids += cons
        surv = [Forked(_survivor, q, p, PER, flags, scounts) for p in range(NS)]
        kids += surv
        for v in range(NV):             # one victim at a time, killed mid-stream
            k = Forked(_victim, q, NS + v, vcounts, v, vstolen)
            kids.append(k)
            target = rnd.randrange(10, 100)
            wait_for(lambda: vcounts[v] >= target, f"victim {v} to put {target} items")
            # even victims: killed inside the lock if at all possible; odd
            # ones: wherever they are (the lock word is still looked at)
            inside += kill_preferably_inside(k, q, "prod_lock", rnd, 400 if v % 2 == 0 else 1)
        flags[0] = 1
        for k in surv:
            assert k.join(60) == 0
        for _ in range(NC):
            q.put(None, timeout=WAIT)
        for k in cons:
            assert k.join(60) == 0
    per_consumer = _load(paths)
    got = delivered_by_producer(per_consumer)          # nothing duplicated
    for p in range(NS):                                # survivors: everything
        assert np.array_equal(got[p], np.arange(scounts[p])), f"survivor {p} lost items"
    for v in range(NV):
        # every put() that returned is delivered exactly once; the put the
        # victim was inside of when killed may or may not have been committed
        seqs = got.get(NS + v, np.empty(0, np.int64))
        assert vcounts[v] <= len(seqs) <= vcounts[v] + 1, (v, vcounts[v], len(seqs))
        assert np.array_equal(seqs, np.arange(len(seqs))), f"victim {v}: gap in delivered items"
    check_per_consumer_order(per_consumer)
    # each victim killed inside the producer lock left it to exactly one taker
    # (a survivor, a later victim, or this process putting the None sentinels)
    stolen = int(flags[1:].sum() + vstolen.sum() + q._core.stolen_locks)
    assert stats.sum() == 0                  # consumers never take the producer lock
    print(f"{inside}/{NV} producers killed inside the producer lock")
    assert inside >= 1, "no victim could be caught inside the producer lock"
    assert stolen == inside, (stolen, inside)


# --- SIGKILL: consumers ----------------------------------------------------------------------

def _put_seq(q, n_min, flags):
    """Put (0, seq, payload, crc) until at least n_min items AND the parent says
    the kills are done; flags[1] = number put."""
    pool = _payload_pool(5)
    i = 0
    while i < n_min or not flags[0]:
        # every 4th item carries a 64-256 KB array: its copy-out happens inside
        # the consumer lock
        payload, crc = pool[i % len(pool)] if i % 4 == 0 else (b"", 0)
        q.put((0, i, payload, crc), timeout=WAIT)
        i += 1
        flags[1] = i


def _collect_ints(q, path, stats, slot):
    got = []
    while True:
        x = q.get(timeout=WAIT)
        if x is None:
            break
        _, seq, payload, crc = x
        assert zlib.crc32(payload) == crc
        got.append(seq)
    np.save(path, np.array(got, dtype=np.int64))
    stats[slot] = q._core.stolen_locks


def _victim_consumer(q, rec):
    """rec[0] = count, rec[1:-1] = items got, recorded after each get()
    returns; rec[-1] = locks this victim took over from an earlier victim
    (the next victim competes with the survivors for a dead one's lock)."""
    n = 0
    while True:
        x = q.get(timeout=WAIT)
        rec[-1] = q._core.stolen_locks
        rec[1 + n] = x[1]
        n += 1
        rec[0] = n


@pytest.mark.timeout(120)
def test_consumers_killed_while_others_get(queues, tmp_path):
    N_MIN, NV = 5000, 4
    q = queues(100, num=128, capacity=4 << 20)
    flags = shared_i64(2)
    recs = [shared_i64(1 << 20) for _ in range(NV)]
    stats = shared_i64(2)
    paths = [tmp_path / f"s{i}.npy" for i in range(2)]
    rnd = random.Random(99)
    inside = 0
    with reaped() as kids:
        surv = [Forked(_collect_ints, q, p, stats, i) for i, p in enumerate(paths)]
        kids += surv
        prod = Forked(_put_seq, q, N_MIN, flags)
        kids.append(prod)
        for v in range(NV):
            k = Forked(_victim_consumer, q, recs[v])
            kids.append(k)
            target = rnd.randrange(50, 500)
            wait_for(lambda: recs[v][0] >= target, f"victim consumer {v} to get {target}")
            inside += kill_preferably_inside(k, q, "cons_lock", rnd, 1500 if v % 2 == 0 else 1)
        flags[0] = 1
        assert prod.join(60) == 0
        N = int(flags[1])
        for _ in surv:
            q.put(None, timeout=WAIT)
        for k in surv:
            assert k.join(60) == 0
    survivors = [np.load(p) for p in paths]
    victims = [r[1:1 + r[0]] for r in recs]
    for s in survivors:
        assert np.all(np.diff(s) > 0), "a consumer got items out of order"
    allgot = np.concatenate(survivors + victims)
    uniq = np.unique(allgot)
    assert len(uniq) == len(allgot), "an item was delivered twice"
    assert set(uniq.tolist()) <= set(range(N))
    # a killed consumer may lose the item it had taken but not yet recorded
    assert N - len(uniq) <= NV, f"{N - len(uniq)} items lost"
    assert q.empty()
    # each victim killed inside the consumer lock left it to exactly one taker
    print(f"{inside}/{NV} consumers killed inside the consumer lock")
    assert inside >= 1, "no victim could be caught inside the consumer lock"
    taken_over = int(stats.sum()) + sum(int(r[-1]) for r in recs)
    assert taken_over == inside, (taken_over, inside)


# --- a lock held by a dead owner -------------------------------------------------------------

def _ghost(q, lock):
    """A process that 'dies holding the lock': writes its tid, exits."""
    q._ring.words.store32(QUEUE_OFFSETS[lock], os.getpid())


def _use_side(q, lock, expect_stolen):
    """Put (producer lock) or get (consumer lock) through a lock whose owner is dead."""
    assert q._core.stolen_locks == 0
    if lock == "prod_lock":
        q.put_nowait("through")
    else:
        assert q.get_nowait() == "before"
    assert q._core.stolen_locks == expect_stolen, q._core.stolen_locks
    assert word(q, lock) == 0


def _tid_exists(tid: int) -> bool:
    try:
        os.kill(tid, 0)
    except ProcessLookupError:
        return False
    return True


def _use_side_after_dead_thread(q, lock):
    tids = []
    t = threading.Thread(target=lambda: tids.append(threading.get_native_id()))
    t.start()
    t.join()
    wait_for(lambda: not _tid_exists(tids[0]), "the thread to be gone")   # join() returns earlier
    q._ring.words.store32(QUEUE_OFFSETS[lock], tids[0])
    _use_side(q, lock, 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("owner", ["dead_process", "dead_thread"])
@pytest.mark.parametrize("lock", ["prod_lock", "cons_lock"])
def test_lock_of_dead_owner_is_taken_over(queues, lock, owner):
    q = queues()
    if lock == "cons_lock":
        q.put("before")
    with reaped() as kids:
        if owner == "dead_process":
            g = Forked(_ghost, q, lock)
            kids.append(g)
            assert g.join() == 0                 # exited and reaped
            assert word(q, lock) == g.pid
            # the put/get runs in a child: a lock never taken over would hang it
            actor = Forked(_use_side, q, lock, 1)
        else:
            actor = Forked(_use_side_after_dead_thread, q, lock)
        kids.append(actor)
        assert actor.join() == 0
    assert word(q, lock) == 0
    if lock == "prod_lock":
        assert q.get(timeout=WAIT) == "through"
    assert q.empty()
    q.put("after")
    assert q.get(timeout=WAIT) == "after"
    assert q._core.stolen_locks == 0


REAP_DELAY = 2.0


def _put_while_owner_is_zombie(q):
    """Fork a ghost that 'dies holding the producer lock' and leave it
    unreaped (a zombie, as a killed worker is until its parent joins it); a
    timer thread reaps it after REAP_DELAY.  Exit 0 iff put_nowait() got
    through before the reap."""
    g = os.fork()
    if g == 0:                                   # pragma: no cover - grandchild
        q._ring.words.store32(QUEUE_OFFSETS["prod_lock"], os.getpid())
        os._exit(0)
    os.waitid(os.P_PID, g, os.WEXITED | os.WNOWAIT)      # exited, not reaped
    reaped_first = []

    def reap():
        time.sleep(REAP_DELAY)
        reaped_first.append(True)
        os.waitpid(g, 0)
    t = threading.Thread(target=reap)
    t.start()
    try:
        q.put_nowait("x")
    finally:
        early = not reaped_first
        t.join()
    assert early, "put_nowait() waited until the dead lock owner was reaped"


@pytest.mark.timeout(60)
def test_lock_of_unreaped_dead_owner_is_taken_over(queues):
    q = queues()
    with reaped() as kids:
        actor = Forked(_put_while_owner_is_zombie, q)
        kids.append(actor)
        assert actor.join() == 0
    assert q.get(timeout=WAIT) == "x"


# --- PeerDead --------------------------------------------------------------------------------

def _put_then_sleep(q):
    q.put("hello")
    while True:
        signal.pause()


def _get_then_sleep(q, gate_w):
    assert q.get(timeout=WAIT) == 1
    os.write(gate_w, b"x")
    while True:
        signal.pause()


@pytest.mark.timeout(60)
def test_blocked_get_raises_peer_dead_when_the_producer_dies(queues):
    q = queues()
    with reaped() as kids:
        k = Forked(_put_then_sleep, q)
        kids.append(k)
        assert q.get(timeout=WAIT) == "hello"
        killer = threading.Timer(0.3, os.kill, (k.pid, signal.SIGKILL))
        killer.start()
        try:
            # blocked without a timeout: PeerDead instead of a hang (the
            # pytest timeout would end a hang: the wait is interruptible)
            with pytest.raises(PeerDead):
                q.get()
        finally:
            killer.join()
        k.kill()                                 # reap (already dead)
        assert os.waitstatus_to_exitcode(k.status) == -signal.SIGKILL
    q.put("still usable")
    assert q.get(timeout=WAIT) == "still usable"


@pytest.mark.timeout(60)
def test_blocked_put_raises_peer_dead_when_the_consumer_dies(queues):
    q = queues(1)
    r, w = os.pipe()
    try:
        with reaped() as kids:
            k = Forked(_get_then_sleep, q, w)
            kids.append(k)
            q.put(1)
            assert select.select([r], [], [], WAIT)[0], "child did not get its item"
            q.put(2)
            assert q.full()
            killer = threading.Timer(0.3, os.kill, (k.pid, signal.SIGKILL))
            killer.start()
            try:
                with pytest.raises(PeerDead):
                    q.put(3)
            finally:
                killer.join()
    finally:
        os.close(r)
        os.close(w)
    assert q.get(timeout=WAIT) == 2
    assert q.empty()


@pytest.mark.timeout(60)
def test_blocked_get_raises_peer_dead_when_the_producer_died_first(queues):
    q = queues()
    with reaped() as kids:
        k = Forked(_put_then_sleep, q)
        kids.append(k)
        wait_for(lambda: q.qsize() == 1, "the child's put")
        k.kill()                                 # dead (and reaped) before we use the queue
    assert q.get(timeout=WAIT) == "hello"
    with pytest.raises(PeerDead):
        q.get()                  # blocked for good (a timeout would give Empty, as mp)
