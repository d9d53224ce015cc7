"""QueueCore.take_packed / put_packed: runs of plain messages (no
out-of-band buffers) moved in one call, as the bridge does (see
vringipc/bridge.py).  What they take and put must be exactly what
get_message / put_message would have."""

from __future__ import annotations

import queue
import struct
import threading

import numpy as np
import pytest

from vringipc import Queue
from forking import Forked

WAIT = 20
pytestmark = pytest.mark.timeout(120)


def unpack(count, meta):
    kinds = struct.unpack_from(f"<{2 * count}H", meta, 0)
    lens = struct.unpack_from(f"<{count}I", meta, 4 * count)
    return kinds, lens


def test_takes_the_plain_run_and_leaves_the_rest_queued():
    q = Queue()
    items = [b"", b"a", b"x" * 63, {"k": 1}, b"y" * 100]
    for it in items:
        q.put(it)
    q.put(np.arange(10))                 # out-of-band buffer: not plain
    q.put(b"z" * 5)
    q.put(b"w" * 9000)                   # not under max_len
    assert q.get_message(False)[1] == b""     # the ordinary way (registers this process)
    core = q._core
    cnt, meta, blob = core.take_packed(100, 1 << 20, 8192)
    assert cnt == 4 and isinstance(blob, bytearray)
    kinds, lens = unpack(cnt, meta)
    assert kinds[1::2] == (0, 0, 0, 0) and lens == (1, 63, len(blob) - 164, 100)
    assert kinds[0::2] == (2, 2, 0, 2)   # raw bytes, raw bytes, pickle, raw bytes
    assert core.take_packed(100, 1 << 20, 8192)[0] == 0      # the array is next
    np.testing.assert_array_equal(q.get(False), np.arange(10))
    assert core.take_packed(100, 1 << 20, 8192)[:2] == (1, struct.pack("<HHI", 2, 0, 5))
    assert core.take_packed(100, 1 << 20, 8192)[0] == 0      # 9000 bytes >= max_len
    assert q.get(False) == b"w" * 9000
    assert core.take_packed(100, 1 << 20, 8192) == (0, b"", b"")   # empty
    q.close()


def test_count_and_byte_limits():
    q = Queue()
    for i in range(10):
        q.put(bytes([i]) * 10)
    q.get_message(False)
    core = q._core
    assert core.take_packed(3, 1 << 20, 8192)[0] == 3
    cnt, meta, blob = core.take_packed(100, 25, 8192)        # two of 10 bytes fit in 25
    assert cnt == 2 and bytes(blob) == bytes([4]) * 10 + bytes([5]) * 10
    with pytest.raises(ValueError):
        core.take_packed(0, 1 << 20, 8192)
    assert core.take_packed(100, 1 << 20, 8192)[0] == 4
    q.close()


def test_round_trip_into_another_queue_with_a_record():
    a, b = Queue(), Queue()
    items = [b"one", {"two": 2}, b"", b"four" * 50, ("five", 5.0)]
    for it in items:
        a.put(it)
    a.get_message(False)                 # take b"one" the ordinary way
    b.put(b"one")
    cnt, meta, blob = a._core.take_packed(100, 1 << 20, 8192)
    assert cnt == 4
    rec = bytearray(24)
    assert b._core.put_packed(meta, blob, 1, cnt, record=rec, record_off=8, seq=40) == 3
    assert struct.unpack_from("<Q", rec, 8)[0] == 43           # 40 + the three put
    assert [b.get(timeout=WAIT) for _ in range(4)] == [b"one", b"", b"four" * 50, ("five", 5.0)]
    a.close()
    b.close()


def test_put_packed_refuses_bad_input_before_putting_anything():
    q = Queue()
    good = struct.pack("<HHHHII", 2, 0, 2, 0, 3, 4)
    assert q._core.put_packed(good, b"abcdefg", 0, 2) == 2
    assert [q.get(timeout=WAIT), q.get(timeout=WAIT)] == [b"abc", b"defg"]
    bad = [
        (struct.pack("<HHHHII", 2, 0, 7, 0, 3, 4), b"abcdefg", 2),    # unknown kind
        (struct.pack("<HHHHII", 2, 0, 2, 1, 3, 4), b"abcdefg", 2),    # buffers
        (struct.pack("<HHHHII", 2, 0, 2, 0, 3, 9), b"abcdefg", 2),    # lengths vs blob
        (good[:-1], b"abcdefg", 2),                                    # meta size
        (good, b"abcdefg", 3),                                         # count vs meta
    ]
    for meta, blob, count in bad:
        with pytest.raises(ValueError):
            q._core.put_packed(meta, blob, 0, count)
    with pytest.raises(ValueError):
        q._core.put_packed(good, b"abcdefg", 0, 2, record=bytearray(8), record_off=8)
    assert q.qsize() == 0
    q.close()


