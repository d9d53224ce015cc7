"""Zero-copy behaviour of vringipc.Channel: recv_view / MessageView and loans.

* A MessageView (and anything made from it: memoryview, NumPy array) points
  into the shared segment itself, is read-only, and is never overwritten by
  later traffic while any of it is alive: the producer blocks (or gets Full)
  instead.  The space returns once the view and all its exports are gone.
* A loan hands the producer the segment bytes themselves; the consumer's view
  of that message is the very same memory.
* Closing the channel while views or loans are alive never leaves them
  dangling; the mapping goes away when the last of them does."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import weakref

import numpy as np
import pytest

from vringipc import Channel, Empty, Full, PeerDead

from forking import Forked, Gate

WAIT = 10.0


# --- helpers ------------------------------------------------------------------------

@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.close()


def _addr(arr: np.ndarray) -> int:
    return arr.__array_interface__["data"][0]


@contextlib.contextmanager
def segment_array(ch: Channel):
    """A writable NumPy array over the whole mapped segment (released on exit,
    so the channel can unmap it)."""
    seg = np.frombuffer(ch._ring.segment.buf, np.uint8)
    try:
        yield seg
    finally:
        del seg


def _window(ch: Channel):
    r = ch._ring.layout.rings[0]
    return r.win_off, r.win_off + r.win_size


def _pattern(seq: int, n: int) -> bytes:
    return bytes((seq * 31 + i) & 0xFF for i in range(min(n, 256))) * (n // 256) + \
        bytes((seq * 31 + i) & 0xFF for i in range(n % 256))


@pytest.fixture
def ch():
    c = Channel(capacity=65536, num=32)
    yield c
    c.close()


# --- where the bytes are --------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 64, 1000, 65536])
def test_recv_view_points_into_the_segment(ch, size):
    data = os.urandom(size)
    ch.send(data)
    lo, hi = _window(ch)
    with ch.recv_view(timeout=WAIT) as v:
        assert lo <= v.offset and v.offset + len(v) <= hi
        arr = np.frombuffer(v, np.uint8)
        with segment_array(ch) as seg:
            assert np.shares_memory(arr, seg)
            assert _addr(arr) - _addr(seg) == v.offset
            assert _addr(arr) % 64 == 0                       # allocations are cache-line aligned
            assert arr.tobytes() == data
            # the same memory: a write through the segment shows through the view
            seg[v.offset] ^= 0xFF
            assert arr[0] == data[0] ^ 0xFF and bytes(v)[0] == data[0] ^ 0xFF
        del arr


def test_view_is_read_only(ch):
    ch.send(b"immutable")
    with ch.recv_view() as v:
        arr = np.frombuffer(v, np.uint8)
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr.setflags(write=True)
        with pytest.raises(ValueError):
            arr[0] = 1
        mv = memoryview(v)
        assert mv.readonly
        with pytest.raises(TypeError):
            mv[0:1] = b"x"
        with pytest.raises((TypeError, BufferError)):
            (ctypes.c_char * len(v)).from_buffer(v)            # asks for a writable buffer
        mv.release()
        del arr
    assert v.released


def test_loan_points_into_the_segment_and_consumer_sees_same_memory(ch):
    lo, hi = _window(ch)
    n = 3000
    ln = ch.loan(n)
    assert lo <= ln.offset and ln.offset + n <= hi
    loan_off = ln.offset
    with ln as buf:
        a = np.frombuffer(buf, np.uint8)
        assert a.flags.writeable and a.size == n
        with segment_array(ch) as seg:
            assert np.shares_memory(a, seg)
            assert _addr(a) - _addr(seg) == loan_off
            a[:] = np.arange(n, dtype=np.uint32).astype(np.uint8)
            # written in place: the segment already holds it before the commit
            assert seg[loan_off + 7] == 7
        del a                      # release the export before the commit at block end
    with ch.recv_view(timeout=0) as v:
        assert v.offset == loan_off                       # the consumer reads the same bytes
        got = np.frombuffer(v, np.uint8)
        assert np.array_equal(got, np.arange(n, dtype=np.uint32).astype(np.uint8))
        del got


# --- lifetime ---------------------------------------------------------------------------------

def test_held_array_is_never_overwritten_single_process(ch):
    first = os.urandom(20000)
    ch.send(first)
    v = ch.recv_view()
    arr = np.frombuffer(v, np.uint8)
    del v
    gc.collect()
    assert ch.views_outstanding == 1          # the array keeps the message
    for i in range(200):                      # 800 KB through a 64 KiB arena: the
        ch.send_nowait(_pattern(i, 4000))     # pinned message holds only its own bytes
        assert ch.recv_nowait() == _pattern(i, 4000)
    assert ch._tx.pinned == (1, 20032)
    with pytest.raises(Full, match="held by the consumer"):
        ch.send(b"y" * (ch.capacity - 4096), timeout=0.1)   # cannot fit beside it: waits
    assert arr.tobytes() == first
    # drop the last export: the message goes back and traffic flows again
    del arr
    gc.collect()
    assert ch.views_outstanding == 0
    for i in range(100):
        ch.send_nowait(_pattern(i, 4000))
        assert ch.recv_nowait() == _pattern(i, 4000)
    ch.send_nowait(b"z" * ch.capacity)        # the whole arena is free
    assert ch.recv_nowait() == b"z" * ch.capacity


def _produce_patterns(ch, count, size, done):
    for i in range(count):
        ch.send(_pattern(i, size), timeout=WAIT)
    done.set()


@pytest.mark.timeout(30)
def test_held_array_is_never_overwritten_two_processes(ch, gate):
    count, size = 64, 4000                    # 256 KB through a 64 KiB arena
    with Forked(_produce_patterns, ch, count, size, gate) as p:
        v = ch.recv_view(timeout=WAIT)
        arr = np.frombuffer(v, np.uint8).reshape(40, 100)
        expect0 = _pattern(0, size)
        del v
        gc.collect()
        for got in range(1, count):           # traffic flows around the held array
            assert ch.recv(timeout=WAIT) == _pattern(got, size)
            assert arr.tobytes() == expect0   # and never overwrites it
        del arr
        gc.collect()
        gate.wait()
        assert p.join() == 0


def test_release_with_live_exports_is_deferred(ch):
    ch.send(b"deferred")
    v = ch.recv_view()
    m = memoryview(v)
    a = np.frombuffer(v, np.uint8)
    assert v.exports == 2
    v.release()
    assert not v.released and ch.views_outstanding == 1
    assert bytes(m) == b"deferred" and a.tobytes() == b"deferred"
    m.release()
    assert not v.released
    del a
    assert v.released and v.exports == 0 and ch.views_outstanding == 0
    for use in (lambda: memoryview(v), v.tobytes, lambda: bytes(v), lambda: np.frombuffer(v)):
        with pytest.raises(ValueError):
            use()
    v.release()                               # idempotent
    assert ch.views_outstanding == 0
    ch.send_nowait(b"w" * ch.capacity)        # and the space is back
    assert ch.recv_nowait() == b"w" * ch.capacity


def test_with_block_releases(ch):
    ch.send(b"one")
    with ch.recv_view() as v:
        assert ch.views_outstanding == 1
    assert v.released and ch.views_outstanding == 0
    # an array outliving the block keeps the message until it goes
    ch.send(b"two")
    with ch.recv_view() as v:
        a = np.frombuffer(v, np.uint8)
    assert not v.released and ch.views_outstanding == 1
    assert a.tobytes() == b"two"
    del a
    assert v.released and ch.views_outstanding == 0
    # an exception inside the block still releases
    ch.send(b"three")
    with pytest.raises(KeyError):
        with ch.recv_view() as v:
            raise KeyError
    assert v.released and ch.views_outstanding == 0


def test_garbage_collected_view_is_given_back(ch):
    for i in range(3 * 32):                   # three rounds of every descriptor
        ch.send(b"g%d" % i)
        v = ch.recv_view()
        assert bytes(v) == b"g%d" % i
        del v                                 # never released explicitly
    assert ch.views_outstanding == 0


def test_views_released_out_of_order(ch):
    msgs = [bytes([65 + i]) * 16000 for i in range(3)]
    for m in msgs:
        ch.send(m)
    views = [ch.recv_view() for _ in msgs]
    assert ch.views_outstanding == 3
    views[1].release()
    views[2].release()
    assert ch.views_outstanding == 1
    # the oldest is still held: only its own space is not reusable
    ch.send_nowait(b"n" * 16000)              # fits in the unused end of the arena
    ch.send_nowait(b"o" * 16000)              # and these where views 1 and 2 were
    ch.send_nowait(b"p" * 16000)
    with pytest.raises(Full):                 # the 4th 16000-byte slot is the held one
        ch.send_nowait(b"q" * 16000)
    assert bytes(views[0]) == msgs[0]
    for c in b"nop":
        assert ch.recv_nowait() == bytes([c]) * 16000
    views[0].release()
    assert ch.views_outstanding == 0
    ch.send_nowait(b"m" * ch.capacity)        # all of it back
    assert ch.recv_nowait() == b"m" * ch.capacity


def test_views_outstanding_counter(ch):
    assert ch.views_outstanding == 0
    for i in range(5):
        ch.send(b"%d" % i)
    vs = [ch.recv_view() for _ in range(5)]
    assert ch.views_outstanding == 5
    vs[3].release()
    assert ch.views_outstanding == 4
    del vs[0]
    assert ch.views_outstanding == 3
    assert "exports" in repr(vs[0])
    vs.clear()
    assert ch.views_outstanding == 0


def test_close_while_view_alive(ch):
    data = os.urandom(5000)
    ch.send(data)
    v = ch.recv_view()
    arr = np.frombuffer(v, np.uint8)
    mapping = weakref.ref(ch._ring.segment.buf)
    ch.close()
    gc.collect()
    # still mapped and readable, no crash
    assert mapping() is not None
    assert arr.tobytes() == data and bytes(v) == data and v.tobytes() == data
    v.release()                               # deferred: the array is alive
    assert arr.tobytes() == data
    del arr
    assert v.released
    del v
    gc.collect()
    assert mapping() is None, "the segment mapping outlived its last view"


def test_close_while_view_alive_view_dropped_first(ch):
    ch.send(b"abc" * 100)
    v = ch.recv_view()
    mapping = weakref.ref(ch._ring.segment.buf)
    ch.close()
    assert bytes(v) == b"abc" * 100
    del v
    gc.collect()
    assert mapping() is None


def test_close_while_loan_alive(ch):
    ln = ch.loan(1000)
    mv = memoryview(ln)
    mapping = weakref.ref(ch._ring.segment.buf)
    ch.close()
    mv[:5] = b"still"                         # writable, mapped: no crash
    assert bytes(mv[:5]) == b"still"
    mv.release()
    with pytest.raises(ValueError):
        ln.commit()                           # nowhere to publish
    ln.cancel()
    del ln
    gc.collect()
    assert mapping() is None


# --- a NumPy pipeline ---------------------------------------------------------------------------

SHAPE = (480, 640, 3)


def _frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, SHAPE, dtype=np.uint8)


def _produce_frames(ch, n):
    for k in range(n):
        frame = _frame(k)
        with ch.loan(frame.nbytes, timeout=WAIT) as buf:
            dst = np.frombuffer(buf, np.uint8).reshape(SHAPE)
            np.copyto(dst, frame)
            del dst
    ch.close()


@pytest.mark.timeout(60)
def test_numpy_frames_via_loan_and_recv_view():
    n = 12
    with Channel() as c:                      # default 4 MiB: a few frames in flight
        assert c.capacity >= 4 * int(np.prod(SHAPE))
        with Forked(_produce_frames, c, n) as p:
            lo, hi = _window(c)
            for k in range(n):
                with c.recv_view(timeout=WAIT) as msg:
                    assert lo <= msg.offset < hi and len(msg) == int(np.prod(SHAPE))
                    img = np.frombuffer(msg, np.uint8).reshape(SHAPE)
                    assert img.ctypes.data % 64 == 0 and not img.flags.writeable
                    assert np.array_equal(img, _frame(k)), f"frame {k} differs"
                    del img
            from vringipc import ChannelClosed
            with pytest.raises(ChannelClosed):
                c.recv(timeout=WAIT)
            assert p.join() == 0
        assert c.views_outstanding == 0


@pytest.mark.timeout(30)
def test_consumer_holding_frames_while_producer_dies(gate):
    """Views taken before the producer died stay valid and intact."""
    def producer(c):
        for k in range(3):
            f = _frame(k)
            with c.loan(f.nbytes) as buf:
                np.copyto(np.frombuffer(buf, np.uint8).reshape(SHAPE), f)
        gate.wait()
        os.kill(os.getpid(), signal.SIGKILL)

    with Channel() as c, Forked(producer, c) as p:
        held = []
        for k in range(3):
            v = c.recv_view(timeout=WAIT)
            held.append(np.frombuffer(v, np.uint8).reshape(SHAPE))
        del v
        gate.set()
        with pytest.raises(PeerDead):
            c.recv(timeout=WAIT)
        assert p.join() == -signal.SIGKILL
        for k in range(3):
            assert np.array_equal(held[k], _frame(k))
        assert c.views_outstanding == 3
        held.clear()
        assert c.views_outstanding == 0
