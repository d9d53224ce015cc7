"""Behaviour tests of vringipc.Channel (one producer, one consumer, raw bytes).

Single-process tests use one Channel as both ends (a process may hold both
roles).  Cross-process tests fork (the producer or consumer is a child that is
always reaped), start spawn/forkserver children with the Channel as a
multiprocessing argument, or attach a named (shm) segment from an unrelated
interpreter.  No assertion depends on timing: timeouts only bound waits that
must end for another reason."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import random
import select
import signal
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest

import vringipc
from vringipc import (
    Channel,
    ChannelClosed,
    Empty,
    Full,
    MessageTooLarge,
    PeerDead,
    VringError,
)

from forking import Forked, Gate

WAIT = 10.0          # seconds: generous bound for a wait that must end for another reason


# --- helpers ------------------------------------------------------------------------

@pytest.fixture
def gates():
    made = []

    def make():
        g = Gate()
        made.append(g)
        return g
    yield make
    for g in made:
        g.close()


def _msg(seq: int) -> bytes:
    """A self-checking message: seq, crc32 of payload, payload of varying size."""
    n = (seq * 7919) % 301
    payload = (seq.to_bytes(4, "little") * (n // 4 + 1))[:n]
    return struct.pack("<II", seq, zlib.crc32(payload)) + payload


def _check_msg(data: bytes, seq: int) -> None:
    got_seq, crc = struct.unpack_from("<II", data)
    assert got_seq == seq, f"message {got_seq} arrived where {seq} was expected"
    assert zlib.crc32(data[8:]) == crc, f"message {seq} corrupted"
    assert data == _msg(seq)


def _fill(ch: Channel, size: int = 1) -> int:
    """send_nowait until Full; returns the number sent."""
    n = 0
    while True:
        try:
            ch.send_nowait(b"f" * size)
        except Full:
            return n
        n += 1
        assert n < 100000


@pytest.fixture
def ch():
    c = Channel(capacity=4096, num=8)
    yield c
    c.close()


# --- one process: sizes, empty / full, batches -----------------------------------------

SIZES = [0, 1, 63, 64, 65, 1000, 4095, 4096]


@pytest.mark.parametrize("size", SIZES)
def test_roundtrip_sizes(ch, size):
    assert ch.capacity == 4096
    data = os.urandom(size)
    ch.send(data)
    got = ch.recv(timeout=WAIT)
    assert type(got) is bytes and got == data
    # the same through every receive flavour
    ch.send(data)
    buf = bytearray(size + 10)
    assert ch.recv_into(buf, timeout=WAIT) == size and buf[:size] == data
    ch.send(data)
    with ch.recv_view(timeout=WAIT) as v:
        assert len(v) == size and bytes(v) == data and v.tobytes() == data
    ch.send(data)
    assert ch.recv_many(timeout=WAIT) == [data]


def test_capacity_exact_when_not_a_multiple_of_64():
    with Channel(capacity=1000, num=4) as c:
        assert c.capacity >= 1000
        for n in (1000, c.capacity):
            data = os.urandom(n)
            c.send(data)
            assert c.recv(timeout=WAIT) == data
        with pytest.raises(MessageTooLarge):
            c.send(b"x" * (c.capacity + 1))


@pytest.mark.timeout(20)
def test_too_large_is_immediate_even_when_full(ch):
    big = b"x" * (ch.capacity + 1)
    for call in (lambda: ch.send(big), lambda: ch.send_nowait(big),
                 lambda: ch.send(big, timeout=None), lambda: ch.send_many([big]),
                 lambda: ch.loan(ch.capacity + 1)):
        with pytest.raises(MessageTooLarge) as ei:
            call()
        assert isinstance(ei.value, ValueError) and isinstance(ei.value, VringError)
    # full channel, blocking, no timeout: still MessageTooLarge, never a stall
    assert _fill(ch, 500) > 0
    with pytest.raises(MessageTooLarge):
        ch.send(big)
    with pytest.raises(MessageTooLarge):
        ch.loan(ch.capacity + 1)
    while True:
        try:
            ch.recv_nowait()
        except Empty:
            break
    ch.send(b"still works")
    assert ch.recv() == b"still works"


def test_recv_empty(ch):
    with pytest.raises(Empty):
        ch.recv_nowait()
    with pytest.raises(Empty):
        ch.recv(block=False)
    with pytest.raises(Empty):
        ch.recv(timeout=0.1)
    with pytest.raises(Empty):
        ch.recv(timeout=0)
    with pytest.raises(Empty):
        ch.recv_view(timeout=0.05)
    with pytest.raises(Empty):
        ch.recv_into(bytearray(10), block=False)
    with pytest.raises(Empty):
        ch.recv_many(block=False)
    with pytest.raises(Empty):
        ch.recv_many(timeout=0.05)
    import queue
    assert Empty is queue.Empty and Full is queue.Full


def test_full_by_descriptors(ch):
    # num=8: eight 1-byte messages fill the ring while the arena has room
    assert _fill(ch, 1) == 8
    with pytest.raises(Full):
        ch.send_nowait(b"x")
    with pytest.raises(Full):
        ch.send(b"x", block=False)
    with pytest.raises(Full):
        ch.send(b"x", timeout=0.1)
    with pytest.raises(Full):
        ch.loan(1, block=False)
    assert ch.recv() == b"f"
    ch.send_nowait(b"y")
    assert ch.recv_many() == [b"f"] * 7 + [b"y"]


def test_full_by_bytes(ch):
    ch.send(b"a" * 3000)
    with pytest.raises(Full):
        ch.send_nowait(b"b" * 1200)
    with pytest.raises(Full):
        ch.send(b"b" * 1200, timeout=0.1)
    with pytest.raises(Full):
        ch.loan(1200, timeout=0.05)
    ch.send_nowait(b"c" * 1000)          # this one fits
    assert ch.recv() == b"a" * 3000
    ch.send_nowait(b"b" * 1200)
    assert ch.recv() == b"c" * 1000
    assert ch.recv() == b"b" * 1200


def test_send_many_recv_many(ch):
    msgs = [bytes([i]) * i for i in range(8)]
    assert ch.send_many(msgs) == 8
    assert ch.recv_many(max_messages=3) == msgs[:3]
    assert ch.recv_many(max_messages=1) == msgs[3:4]
    assert ch.recv_many() == msgs[4:]
    with pytest.raises(ValueError):
        ch.recv_many(0)
    # any buffer-protocol objects, from a generator
    import array
    assert ch.send_many(x for x in (bytearray(b"ba"), memoryview(b"mv"), array.array("B", [1, 2]))) == 3
    assert ch.recv_many() == [b"ba", b"mv", b"\x01\x02"]
    assert ch.send_many([]) == 0
    with pytest.raises(Full):
        ch.send_many([b"x"] * 9, block=False)
    assert ch.recv_many() == [b"x"] * 8


@pytest.mark.parametrize("bad", ["too_large", "not_a_buffer"])
def test_send_many_error_midway_publishes_what_was_sent(ch, bad):
    item = b"x" * (ch.capacity + 1) if bad == "too_large" else 12345
    with pytest.raises((MessageTooLarge, TypeError)):
        ch.send_many([b"a", b"b", item, b"never"])
    assert ch.recv_many(block=False) == [b"a", b"b"]


def test_recv_into(ch):
    ch.send(b"hello")
    buf = bytearray(64)
    assert ch.recv_into(buf) == 5 and buf[:5] == b"hello"
    # into a slice of a larger buffer
    ch.send(b"world")
    mv = memoryview(buf)[10:20]
    assert ch.recv_into(mv) == 5 and buf[10:15] == b"world"
    # too small: ValueError and the message stays first in line
    ch.send(b"0123456789")
    ch.send(b"next")
    with pytest.raises(ValueError):
        ch.recv_into(bytearray(9))
    assert ch.recv_into(bytearray(10)) == 10
    assert ch.recv() == b"next"
    # exact size, and an empty message into an empty buffer
    ch.send(b"abc")
    assert ch.recv_into(bytearray(3)) == 3
    ch.send(b"")
    assert ch.recv_into(bytearray(0)) == 0


def test_recv_into_readonly_buffer_keeps_message(ch):
    ch.send(b"first")
    with pytest.raises((BufferError, TypeError)):
        ch.recv_into(b"read-only bytes object")
    assert ch.recv_nowait() == b"first"
    # and nothing stays pinned: the whole arena is usable again
    ch.send_nowait(b"z" * ch.capacity)
    assert ch.recv_nowait() == b"z" * ch.capacity


def test_arena_wraparound_single_process():
    """Sizes that do not divide the arena, the arena kept as full as it gets
    (receive the oldest only when a send does not fit), so allocations run
    around the window many times; contents and offsets checked."""
    with Channel(capacity=4096, num=8) as c:
        win = c._ring.layout.rings[0]
        rng = random.Random(7)
        sent = []
        offsets = []

        def take_oldest():
            with c.recv_view(timeout=0) as v:
                assert win.win_off <= v.offset
                assert v.offset + len(v) <= win.win_off + win.win_size
                offsets.append(v.offset - win.win_off)
                assert bytes(v) == sent.pop(0)

        for i in range(600):
            n = 4096 if i % 97 == 0 else rng.randrange(1, 2500)
            data = rng.randbytes(n)
            while True:
                try:
                    c.send_nowait(data)
                    break
                except Full:
                    take_oldest()
            sent.append(data)
        while sent:
            take_oldest()
        # allocations start all over the window, and run around it many times
        assert len(set(offsets)) > 20
        laps = sum(1 for a, b in zip(offsets, offsets[1:]) if b < a)
        assert laps > 100


# --- two processes: order, sizes, blocking ----------------------------------------------

def _produce_seq(ch, n, batch):
    if batch:
        i = 0
        while i < n:
            k = min(batch, n - i)
            assert ch.send_many(_msg(j) for j in range(i, i + k)) == k
            i += k
    else:
        for i in range(n):
            ch.send(_msg(i))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch", [0, 37], ids=["send", "send_many"])
def test_order_across_u16_wrap(batch):
    """More than 65536 messages (the 16-bit ring indices wrap) arrive complete and in order."""
    n = 70000
    with Channel(capacity=16384, num=64) as c, Forked(_produce_seq, c, n, batch) as p:
        i = 0
        while i < n:
            if i % 3:
                for data in c.recv_many(max_messages=50, timeout=WAIT):
                    _check_msg(data, i)
                    i += 1
            else:
                _check_msg(c.recv(timeout=WAIT), i)
                i += 1
        assert p.join() == 0
        assert c._rx.last_avail_idx == n & 0xFFFF
        with pytest.raises(PeerDead):
            c.recv(timeout=WAIT)


def _produce_random(ch, seed, count, cap):
    rng = random.Random(seed)
    for _ in range(count):
        n = cap if rng.random() < 0.02 else rng.randrange(0, cap // 2)
        ch.send(rng.randbytes(n), timeout=WAIT)
    ch.close()


@pytest.mark.timeout(60)
def test_random_sizes_two_processes():
    seed, count = 12345, 1500
    with Channel(capacity=65536, num=32) as c:
        cap = c.capacity
        with Forked(_produce_random, c, seed, count, cap) as p:
            rng = random.Random(seed)
            for i in range(count):
                n = cap if rng.random() < 0.02 else rng.randrange(0, cap // 2)
                expect = rng.randbytes(n)
                if i % 2:
                    got = c.recv(timeout=WAIT)
                else:
                    with c.recv_view(timeout=WAIT) as v:
                        got = bytes(v)
                assert got == expect, f"message {i} ({n} bytes) differs"
            with pytest.raises(ChannelClosed):
                c.recv(timeout=WAIT)
            assert p.join() == 0


def _drain_after_gate(ch, gate, expect_count, result):
    gate.wait()
    got = []
    while len(got) < expect_count:
        got.append(ch.recv(timeout=WAIT))
    result.set(b"k" if got[-1] == b"LAST" * 1000 and all(g == b"f" * 300 for g in got[:-1]) else b"e")


@pytest.mark.timeout(30)
def test_send_blocks_when_full_and_resumes(gates):
    with Channel(capacity=4096, num=8) as c:
        gate, result = gates(), gates()
        n = _fill(c, 300)
        with Forked(_drain_after_gate, c, gate, n + 1, result) as p:
            gate.set()
            c.send(b"LAST" * 1000)              # blocks until the child drains
            assert result.wait() == b"k"
            assert p.join() == 0


# --- loans ------------------------------------------------------------------------------

def test_loan_with_block_commits(ch):
    with ch.loan(5) as buf:
        assert isinstance(buf, memoryview) and not buf.readonly and len(buf) == 5
        buf[:] = b"hello"
    assert ch.recv_nowait() == b"hello"


def test_loan_exception_cancels_and_space_is_reusable(ch):
    for _ in range(3):
        with pytest.raises(RuntimeError):
            with ch.loan(ch.capacity) as buf:
                buf[:3] = b"bad"
                raise RuntimeError("abort")
    with pytest.raises(Empty):
        ch.recv_nowait()
    # the whole arena and every descriptor are free again
    ch.send_nowait(b"w" * ch.capacity)
    assert ch.recv_nowait() == b"w" * ch.capacity
    assert _fill(ch, 1) == 8


def test_loan_commit_shorter_and_errors(ch):
    ln = ch.loan(100)
    assert len(ln) == 100
    mv = memoryview(ln)
    mv[:4] = b"abcd"
    with pytest.raises(BufferError):
        ln.commit(4)                       # an export is alive
    mv.release()
    with pytest.raises(ValueError):
        ln.commit(101)                     # more than reserved
    ln.commit(4)
    with pytest.raises(ValueError):
        ln.commit()                        # twice
    ln.cancel()                            # cancel after commit: no-op
    with pytest.raises(ValueError):
        memoryview(ln)                     # no access after commit
    assert ch.recv_nowait() == b"abcd"
    with pytest.raises(ValueError):
        ch.loan(-1)
    with ch.loan(0):
        pass
    assert ch.recv_nowait() == b""


def test_loan_with_block_live_export_raises_buffererror(ch):
    with pytest.raises(BufferError):
        with ch.loan(8) as buf:
            buf[:] = b"12345678"
            keep = memoryview(buf)         # still alive when the block ends
    keep.release()
    with pytest.raises(Empty):
        ch.recv_nowait()


def test_loans_committed_out_of_order(ch):
    loans = [ch.loan(1000) for _ in range(4)]
    for i, ln in enumerate(loans):
        memoryview(ln)[:] = bytes([65 + i]) * 1000
    # arrive in commit order
    for i in (2, 0, 3, 1):
        loans[i].commit()
    assert [m[:1] for m in ch.recv_many()] == [b"C", b"A", b"D", b"B"]
    ch.send_nowait(b"q" * ch.capacity)     # everything reclaimed
    assert ch.recv_nowait() == b"q" * ch.capacity


def test_loans_cancelled_out_of_order_and_dropped(ch):
    a, b, c_ = ch.loan(1000), ch.loan(1000), ch.loan(1000)
    memoryview(b)[:] = b"b" * 1000
    a.cancel()                              # oldest: cancelled while others live
    b.commit()
    c_.cancel()                             # newest
    d = ch.loan(500)
    del d                                   # dropped without commit: cancelled
    assert ch.recv_many() == [b"b" * 1000]
    with pytest.raises(Empty):
        ch.recv_nowait()
    ch.send_nowait(b"r" * ch.capacity)
    assert ch.recv_nowait() == b"r" * ch.capacity
    assert _fill(ch, 1) == 8


# --- roles ------------------------------------------------------------------------------

def _expect_role_refused(ch, what):
    with pytest.raises(VringError, match="live"):
        if what == "producer":
            ch.send(b"x")
        else:
            ch.recv(timeout=0)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("what", ["producer", "consumer"])
def test_second_live_role_refused(ch, what):
    if what == "producer":
        ch.send(b"mine")
    else:
        with pytest.raises(Empty):
            ch.recv_nowait()
    with Forked(_expect_role_refused, ch, what) as p:
        assert p.join() == 0
    # ours still works, repeatedly
    if what == "producer":
        assert ch.recv() == b"mine"
    ch.send(b"again")
    assert ch.recv() == b"again"


def _child_consumer_after_fork(ch, n):
    # the parent is the live producer: we cannot be one
    with pytest.raises(VringError):
        ch.send(b"no")
    assert ch.recv(timeout=WAIT) == b"before fork"
    for i in range(n):
        _check_msg(ch.recv(timeout=WAIT), i)


@pytest.mark.timeout(20)
def test_fork_child_gets_clean_role_state(ch):
    ch.send(b"before fork")                 # parent is the producer (and holds sender state)
    with Forked(_child_consumer_after_fork, ch, 50) as p:
        for i in range(50):
            ch.send(_msg(i), timeout=WAIT)
        assert p.join() == 0


def _send_and_exit(ch, msgs):
    for m in msgs:
        ch.send(m)
    # no close(): the process just ends with the role still claimed


def _send_and_hold(ch, msgs, claimed, release):
    ch.send(msgs[0])
    claimed.set()
    release.wait()
    for m in msgs[1:]:
        ch.send(m, timeout=WAIT)
    release.wait()


@pytest.mark.timeout(20)
def test_dead_producer_role_can_be_claimed(ch, gates):
    with Forked(_send_and_exit, ch, [b"one", b"two"]) as p1:
        assert p1.join() == 0
    assert ch.recv(timeout=WAIT) == b"one"
    assert ch.recv(timeout=WAIT) == b"two"
    claimed, release = gates(), gates()
    with Forked(_send_and_hold, ch, [b"three", b"four"], claimed, release) as p2:
        claimed.wait()
        assert ch.recv(timeout=WAIT) == b"three"
        release.set()
        assert ch.recv(timeout=WAIT) == b"four"
        release.set()
        assert p2.join() == 0


def _send_sleep_send(ch, gate):
    ch.send(b"zero")
    gate.wait()
    ch.send(b"one")


@pytest.mark.timeout(30)
def test_consumer_follows_producer_takeover(ch, gates):
    g1 = gates()
    with Forked(_send_sleep_send, ch, g1) as p1:
        assert ch.recv(timeout=WAIT) == b"zero"
        with pytest.raises(Empty):
            ch.recv(timeout=0.3)            # blocked while p1 is alive: it is watched now
        g1.set()
        assert ch.recv(timeout=WAIT) == b"one"
        assert p1.join() == 0
    claimed, release = gates(), gates()
    with Forked(_send_and_hold, ch, [b"two", b"three"], claimed, release) as p2:
        claimed.wait()
        assert ch.recv(timeout=WAIT) == b"two"
        # p2 is alive and will send after we started waiting
        with pytest.raises(Empty):
            ch.recv(timeout=0.3)
        release.set()
        assert ch.recv(timeout=WAIT) == b"three"
        release.set()
        assert p2.join() == 0


@pytest.mark.timeout(20)
def test_takeover_with_messages_still_queued(ch):
    # The dead producer's allocation state died with it: a new producer waits
    # until the consumer has drained what the old one published, then goes on.
    with Forked(_send_and_exit, ch, [b"one", b"two"]) as p1:
        assert p1.join() == 0
    with Forked(_send_and_exit, ch, [b"three"]) as p2:
        # Until p2 has claimed the role, the only producer is dead and a
        # blocked recv would rightly raise PeerDead: wait for the claim.
        from vringipc import layout as L, peers
        deadline = time.monotonic() + WAIT
        while peers.read_peer(ch._ring.words, L.DRIVER_LIVENESS_OFF)[0] != p2.pid:
            assert time.monotonic() < deadline, "p2 never claimed the producer role"
            time.sleep(0.001)
        assert [ch.recv(timeout=WAIT) for _ in range(3)] == [b"one", b"two", b"three"]
        assert p2.join() == 0


# --- spawn / forkserver -------------------------------------------------------------------

def _mp_consumer(ch, n):
    for i in range(n):
        _check_msg(ch.recv(timeout=WAIT), i)
    with pytest.raises(ChannelClosed):
        ch.recv(timeout=WAIT)
    ch.close()


def _mp_producer(ch, n):
    for i in range(n):
        ch.send(_msg(i), timeout=WAIT)
    ch.close()


def _mp_join(p):
    p.join(30)
    if p.is_alive():
        p.kill()
        p.join(5)
        raise AssertionError("child did not finish in time")
    return p.exitcode


@pytest.mark.timeout(60)
@pytest.mark.parametrize("child", ["consumer", "producer"])
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_multiprocessing_start_methods(method, child):
    n = 300
    ctx = mp.get_context(method)
    with Channel(capacity=8192, num=16) as c:
        target = _mp_consumer if child == "consumer" else _mp_producer
        p = ctx.Process(target=target, args=(c, n))
        p.start()
        try:
            if child == "consumer":
                for i in range(n):
                    c.send(_msg(i), timeout=WAIT)
                c.close()                    # the child sees ChannelClosed after draining
            else:
                for i in range(n):
                    _check_msg(c.recv(timeout=WAIT), i)
                with pytest.raises(ChannelClosed):
                    c.recv(timeout=WAIT)
        finally:
            code = _mp_join(p)
        assert code == 0


def test_pickle_outside_spawning_refused(ch):
    import pickle
    with pytest.raises(RuntimeError):
        pickle.dumps(ch)


# --- named segment, attached from an unrelated process (polling mode) -------------------------

_ATTACH_CONSUMER = textwrap.dedent("""
    import sys, zlib
    from vringipc import Channel, ChannelClosed
    ch = Channel.attach(sys.argv[1])
    try:
        ch.fileno()
    except ValueError:
        pass
    else:
        raise SystemExit("fileno() should refuse without eventfds")
    n = 0; crc = 0
    while True:
        try:
            m = ch.recv(timeout=10)
        except ChannelClosed:
            break
        assert m == n.to_bytes(4, "little") * (n % 50), n
        crc = zlib.crc32(m, crc); n += 1
    ch.close()
    print(n, crc)