def test_put_packed_stops_at_a_full_queue_and_says_how_far_it_got():
    q = Queue(3)
    meta = struct.pack("<5I", *[2] * 5) + struct.pack("<5I", *[1] * 5)
    rec = bytearray(8)
    assert q._core.put_packed(meta, b"abcde", 0, 5, False, record=rec, seq=10) == 3
    assert struct.unpack("<Q", rec)[0] == 13
    assert q._core.put_packed(meta, b"abcde", 3, 5, True, 0.05) == 0      # timed out
    assert [q.get(timeout=WAIT) for _ in range(3)] == [b"a", b"b", b"c"]
    assert q._core.put_packed(meta, b"abcde", 3, 5, True, WAIT) == 2
    assert [q.get(timeout=WAIT) for _ in range(2)] == [b"d", b"e"]
    q.close()


def _producer(q, n, tag):
    for i in range(n):
        q.put(b"%c%d" % (tag, i))


def test_threads_taking_packed_runs_from_forked_producers_get_each_item_once():
    # Two producer processes, three consumer threads of this process mixing
    # take_packed with get_message: every item exactly once, in order per
    # producer within each consumer.
    N = 20000
    q = Queue(256)
    seen = [[] for _ in range(3)]
    done = threading.Event()

    def get_one(k):
        try:
            _kind, main, _bufs = q.get_message(True, 0.05)
            seen[k].append(bytes(main))
        except queue.Empty:
            pass

    def consume(k):
        core = q._core
        while not (done.is_set() and q.qsize() == 0):
            cnt = 0
            if k != 2:                   # thread 2 only ever takes one at a time
                cnt, meta, blob = core.take_packed(64, 1 << 16, 8192)
            if not cnt:
                get_one(k)
                continue
            _kinds, lens = unpack(cnt, meta)
            pos = 0
            for ln in lens:
                seen[k].append(bytes(blob[pos:pos + ln]))
                pos += ln

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    prods = [Forked(_producer, q, N, tag) for tag in (ord("a"), ord("b"))]
    try:
        for p in prods:
            assert p.join(60) == 0
    finally:
        done.set()
        for t in threads:
            t.join(60)
    # every item once (the stdlib's pickled bytes: raw-bytes kind, so main is the item)
    items = [x for s in seen for x in s]
    assert len(items) == 2 * N and len(set(items)) == 2 * N
    for s in seen:
        for tag in b"ab":
            nums = [int(x[1:]) for x in s if x[0] == tag]
            assert nums == sorted(nums)
    q.close()


def test_a_malformed_message_after_good_ones_is_raised_on_the_next_call():
    # The bytes of shared memory are not trusted: a descriptor pointing past
    # the segment is consumed and reported, after the good messages taken
    # before it have been returned; the queue goes on.
    from vringipc import InvalidDescriptor
    q = Queue()
    for m in (b"a", b"b", b"c", b"d"):
        q.put(m)
    buf, r = q._ring.segment.buf, q._ring.layout.rings[0]
    head = struct.unpack_from("<H", buf, r.avail_off + 4 + 2 * 3)[0]      # the 4th message
    struct.pack_into("<Q", buf, r.desc_off + 16 * head, 1 << 60)             # its address
    cnt, meta, blob = q._core.take_packed(100, 1 << 20, 8192)
    assert cnt == 3 and bytes(blob) == b"abc"
    with pytest.raises(InvalidDescriptor):
        q._core.take_packed(100, 1 << 20, 8192)
    q.put(b"e")
    assert q._core.take_packed(100, 1 << 20, 8192)[0::2] == (1, bytearray(b"e"))
    q.close()