""")

_ATTACH_PRODUCER = textwrap.dedent("""
    import sys
    from vringipc import Channel
    ch = Channel.attach(sys.argv[1])
    for n in range(int(sys.argv[2])):
        ch.send(n.to_bytes(4, "little") * (n % 50), timeout=10)
    ch.close()
""")


def _attach_env():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(vringipc.__file__))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.timeout(60)
def test_shm_attach_by_name_consumer_subprocess():
    n = 500
    with Channel(capacity=65536, num=64, backend="shm") as c:
        assert c.name and c.name.startswith("/")
        proc = subprocess.Popen([sys.executable, "-c", _ATTACH_CONSUMER, c.name],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_attach_env())
        try:
            crc = 0
            for i in range(n):
                m = i.to_bytes(4, "little") * (i % 50)
                crc = zlib.crc32(m, crc)
                c.send(m, timeout=30)
            c.close()
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert out.split() == [str(n).encode(), str(crc).encode()]


@pytest.mark.timeout(60)
def test_shm_attach_by_name_producer_subprocess():
    n = 300
    with Channel(capacity=65536, num=64, backend="shm") as c:
        proc = subprocess.Popen([sys.executable, "-c", _ATTACH_PRODUCER, c.name, str(n)],
                                stderr=subprocess.PIPE, env=_attach_env())
        try:
            for i in range(n):
                assert c.recv(timeout=30) == i.to_bytes(4, "little") * (i % 50)
            with pytest.raises(ChannelClosed):
                c.recv(timeout=30)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err.decode()


# --- peer death, clean close ----------------------------------------------------------------

def _send_then_die(ch, n, gate):
    for i in range(n):
        ch.send(_msg(i))
    if gate is not None:
        gate.wait()                 # the parent is (about to be) blocked in recv()
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.timeout(30)
def test_producer_killed_while_consumer_blocked(ch, gates):
    gate = gates()
    with Forked(_send_then_die, ch, 3, gate) as p:
        for i in range(3):
            _check_msg(ch.recv(timeout=WAIT), i)
        with pytest.raises(Empty):
            ch.recv(timeout=0.2)     # the producer is alive: a plain timeout
        gate.set()
        with pytest.raises(PeerDead):
            ch.recv()                # blocks with no timeout: must end because the peer died
        assert p.join() == -signal.SIGKILL
    with pytest.raises(PeerDead):
        ch.recv(timeout=WAIT)
    with pytest.raises(PeerDead) as ei:
        ch.recv_many()
    assert isinstance(ei.value, ConnectionError)


@pytest.mark.timeout(30)
def test_messages_before_producer_death_delivered_first(ch):
    with Forked(_send_then_die, ch, 5, None) as p:
        p.wait_exited_no_reap()      # dead (a zombie, pid not reusable) before we read
        for i in range(5):
            _check_msg(ch.recv(), i)
        with pytest.raises(PeerDead):
            ch.recv()
        assert p.join() == -signal.SIGKILL


@pytest.mark.timeout(30)
def test_consumer_killed_while_producer_blocked_on_full(ch, gates):
    to_child, from_child = gates(), gates()

    def child(c):
        assert c.recv(timeout=WAIT) == b"hello"
        from_child.set()
        to_child.wait()
        os.kill(os.getpid(), signal.SIGKILL)

    with Forked(child, ch) as p:
        ch.send(b"hello")
        from_child.wait()
        assert _fill(ch, 100) > 0
        with pytest.raises(Full):
            ch.send(b"x", timeout=0.2)    # consumer alive: a plain timeout
        to_child.set()
        with pytest.raises(PeerDead):
            ch.send(b"x")                 # no timeout: ends because the consumer died
        assert p.join() == -signal.SIGKILL
    with pytest.raises(PeerDead):
        with ch.loan(100):
            pass


def _send_then_close(ch, n, gate):
    for i in range(n):
        ch.send(_msg(i), timeout=WAIT)
    if gate is not None:
        gate.wait()
    ch.close()
    ch.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("blocked", [False, True])
def test_producer_close_gives_channel_closed_after_drain(gates, blocked):
    gate = gates() if blocked else None
    with Channel(capacity=16384, num=32) as c, Forked(_send_then_close, c, 20, gate) as p:
        if blocked:
            for i in range(20):
                _check_msg(c.recv(timeout=WAIT), i)
            with pytest.raises(Empty):
                c.recv(timeout=0.1)
            gate.set()
            with pytest.raises(ChannelClosed) as ei:
                c.recv()                      # blocked when the close arrives
            assert isinstance(ei.value, EOFError)
        else:
            assert p.join() == 0              # closed (and exited) before we read anything
            for i in range(20):
                _check_msg(c.recv(), i)
            with pytest.raises(ChannelClosed):
                c.recv()
        assert p.join() == 0
        # it stays closed, for every blocking receive
        for call in (c.recv, c.recv_view, c.recv_many, lambda: c.recv(timeout=WAIT),
                     lambda: c.recv_into(bytearray(10)), lambda: c.poll(WAIT)):
            with pytest.raises(ChannelClosed):
                call()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op", ["recv_nowait", "recv_many", "recv_view", "recv_into"])
def test_producer_close_seen_by_nonblocking_receive(op):
    with Channel(capacity=4096, num=8) as c, Forked(_send_then_close, c, 1, None) as p:
        assert p.join() == 0
        _check_msg(c.recv_nowait(), 0)
        call = {"recv_nowait": c.recv_nowait,
                "recv_many": lambda: c.recv_many(block=False),
                "recv_view": lambda: c.recv_view(block=False),
                "recv_into": lambda: c.recv_into(bytearray(10), block=False)}[op]
        with pytest.raises(ChannelClosed):
            call()


@pytest.mark.timeout(30)
def test_consumer_close_gives_producer_channel_closed(ch, gates):
    closed, done = gates(), gates()

    def child(c):
        assert c.recv(timeout=WAIT) == b"hi"
        c.close()
        closed.set()
        done.wait()

    with Forked(child, ch) as p:
        ch.send(b"hi")
        closed.wait()
        _fill(ch, 100)
        with pytest.raises(ChannelClosed):
            ch.send(b"x", timeout=WAIT)
        done.set()
        assert p.join() == 0


def test_close_idempotent_and_context_manager():
    c = Channel(capacity=256, num=4)
    c.send(b"x")
    c.close()
    c.close()
    assert "closed" in repr(c)
    with Channel(capacity=256, num=4) as c2:
        c2.send(b"y")
        assert c2.recv() == b"y"
    c2.close()
    with Channel(capacity=256, num=4, backend="shm") as c3:
        name = c3.name
        assert os.path.exists("/dev/shm" + name)
    assert not os.path.exists("/dev/shm" + name)     # the creator unlinked it


_AFTER_CLOSE = {
    "send": lambda c: c.send(b"x"),
    "send_nowait": lambda c: c.send_nowait(b"x"),
    "send_many": lambda c: c.send_many([b"x"]),
    "send_many_empty": lambda c: c.send_many([]),
    "loan": lambda c: c.loan(1),
    "recv": lambda c: c.recv(timeout=0),
    "recv_nowait": lambda c: c.recv_nowait(),
    "recv_into": lambda c: c.recv_into(bytearray(8)),
    "recv_view": lambda c: c.recv_view(timeout=0),
    "recv_many": lambda c: c.recv_many(timeout=0),
    "poll": lambda c: c.poll(),
    "fileno": lambda c: c.fileno(),
}

_AFTER_CLOSE_BUGS = {
    ("producer", "send_many"): "ChannelSender.send_many does not check for a closed channel: "
                               "it reads the unmapped ring (segfault)",
    ("producer", "send_many_empty"): "ChannelSender.send_many does not check for a closed "
                                     "channel: vrd_publish on the unmapped ring (segfault)",
    ("producer", "loan"): "Channel.loan calls _watch() (self._ring.words, None after close) "
                          "before the closed check: AttributeError",
    ("consumer", "poll"): "Channel.poll on a closed consumer returns False: "
                          "ChannelReceiver.pending() hides the closed state",
}


def _use_after_close(role, op):
    c = Channel(capacity=256, num=4)
    if role == "producer":
        c.send(b"a")
    elif role == "consumer":
        with pytest.raises(Empty):
            c.recv_nowait()
    c.close()
    with pytest.raises(ValueError):
        _AFTER_CLOSE[op](c)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("op", sorted(_AFTER_CLOSE))
@pytest.mark.parametrize("role", ["unbound", "producer", "consumer"])
def test_use_after_close_raises_valueerror(role, op, request):
    """Run in a forked child: a crash (use of the unmapped ring) fails the test
    instead of the whole run."""
    with Forked(_use_after_close, role, op) as p:
        code = p.join()
    assert code == 0, f"child exited with {code}" + (" (crashed)" if code < 0 else "")


# --- select / poll -------------------------------------------------------------------------

def _send_on_gate(ch, gate, msgs):
    for m in msgs:
        gate.wait()
        ch.send(m)


@pytest.mark.timeout(30)
def test_fileno_select(ch, gates):
    gate = gates()
    with Forked(_send_on_gate, ch, gate, [b"ping"]) as p:
        with pytest.raises(Empty):
            ch.recv_nowait()              # arms the eventfd
        fd = ch.fileno()
        assert select.select([fd], [], [], 0)[0] == []
        gate.set()
        assert select.select([fd], [], [], WAIT)[0] == [fd]
        assert ch.recv_nowait() == b"ping"
        assert p.join() == 0


@pytest.mark.timeout(30)
def test_fileno_not_readable_again_until_next_send(ch, gates):
    gate = gates()
    with Forked(_send_on_gate, ch, gate, [b"ping", b"pong"]) as p:
        for expect in (b"ping", b"pong"):
            with pytest.raises(Empty):
                ch.recv_nowait()
            fd = ch.fileno()
            assert select.select([fd], [], [], 0)[0] == [], "readable with nothing sent"
            gate.set()
            assert select.select([fd], [], [], WAIT)[0] == [fd]
            assert ch.recv_nowait() == expect
        assert p.join() == 0


@pytest.mark.timeout(30)
def test_poll(ch, gates):
    assert ch.poll() is False
    assert ch.poll(0.1) is False
    ch.send(b"local")
    assert ch.poll() is True and ch.poll(0) is True      # does not consume
    assert ch.recv_nowait() == b"local"
    assert ch.poll() is False
    gate = gates()

    def child(c):
        gate.wait()
        c.send(b"remote")

    with Channel(capacity=256, num=4) as c2, Forked(child, c2) as p:
        assert c2.poll() is False
        gate.set()
        assert c2.poll(WAIT) is True
        assert c2.recv_nowait() == b"remote"
        assert p.join() == 0
        with pytest.raises(PeerDead):
            c2.poll(WAIT)
