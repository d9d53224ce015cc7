"""A hostile producer (and a hostile device) against the ring core.

Every input of VRING_NOTES.md section 4 ("Hostile driver inputs", rows 1-31
where they apply) and the host-API misuse list, each as its own test asserting
the "ours" column:

* RING (InvalidRing): errno EINVAL, ``head is None``, ``last_avail_idx``
  unchanged, ``host.broken`` - and getdesc keeps raising InvalidRing, even once
  the ring is repaired, until ``set_base()``.
* DESC (InvalidDescriptor): the exact errno, ``exc.head`` the real head,
  ``last_avail_idx`` +1, the head in flight; ``complete(head, 0)`` hands it back
  (used entry {head, 0}) and the next valid chain is processed normally.

The test is the producer: descriptors, indirect tables, avail entries and
payload are written as raw bytes with struct.pack_into into an anonymous mmap
laid out by SegmentLayout.build.  VringDriver is only used for valid setup and
for the driver-side tests (where the test plays a hostile *device* writing the
used ring).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vringipc import Iov, InvalidDescriptor, InvalidRing, VringDriver, VringHost
from vringipc import layout as L
from vringipc.errors import PeerDead
from vringipc.ring import SharedRing

NEXT, WRITE, INDIRECT = 1, 2, 4
FEAT_ALL = L.F_EVENT_IDX | L.F_INDIRECT_DESC
U64 = 1 << 64
DESC = struct.Struct("<QIHH")
RECOVER = 7          # descriptor index kept free for the "next valid chain" check (num 8)


class Raw:
    """One split ring in an anonymous mmap, written byte by byte by the test."""

    def __init__(self, num=8, arena=4096, features=FEAT_ALL):
        self.lay = L.SegmentLayout.build([num], [arena], features=features)
        self.buf = mmap.mmap(-1, self.lay.seg_size)
        self.buf[:L.HDR_SIZE] = self.lay.pack_header()
        self.r = self.lay.rings[0]
        self.num = num
        self.A = self.r.win_off                      # first addressable byte
        self.END = self.r.win_off + self.r.win_size  # one past the last
        self.idx = 0                                 # our avail idx shadow
        self.sides = []

    # --- the two sides ----------------------------------------------------------
    def host(self, **kw):
        kw.setdefault("features", self.lay.features)
        h = VringHost(self.buf, *self.r.ring_args(), **kw)
        self.sides.append(h)
        return h

    def driver(self, **kw):
        kw.setdefault("features", self.lay.features)
        d = VringDriver(self.buf, *self.r.ring_args(), **kw)
        self.sides.append(d)
        return d

    def close(self):
        for s in self.sides:
            s.close()
        self.sides = []
        try:
            self.buf.close()
        except BufferError:  # an Iov still alive in a traceback; GC will do it
            pass

    # --- hostile producer writes --------------------------------------------------
    def desc(self, i, addr, ln, flags=0, nxt=0, table=None):
        """Write descriptor i of the main table (or of the table at offset `table`)."""
        base = self.r.desc_off if table is None else table
        DESC.pack_into(self.buf, base + 16 * i, addr % U64, ln, flags, nxt)

    def table(self, off, entries):
        for i, e in enumerate(entries):
            self.desc(i, *e, table=off)

    def data(self, off, payload: bytes):
        self.buf[off:off + len(payload)] = payload

    def avail(self, *heads):
        """Put heads in the next avail slots and publish the index."""
        for h in heads:
            struct.pack_into("<H", self.buf, self.r.avail_off + 4 + 2 * (self.idx % self.num), h)
            self.idx = (self.idx + 1) & 0xFFFF
        self.set_avail_idx(self.idx)

    def set_avail_idx(self, v):
        struct.pack_into("<H", self.buf, self.r.avail_off + 2, v & 0xFFFF)

    def used_idx(self):
        return struct.unpack_from("<H", self.buf, self.r.used_off + 2)[0]

    def used_elem(self, k):
        return struct.unpack_from("<II", self.buf, self.r.used_off + 4 + 8 * (k % self.num))

    def put_used(self, k, head, ln):
        """Hostile device: write used.ring[k] (not the index)."""
        struct.pack_into("<II", self.buf, self.r.used_off + 4 + 8 * (k % self.num), head, ln)

    def set_used_idx(self, v):
        struct.pack_into("<H", self.buf, self.r.used_off + 2, v & 0xFFFF)


@pytest.fixture
def raw():
    rings = []

    def make(**kw):
        rr = Raw(**kw)
        rings.append(rr)
        return rr

    yield make
    for rr in rings:
        rr.close()


@pytest.fixture
def rr(raw):
    return raw()


# --------------------------------------------------------------------------
# outcome checkers
# --------------------------------------------------------------------------

def recover_and_continue(rr, h, payload=b"recovered"):
    """A following valid chain (descriptor RECOVER) is processed normally."""
    off = rr.END - 64
    rr.data(off, payload)
    rr.desc(RECOVER, off, len(payload))
    rr.avail(RECOVER)
    riov, wiov = Iov(), Iov()
    head = h.getdesc(riov, wiov)
    assert head == RECOVER
    assert riov.pull() == payload and wiov.nsegs == 0
    h.complete(head, 0)
    assert not h.broken


def expect_desc(rr, h, err, head, riov="new", wiov="new", recover=True):
    """getdesc raises InvalidDescriptor(err, head): consumed, in flight,
    completable with length 0, and the ring carries on."""
    riov = Iov() if riov == "new" else riov
    wiov = Iov() if wiov == "new" else wiov
    before, inflight, used_before = h.last_avail_idx, h.in_flight, rr.used_idx()
    with pytest.raises(InvalidDescriptor) as ei:
        h.getdesc(riov, wiov)
    e = ei.value
    assert type(e) is InvalidDescriptor
    assert isinstance(e, OSError)
    assert e.errno == err, f"errno {errno.errorcode.get(e.errno)} ({e}), expected {errno.errorcode[err]}"
    assert e.head == head
    assert h.last_avail_idx == (before + 1) & 0xFFFF
    assert h.in_flight == inflight + 1
    assert not h.broken
    # The bad chain has no writable capacity to speak of: only length 0 is allowed.
    with pytest.raises(ValueError):
        h.complete(head, 1)
    h.complete(head, 0)
    assert rr.used_idx() == (used_before + 1) & 0xFFFF
    assert rr.used_elem(used_before) == (head, 0)
    assert h.in_flight == inflight
    if recover:
        recover_and_continue(rr, h)
    return e


def expect_ring(rr, h, repair, base=0, riov="new", wiov="new"):
    """getdesc raises InvalidRing(EINVAL, head None): nothing consumed, broken,
    and it keeps failing - even after `repair()` fixes the shared ring - until
    set_base(base); then the repaired ring works."""
    riov = Iov() if riov == "new" else riov
    wiov = Iov() if wiov == "new" else wiov
    before, inflight, used_before = h.last_avail_idx, h.in_flight, rr.used_idx()
    with pytest.raises(InvalidRing) as ei:
        h.getdesc(riov, wiov)
    e = ei.value
    assert type(e) is InvalidRing
    assert e.errno == errno.EINVAL and e.head is None
    assert h.last_avail_idx == before and h.in_flight == inflight
    assert h.broken
    assert rr.used_idx() == used_before
    for _ in range(3):
        with pytest.raises(InvalidRing):
            h.getdesc(Iov(), Iov())
        assert h.last_avail_idx == before and h.broken
    repair()
    with pytest.raises(InvalidRing, match="broken"):
        h.getdesc(Iov(), Iov())
    assert h.last_avail_idx == before
    h.set_base(base)
    assert not h.broken and h.in_flight == 0 and h.last_avail_idx == base
    return e


def ok_chain(h, riov=None, wiov=None):
    riov = Iov() if riov is None else riov
    wiov = Iov() if wiov is None else wiov
    head = h.getdesc(riov, wiov)
    assert head is not None
    return head, riov, wiov


# ==========================================================================
# RING errors (rows 1, 2, same head twice)
# ==========================================================================

@pytest.mark.parametrize("bad", [8, 9, 0x8000, 0xFFFF])
def test_r01_head_out_of_range(rr, bad):
    h = rr.host()
    rr.desc(0, rr.A, 4)
    rr.avail(bad)

    def repair():
        struct.pack_into("<H", rr.buf, rr.r.avail_off + 4, 0)

    expect_ring(rr, h, repair)
    head, riov, _ = ok_chain(h)
    assert head == 0 and riov.total == 4


def test_r01_head_out_of_range_after_good_chains(rr):
    """A bad head in a later slot: the earlier chains are served, the bad one is
    not consumed, and the in-flight good chain can still be completed."""
    h = rr.host()
    rr.desc(0, rr.A, 4)
    rr.desc(1, rr.A + 4, 4)
    rr.avail(0, 1, 200)
    a, _, _ = ok_chain(h)
    b, _, _ = ok_chain(h)
    assert (a, b) == (0, 1) and h.last_avail_idx == 2
    with pytest.raises(InvalidRing) as ei:
        h.getdesc(Iov(), Iov())
    assert ei.value.errno == errno.EINVAL and ei.value.head is None
    assert h.last_avail_idx == 2 and h.broken and h.in_flight == 2


@pytest.mark.parametrize("idx", [9, 100, 0x8000], ids=lambda v: f"idx{v}")
def test_r02_avail_idx_jump(rr, idx):
    h = rr.host()
    for i in range(8):
        rr.desc(i, rr.A + i, 1)
    rr.avail(*range(8))        # writes 8 valid slots...
    rr.set_avail_idx(idx)      # ...but claims more than num entries

    expect_ring(rr, h, lambda: rr.set_avail_idx(8))
    for i in range(8):
        assert ok_chain(h)[0] == i


def test_r02_avail_idx_exactly_num_is_fine(rr):
    h = rr.host()
    for i in range(8):
        rr.desc(i, rr.A + i, 1)
    rr.avail(*range(8))
    assert [ok_chain(h)[0] for _ in range(8)] == list(range(8))
    assert h.getdesc(Iov(), Iov()) is None and not h.broken


def test_r02_avail_idx_backwards_from_zero(rr):
    h = rr.host()
    rr.desc(0, rr.A, 1)
    rr.avail(0)
    rr.set_avail_idx(0xFFFF)   # "decremented" below the start

    expect_ring(rr, h, lambda: rr.set_avail_idx(1))
    assert ok_chain(h)[0] == 0


def test_r02_avail_idx_backwards_after_consuming(rr):
    h = rr.host()
    rr.desc(0, rr.A, 1)
    rr.desc(1, rr.A + 1, 1)
    rr.avail(0, 1)
    for want in (0, 1):
        head, _, _ = ok_chain(h)
        assert head == want
        h.complete(head, 0)
    rr.set_avail_idx(1)        # spec: the driver MUST NOT decrement avail->idx
    assert h.last_avail_idx == 2

    def repair():
        rr.set_avail_idx(3)
        struct.pack_into("<H", rr.buf, rr.r.avail_off + 4 + 2 * 2, 1)

    expect_ring(rr, h, repair, base=2)
    assert ok_chain(h)[0] == 1


def test_r02_avail_idx_backwards_wrapping(rr):
    """Across the 16-bit wrap: from base 0xFFFE, moving the index back by one."""
    h = rr.host()
    h.set_base(0xFFFE)
    rr.idx = 0xFFFE
    rr.desc(0, rr.A, 1)
    rr.desc(1, rr.A + 1, 1)
    rr.avail(0, 1)             # idx wraps to 0
    assert rr.idx == 0
    assert ok_chain(h)[0] == 0 and ok_chain(h)[0] == 1
    assert h.last_avail_idx == 0
    rr.set_avail_idx(0xFFFF)
    expect_ring(rr, h, lambda: rr.set_avail_idx(0), base=0)
    assert h.getdesc(Iov(), Iov()) is None


def test_r_same_head_twice_in_flight(rr):
    h = rr.host()
    rr.desc(0, rr.A, 4)
    rr.avail(0, 0)
    head, _, _ = ok_chain(h)
    assert head == 0 and h.last_avail_idx == 1

    def repair():
        struct.pack_into("<H", rr.buf, rr.r.avail_off + 4 + 2, 0)

    expect_ring(rr, h, repair, base=1)   # set_base forgets the in-flight head 0
    assert ok_chain(h)[0] == 0


def test_r_same_head_twice_after_descriptor_error(rr):
    """A head whose chain failed is still in flight until completed: offering it
    again before that is a ring error too."""
    h = rr.host()
    rr.desc(0, 0, 4)           # bad address
    rr.avail(0, 0)
    with pytest.raises(InvalidDescriptor):
        h.getdesc(Iov(), Iov())
    with pytest.raises(InvalidRing) as ei:
        h.getdesc(Iov(), Iov())
    assert ei.value.head is None and h.broken and h.last_avail_idx == 1


def test_r_same_head_again_after_completion_is_fine(rr):
    h = rr.host()
    rr.desc(0, rr.A, 4)
    rr.avail(0)
    head, _, _ = ok_chain(h)
    h.complete(head, 0)
    rr.avail(0)
    assert ok_chain(h)[0] == 0 and not h.broken


def test_r_broken_reported_until_set_base(rr):
    """The broken state survives even a ring that looks empty again."""
    h = rr.host()
    rr.avail(8)
    with pytest.raises(InvalidRing):
        h.getdesc(Iov(), Iov())
    rr.set_avail_idx(0)        # "nothing there" now
    with pytest.raises(InvalidRing):
        h.getdesc(Iov(), Iov())
    h.set_base(0)
    assert h.getdesc(Iov(), Iov()) is None


# ==========================================================================
# Row 3 / 4: header rewritten after attach; segment resize
# ==========================================================================

def test_r03_header_rewritten_after_attach():
    with SharedRing.create(num=8, slot_size=64, backend="memfd") as ring:
        h = ring.host()
        d = ring.driver(slot_size=64)
        hdr = bytearray(ring.segment.buf[:L.HDR_SIZE])
        # The producer rewrites num, every offset, the window and the features.
        junk = bytearray(b"\xa5" * L.HDR_SIZE)
        struct.pack_into("<HHIQQQQQQ", junk, L.RING_TABLE_OFF, 3, 1, 0, 0, 8, 16, 1, 0, 1 << 40)
        ring.segment.buf[:L.HDR_SIZE] = bytes(junk)
        with pytest.raises(L.LayoutError):
            L.parse_header(ring.segment.buf)
        assert h.num == 8 and h.event_idx and h.indirect
        for k in range(20):
            msg = b"msg%d" % k
            assert d.add_slot(msg) is not None
            riov = Iov()
            head = h.getdesc(riov)
            assert riov.pull() == msg
            h.complete(head, 0)
            assert d.get_buf() == (None, 0)
        assert not h.broken and not d.broken
        ring.segment.buf[:L.HDR_SIZE] = bytes(hdr)


def test_r04_memfd_segment_cannot_be_shrunk_under_the_host():
    with SharedRing.create(num=8, slot_size=64, backend="memfd") as ring:
        h = ring.host()
        with pytest.raises(PermissionError):
            os.ftruncate(ring.segment.fd, 4096)
        with pytest.raises(PermissionError):
            os.ftruncate(ring.segment.fd, ring.segment.size * 2)
        assert h.getdesc(Iov()) is None


# ==========================================================================
# DESC errors: chain structure (rows 5, 6, 7)
# ==========================================================================

@pytest.mark.parametrize("nxt", [8, 9, 0xFFFF])
def test_r05_next_out_of_range(rr, nxt):
    h = rr.host()
    rr.desc(2, rr.A, 4, NEXT, nxt)
    rr.avail(2)
    expect_desc(rr, h, errno.EINVAL, 2)


def test_r05_next_out_of_range_later_in_chain(rr):
    h = rr.host()
    rr.desc(0, rr.A, 4, NEXT, 1)
    rr.desc(1, rr.A + 4, 4, NEXT, 8)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r06_self_loop(rr):
    h = rr.host()
    rr.desc(3, rr.A, 1, NEXT, 3)
    rr.avail(3)
    expect_desc(rr, h, errno.ELOOP, 3)


def test_r06_two_cycle(rr):
    h = rr.host()
    rr.desc(0, rr.A, 1, NEXT, 1)
    rr.desc(1, rr.A + 1, 1, NEXT, 0)
    rr.avail(0)
    expect_desc(rr, h, errno.ELOOP, 0)


def test_r06_long_cycle_writable(rr):
    """Loop through writable descriptors only (readable-after-writable cannot fire)."""
    h = rr.host()
    for i in range(6):
        rr.desc(i, rr.A + 8 * i, 8, WRITE | NEXT, (i + 1) % 6)
    rr.avail(0)
    expect_desc(rr, h, errno.ELOOP, 0)


def test_r06_chain_of_num_descriptors_is_legal(raw):
    """The longest legal chain: every descriptor once (num one-byte buffers, row 25)."""
    rr = raw(num=8)
    h = rr.host()
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    for k, i in enumerate(order):
        last = k == len(order) - 1
        rr.data(rr.A + k, bytes([65 + k]))
        rr.desc(i, rr.A + k, 1, 0 if last else NEXT, 0 if last else order[k + 1])
    rr.avail(order[0])
    head, riov, _ = ok_chain(h)
    assert head == 5 and riov.nsegs == 8 and riov.pull() == b"ABCDEFGH"


@pytest.mark.timeout(10)
def test_r07_indirect_next_cycle_in_main_table(rr):
    """vringh never detects this (iov grows to ENOMEM); we count every
    main-table descriptor, INDIRECT ones included: ELOOP, with at most num
    table entries collected."""
    h = rr.host()
    t1, t2 = rr.A + 256, rr.A + 512
    rr.table(t1, [(rr.A, 1, 0, 0)])
    rr.table(t2, [(rr.A + 1, 1, 0, 0)])
    rr.desc(1, t1, 16, INDIRECT | NEXT, 2)
    rr.desc(2, t2, 16, INDIRECT | NEXT, 1)
    rr.avail(1)
    riov = Iov()
    expect_desc(rr, h, errno.ELOOP, 1, riov=riov)
    assert riov.nsegs <= rr.num


@pytest.mark.timeout(10)
def test_r07_indirect_self_cycle(rr):
    h = rr.host()
    t = rr.A + 256
    rr.table(t, [(rr.A, 1, 0, 0)])
    rr.desc(4, t, 16, INDIRECT | NEXT, 4)
    rr.avail(4)
    expect_desc(rr, h, errno.ELOOP, 4)


@pytest.mark.timeout(20)
def test_r07_indirect_next_cycle_at_max_num(raw):
    """The same cycle at num=32768 with tables of 1 entry: still ELOOP, the
    collected segments bounded by num (max_iov raised so the loop check is what
    fires)."""
    rr = raw(num=32768, arena=1 << 16)
    h = rr.host(max_iov=65536)
    t1, t2 = rr.A + 4096, rr.A + 8192
    rr.table(t1, [(rr.A, 1, 0, 0)])
    rr.table(t2, [(rr.A + 1, 1, 0, 0)])
    rr.desc(1, t1, 16, INDIRECT | NEXT, 2)
    rr.desc(2, t2, 16, INDIRECT | NEXT, 1)
    rr.avail(1)
    riov = Iov()
    with pytest.raises(InvalidDescriptor) as ei:
        h.getdesc(riov, Iov())
    assert ei.value.errno == errno.ELOOP and ei.value.head == 1
    assert riov.nsegs <= 32768
    h.complete(1, 0)


@pytest.mark.timeout(20)
def test_r07_indirect_next_cycle_big_tables_bounded_by_max_iov(raw):
    """Two full-size tables (num entries each) chained in a cycle: the segment
    cap (default max_iov 1024) stops it first - E2BIG, never unbounded growth."""
    rr = raw(num=256, arena=1 << 16)
    h = rr.host()
    t1, t2 = rr.A + 4096, rr.A + 8192
    rr.table(t1, [(rr.A, 1, NEXT, k + 1) if k < 255 else (rr.A, 1, 0, 0) for k in range(256)])
    rr.table(t2, [(rr.A, 1, NEXT, k + 1) if k < 255 else (rr.A, 1, 0, 0) for k in range(256)])
    rr.desc(1, t1, 256 * 16, INDIRECT | NEXT, 2)
    rr.desc(2, t2, 256 * 16, INDIRECT | NEXT, 1)
    rr.avail(1)
    riov = Iov()
    with pytest.raises(InvalidDescriptor) as ei:
        h.getdesc(riov, Iov())
    assert ei.value.errno == errno.E2BIG and ei.value.head == 1
    assert riov.nsegs <= 1024


# ==========================================================================
# DESC errors: addresses (rows 8, 9, 10, 11, 26)
# ==========================================================================

def _addr_cases(rr):
    r = rr.r
    return {
        "below-by-1": (rr.A - 1, 1),
        "below-straddling": (rr.A - 8, 16),
        "above": (rr.END, 1),
        "far-above": (rr.END + (1 << 40), 4),
        "header": (0, 16),
        "header-magic": (8, 8),
        "desc-table": (r.desc_off, 16),
        "avail-ring": (r.avail_off, 4),
        "used-ring": (r.used_off, 8),
        "used-event": (r.used_event_off, 2),
        "avail-event": (r.avail_event_off, 2),
        "past-segment": (rr.lay.seg_size, 1),
        "top-of-u64": (U64 - 16, 8),
    }


ADDR_CASES = [
    "below-by-1", "below-straddling", "above", "far-above", "header", "header-magic",
    "desc-table", "avail-ring", "used-ring", "used-event", "avail-event", "past-segment", "top-of-u64"]


@pytest.mark.parametrize("case", ADDR_CASES)
@pytest.mark.parametrize("flags", [0, WRITE], ids=["R", "W"])
def test_r08_r26_addr_outside_arena(rr, case, flags):
    h = rr.host()
    addr, ln = _addr_cases(rr)[case]
    rr.desc(0, addr, ln, flags)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r08_addr_outside_arena_second_descriptor(rr):
    h = rr.host()
    rr.desc(0, rr.A, 8, NEXT, 1)
    rr.desc(1, rr.r.used_off, 8, WRITE)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


@pytest.mark.parametrize("addr,ln", [
    (U64 - 16, 32), (U64 - 1, 2), (U64 - 1, 1), (U64 - 0x1000, 0xFFFFFFFF),
], ids=["-16+32", "-1+2", "-1+1 (ends at 2^64)", "-4K+4G"])
def test_r09_addr_len_wraps_2_64(rr, addr, ln):
    h = rr.host()
    rr.desc(0, addr, ln)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


@pytest.mark.parametrize("delta", [1, 8, 0xFFFFFFFF], ids=["1-past", "8-past", "4G"])
def test_r10_len_past_arena_end(rr, delta):
    h = rr.host()
    if delta == 0xFFFFFFFF:
        rr.desc(0, rr.A, delta, WRITE)
    else:
        rr.desc(0, rr.END - 8, 8 + delta)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r10_whole_arena_is_fine(rr):
    h = rr.host()
    rr.desc(0, rr.A, rr.END - rr.A, WRITE)
    rr.avail(0)
    head, riov, wiov = ok_chain(h)
    assert wiov.segments == [(rr.A, rr.END - rr.A)] and riov.nsegs == 0
    h.complete(head, rr.END - rr.A)
    assert rr.used_elem(0) == (0, rr.END - rr.A)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("flags", [0, WRITE], ids=["R", "W"])
def test_r11_len_zero_is_empty_segment(rr, where, flags):
    h = rr.host()
    addr = {"start": rr.A, "middle": rr.A + 100, "end": rr.END}[where]
    rr.desc(0, addr, 0, flags)
    rr.avail(0)
    head, riov, wiov = ok_chain(h)
    iov = wiov if flags else riov
    other = riov if flags else wiov
    assert head == 0
    assert iov.segments == [(addr, 0)] and iov.total == 0 and other.nsegs == 0
    if flags:
        assert iov.push(b"x") == 0
        with pytest.raises(ValueError):
            h.complete(head, 1)
    else:
        assert iov.pull() == b""
    h.complete(head, 0)


def test_r11_len_zero_between_data(rr):
    h = rr.host()
    rr.data(rr.A, b"ab")
    rr.data(rr.END - 2, b"cd")
    rr.desc(0, rr.A, 2, NEXT, 1)
    rr.desc(1, rr.END, 0, NEXT, 2)
    rr.desc(2, rr.END - 2, 2)
    rr.avail(0)
    _, riov, _ = ok_chain(h)
    assert riov.nsegs == 3 and riov.total == 4 and riov.pull() == b"abcd"


@pytest.mark.parametrize("addr", ["END+1", "A-1", "0", "desc", "used", "2^64-1"])
def test_r11_len_zero_outside_arena_refused(rr, addr):
    """An empty segment still needs an address in the arena, and is never
    expanded (vringh's addr 0 / len 0 quirk)."""
    h = rr.host()
    a = {"END+1": rr.END + 1, "A-1": rr.A - 1, "0": 0, "desc": rr.r.desc_off,
         "used": rr.r.used_off, "2^64-1": U64 - 1}[addr]
    rr.desc(0, a, 0, WRITE)
    rr.avail(0)
    wiov = Iov()
    expect_desc(rr, h, errno.EINVAL, 0, wiov=wiov)
    assert wiov.total == 0


# ==========================================================================
# DESC errors: direction (rows 12, 13)
# ==========================================================================

def test_r12_readable_after_writable(rr):
    h = rr.host()
    rr.desc(0, rr.A, 4, WRITE | NEXT, 1)
    rr.desc(1, rr.A + 4, 4, 0)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r12_readable_after_zero_length_writable(rr):
    h = rr.host()
    rr.desc(0, rr.A, 0, WRITE | NEXT, 1)
    rr.desc(1, rr.A + 4, 4, 0)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r12_readable_after_writable_inside_indirect(rr):
    h = rr.host()
    t = rr.A + 256
    rr.table(t, [(rr.A, 4, WRITE | NEXT, 1), (rr.A + 4, 4, 0, 0)])
    rr.desc(0, t, 32, INDIRECT)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r12_readable_after_writable_across_indirect_next(rr):
    """Writable in the indirect table, then a readable main-table descriptor."""
    h = rr.host()
    t = rr.A + 256
    rr.table(t, [(rr.A, 4, WRITE, 0)])
    rr.desc(0, t, 16, INDIRECT | NEXT, 1)
    rr.desc(1, rr.A + 4, 4, 0)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r12_reused_wiov_does_not_misfire(rr):
    """[VRINGH-old] bug: a wiov left full by an earlier chain made a readable-only
    chain fail.  Both iovs are reset for every getdesc."""
    h = rr.host()
    riov, wiov = Iov(), Iov()
    rr.desc(0, rr.A, 4, WRITE)
    rr.desc(1, rr.A + 4, 4, 0)
    rr.avail(0, 1)
    assert h.getdesc(riov, wiov) == 0 and wiov.nsegs == 1
    assert h.getdesc(riov, wiov) == 1 and wiov.nsegs == 0 and riov.nsegs == 1


def test_r13_writable_without_wiov(rr):
    h = rr.host()
    rr.desc(0, rr.A, 4, WRITE)
    rr.avail(0)
    expect_desc(rr, h, errno.EPROTO, 0, wiov=None)


def test_r13_readable_without_riov(rr):
    h = rr.host()
    rr.desc(0, rr.A, 4, 0)
    rr.avail(0)
    expect_desc(rr, h, errno.EPROTO, 0, riov=None, recover=False)


def test_r13_writable_without_wiov_after_readables(rr):
    h = rr.host()
    rr.desc(0, rr.A, 4, NEXT, 1)
    rr.desc(1, rr.A + 4, 4, WRITE)
    rr.avail(0)
    expect_desc(rr, h, errno.EPROTO, 0, wiov=None)


def test_r13_writable_without_wiov_inside_indirect(rr):
    h = rr.host()
    t = rr.A + 256
    rr.table(t, [(rr.A, 4, NEXT, 1), (rr.A + 4, 4, WRITE, 0)])
    rr.desc(0, t, 32, INDIRECT)
    rr.avail(0)
    expect_desc(rr, h, errno.EPROTO, 0, wiov=None)


def test_r13_getdesc_needs_an_iov(rr):
    h = rr.host()
    rr.desc(0, rr.A, 4)
    rr.avail(0)
    with pytest.raises(ValueError):
        h.getdesc(None, None)
    assert h.last_avail_idx == 0 and h.in_flight == 0 and not h.broken


# ==========================================================================
# DESC errors: sizes (rows 14, 25)
# ==========================================================================

def test_r14_total_above_max_msg(rr):
    h = rr.host(max_msg=100)
    rr.desc(0, rr.A, 60, NEXT, 1)
    rr.desc(1, rr.A + 60, 60, WRITE)
    rr.avail(0)
    expect_desc(rr, h, errno.EMSGSIZE, 0)


def test_r14_total_exactly_max_msg_is_fine(rr):
    h = rr.host(max_msg=100)
    rr.desc(0, rr.A, 40, NEXT, 1)
    rr.desc(1, rr.A + 40, 60, WRITE)
    rr.avail(0)
    _, riov, wiov = ok_chain(h)
    assert riov.total + wiov.total == 100


def test_r14_overlapping_descriptors_count_in_full(rr):
    """Overlapping buffers (row 27, legal) still count in full towards max_msg:
    many aliases of the same arena bytes cannot build an oversized message."""
    h = rr.host(max_msg=3 * 1024)
    for i in range(4):
        rr.desc(i, rr.A, 1024, NEXT if i < 3 else 0, i + 1)
    rr.avail(0)
    expect_desc(rr, h, errno.EMSGSIZE, 0)


def test_r14_max_msg_inside_indirect(rr):
    h = rr.host(max_msg=100)
    t = rr.A + 256
    rr.table(t, [(rr.A, 64, NEXT, 1), (rr.A + 64, 64, 0, 0)])
    rr.desc(0, t, 32, INDIRECT)
    rr.avail(0)
    expect_desc(rr, h, errno.EMSGSIZE, 0)


def test_r25_more_segments_than_max_iov(rr):
    h = rr.host(max_iov=4)
    for i in range(5):
        rr.desc(i, rr.A + i, 1, NEXT if i < 4 else 0, i + 1)
    rr.avail(0)
    expect_desc(rr, h, errno.E2BIG, 0)


def test_r25_exactly_max_iov_is_fine(rr):
    h = rr.host(max_iov=4)
    for i in range(4):
        rr.desc(i, rr.A + i, 1, NEXT if i < 3 else 0, i + 1)
    rr.avail(0)
    _, riov, _ = ok_chain(h)
    assert riov.nsegs == 4


def test_r25_max_iov_per_direction(rr):
    """The cap is per direction: 4 readable + 4 writable with max_iov=4 is legal."""
    h = rr.host(max_iov=4)
    for i in range(8):
        rr.desc(i, rr.A + i, 1, (WRITE if i >= 4 else 0) | (NEXT if i < 7 else 0), i + 1)
    rr.avail(0)
    _, riov, wiov = ok_chain(h)
    assert riov.nsegs == 4 and wiov.nsegs == 4


def test_r25_more_segments_than_max_iov_in_indirect_table(rr):
    h = rr.host(max_iov=4)
    t = rr.A + 256
    rr.table(t, [(rr.A + k, 1, WRITE | (NEXT if k < 7 else 0), k + 1) for k in range(8)])
    rr.desc(0, t, 8 * 16, INDIRECT)
    rr.avail(0)
    expect_desc(rr, h, errno.E2BIG, 0)


def test_r25_zero_length_segments_count_towards_max_iov(rr):
    h = rr.host(max_iov=4)
    for i in range(6):
        rr.desc(i, rr.A, 0, NEXT if i < 5 else 0, i + 1)
    rr.avail(0)
    expect_desc(rr, h, errno.E2BIG, 0)


def test_r25_max_iov_holds_for_an_iov_reused_from_another_host(raw):
    rr = raw()
    riov = Iov()
    big = rr.host(max_iov=1024)
    rr.desc(0, rr.A, 1)
    rr.avail(0)
    assert big.getdesc(riov) == 0      # riov's array now has room for 8
    big.complete(0, 0)
    big.close()
    small = rr.host(max_iov=4)         # picks up used idx 1 as its base
    for i in range(5):
        rr.desc(i, rr.A + i, 1, NEXT if i < 4 else 0, i + 1)
    rr.avail(0)
    with pytest.raises(InvalidDescriptor) as ei:
        small.getdesc(riov)
    assert ei.value.errno == errno.E2BIG


# ==========================================================================
# DESC errors: indirect tables (rows 15-22, 24)
# ==========================================================================

def test_r15_indirect_without_feature(raw):
    rr = raw(features=L.F_EVENT_IDX)
    h = rr.host()
    assert not h.indirect
    t = rr.A + 256
    rr.table(t, [(rr.A, 4, 0, 0)])
    rr.desc(0, t, 16, INDIRECT)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


@pytest.mark.parametrize("ln", [24, 8, 15, 17, 100], ids=lambda v: f"len{v}")
def test_r16_indirect_len_not_multiple_of_16(rr, ln):
    h = rr.host()
    t = rr.A + 256
    rr.table(t, [(rr.A, 4, 0, 0)] * 8)
    rr.desc(0, t, ln, INDIRECT)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r17_indirect_len_zero(rr):
    """vringh reads descs[0] and says ELOOP; we refuse before any read: EINVAL."""
    h = rr.host()
    t = rr.A + 256
    rr.table(t, [(rr.A, 4, 0, 0)])
    rr.desc(0, t, 0, INDIRECT)
    rr.avail(0)
    riov = Iov()
    expect_desc(rr, h, errno.EINVAL, 0, riov=riov)
    assert riov.nsegs == 0


@pytest.mark.parametrize("entries", [9, 64, 0x0FFFFFFF], ids=lambda v: f"{v}entries")
def test_r18_indirect_more_than_num_entries(rr, entries):
    h = rr.host()
    t = rr.A
    rr.table(t, [(rr.A, 1, NEXT, k + 1) for k in range(8)] + [(rr.A, 1, 0, 0)])
    rr.desc(0, t, entries * 16, INDIRECT)
    rr.avail(0)
    expect_desc(rr, h, errno.E2BIG, 0)


def test_r18_indirect_exactly_num_entries_is_fine(rr):
    h = rr.host()
    t = rr.A + 256
    rr.table(t, [(rr.A + k, 1, NEXT if k < 7 else 0, k + 1) for k in range(8)])
    rr.desc(0, t, 8 * 16, INDIRECT)
    rr.avail(0)
    _, riov, _ = ok_chain(h)
    assert riov.nsegs == 8


@pytest.mark.parametrize("case", ["header", "desc-table", "used-ring", "below-arena", "above-arena",
                                  "top-of-u64", "wrapping"])
def test_r19_indirect_table_outside_arena(rr, case):
    h = rr.host()
    # A plausible table at the target, so only the range check can refuse it.
    where = {"header": 0x100, "desc-table": rr.r.desc_off + 64, "used-ring": rr.r.used_off,
             "below-arena": rr.A - 4096, "above-arena": rr.END,
             "top-of-u64": U64 - 32, "wrapping": U64 - 16}[case]
    if where + 32 <= rr.lay.seg_size:
        rr.table(where, [(rr.A, 4, NEXT, 1), (rr.A + 4, 4, 0, 0)])
    rr.desc(0, where, 32, INDIRECT)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r19_indirect_table_straddles_arena_end(rr):
    h = rr.host()
    t = rr.END - 16
    rr.table(t, [(rr.A, 4, NEXT, 1)])
    rr.desc(0, t, 32, INDIRECT)
    rr.avail(0)
    riov = Iov()
    expect_desc(rr, h, errno.EINVAL, 0, riov=riov)
    assert riov.nsegs == 0   # refused before reading any entry


def test_r19_indirect_table_straddles_arena_start(rr):
    h = rr.host()
    rr.desc(0, rr.A - 16, 32, INDIRECT)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r19_indirect_table_ending_at_arena_end_is_fine(rr):
    h = rr.host()
    t = rr.END - 32
    rr.table(t, [(rr.A, 4, NEXT, 1), (rr.A + 4, 4, 0, 0)])
    rr.desc(0, t, 32, INDIRECT)
    rr.avail(0)
    _, riov, _ = ok_chain(h)
    assert riov.segments == [(rr.A, 4), (rr.A + 4, 4)]


@pytest.mark.parametrize("mis", [1, 2, 4, 8, 15])
def test_r19_indirect_table_misaligned(rr, mis):
    h = rr.host()
    t = rr.A + 256 + mis
    rr.table(t, [(rr.A, 4, 0, 0)])
    rr.desc(0, t, 16, INDIRECT)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r20_nested_indirect(rr):
    h = rr.host()
    t1, t2 = rr.A + 256, rr.A + 512
    rr.table(t2, [(rr.A, 4, 0, 0)])
    rr.table(t1, [(rr.A + 8, 4, NEXT, 1), (t2, 16, INDIRECT, 0)])
    rr.desc(0, t1, 32, INDIRECT)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r20_nested_indirect_pointing_at_itself(rr):
    h = rr.host()
    t = rr.A + 256
    rr.table(t, [(t, 16, INDIRECT, 0)])
    rr.desc(0, t, 16, INDIRECT)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


@pytest.mark.parametrize("shape", ["self", "two-cycle", "tail-cycle"])
@pytest.mark.timeout(10)
def test_r21_loop_inside_indirect_table(rr, shape):
    h = rr.host()
    t = rr.A + 256
    if shape == "self":
        entries = [(rr.A, 1, NEXT, 0)]
    elif shape == "two-cycle":
        entries = [(rr.A, 1, NEXT, 1), (rr.A + 1, 1, NEXT, 0)]
    else:
        entries = [(rr.A, 1, NEXT, 1), (rr.A + 1, 1, NEXT, 2), (rr.A + 2, 1, NEXT, 3),
                   (rr.A + 3, 1, NEXT, 1)]
    rr.table(t, entries)
    rr.desc(0, t, 16 * len(entries), INDIRECT)
    rr.avail(0)
    riov = Iov()
    expect_desc(rr, h, errno.ELOOP, 0, riov=riov)
    assert riov.nsegs <= len(entries)


@pytest.mark.parametrize("nxt", [2, 3, 8, 0xFFFF])
def test_r22_next_beyond_indirect_table(rr, nxt):
    """The bound inside a table is its own size (2 here), not num."""
    h = rr.host()
    t = rr.A + 256
    rr.table(t, [(rr.A, 1, NEXT, 1), (rr.A + 1, 1, NEXT, nxt), (rr.A + 2, 1, 0, 0)])
    rr.desc(0, t, 32, INDIRECT)   # table of 2: the third entry is not part of it
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r23_indirect_next_then_direct_descriptors(rr):
    """vringh_test's "weird but legal" chain: INDIRECT|NEXT in the main table,
    the walk continues after the table; data comes out in linear order."""
    h = rr.host()
    t = rr.A + 256
    rr.data(rr.A, b"abcdefgh")
    rr.table(t, [(rr.A, 2, NEXT, 1), (rr.A + 2, 2, 0, 0)])
    rr.desc(0, t, 32, INDIRECT | NEXT, 3)
    rr.desc(3, rr.A + 4, 2, NEXT, 5)
    rr.desc(5, rr.A + 6, 2, NEXT, 1)
    rr.desc(1, rr.A + 64, 16, WRITE)
    rr.avail(0)
    head, riov, wiov = ok_chain(h)
    assert head == 0
    assert riov.segments == [(rr.A, 2), (rr.A + 2, 2), (rr.A + 4, 2), (rr.A + 6, 2)]
    assert riov.pull() == b"abcdefgh"
    assert wiov.segments == [(rr.A + 64, 16)]
    assert wiov.push(b"0123456789abcdef") == 16
    h.complete(head, 16)
    assert rr.used_elem(0) == (0, 16)
    assert bytes(rr.buf[rr.A + 64:rr.A + 80]) == b"0123456789abcdef"


def test_r23_two_indirect_tables_via_next(rr):
    h = rr.host()
    t1, t2 = rr.A + 256, rr.A + 512
    rr.data(rr.A, b"wxyz")
    rr.table(t1, [(rr.A, 2, 0, 0)])
    rr.table(t2, [(rr.A + 2, 2, 0, 0)])
    rr.desc(2, t1, 16, INDIRECT | NEXT, 6)
    rr.desc(6, t2, 16, INDIRECT)
    rr.avail(2)
    _, riov, _ = ok_chain(h)
    assert riov.pull() == b"wxyz"


def test_r23_indirect_next_zero_is_not_silently_truncated(rr):
    """vringh treats up_next == 0 as "no next" and drops desc[0] (oracle
    `indnext0`).  Ours must either continue at desc 0 or fail the chain."""
    h = rr.host()
    t = rr.A + 256
    rr.data(rr.A, b"head")
    rr.table(t, [(rr.A, 4, 0, 0)])
    rr.desc(2, t, 16, INDIRECT | NEXT, 0)
    rr.desc(0, rr.A + 64, 8, WRITE)
    rr.avail(2)
    riov, wiov = Iov(), Iov()
    try:
        head = h.getdesc(riov, wiov)
    except InvalidDescriptor as e:
        assert e.head == 2
        h.complete(2, 0)
        return
    assert head == 2
    assert riov.pull() == b"head"
    assert wiov.segments == [(rr.A + 64, 8)], "desc[0] after INDIRECT|NEXT next=0 was dropped"
    h.complete(head, 8)


def test_r23_indirect_next_out_of_range(rr):
    h = rr.host()
    t = rr.A + 256
    rr.table(t, [(rr.A, 4, 0, 0)])
    rr.desc(0, t, 16, INDIRECT | NEXT, 8)
    rr.avail(0)
    expect_desc(rr, h, errno.EINVAL, 0)


def test_r24_write_flag_on_indirect_descriptor_ignored(rr):
    h = rr.host()
    t = rr.A + 256
    rr.data(rr.A, b"read me")
    rr.table(t, [(rr.A, 7, NEXT, 1), (rr.A + 32, 5, WRITE, 0)])
    rr.desc(0, t, 32, INDIRECT | WRITE)
    rr.avail(0)
    head, riov, wiov = ok_chain(h)
    assert riov.pull() == b"read me"
    assert wiov.segments == [(rr.A + 32, 5)]
    h.complete(head, 5)


def test_r24_write_flag_on_indirect_descriptor_does_not_make_readables_writable(rr):
    """...and does not count as "a writable seen" either: a readable-only table
    behind INDIRECT|WRITE|NEXT followed by a readable main descriptor is fine."""
    h = rr.host()
    t = rr.A + 256
    rr.table(t, [(rr.A, 4, 0, 0)])
    rr.desc(0, t, 16, INDIRECT | WRITE | NEXT, 1)
    rr.desc(1, rr.A + 4, 4, 0)
    rr.avail(0)
    _, riov, wiov = ok_chain(h)
    assert riov.nsegs == 2 and wiov.nsegs == 0


# ==========================================================================
# Rows 27-31: legal oddities, notification garbage, kicks, silent producer
# ==========================================================================

def test_r27_overlapping_readable_and_writable_is_legal(rr):
    h = rr.host()
    rr.data(rr.A, b"0123456789abcdef")
    rr.desc(0, rr.A, 16, NEXT, 1)
    rr.desc(1, rr.A, 16, WRITE)
    rr.avail(0)
    head, riov, wiov = ok_chain(h)
    assert riov.pull() == b"0123456789abcdef"
    assert wiov.push(b"FEDCBA9876543210") == 16
    h.complete(head, 16)


def test_r28_descriptors_copied_once(rr):
    """After getdesc, rewriting the descriptors in shared memory changes nothing
    in the chain the host holds (the walk parsed private copies)."""
    h = rr.host()
    rr.data(rr.A, b"good")
    t = rr.A + 256
    rr.table(t, [(rr.A + 2, 2, 0, 0)])
    rr.desc(0, rr.A, 2, NEXT, 1)
    rr.desc(1, t, 16, INDIRECT)
    rr.avail(0)
    head, riov, _ = ok_chain(h)
    for i in range(8):
        rr.desc(i, 0, 0xFFFFFFFF, NEXT | INDIRECT, i)
    rr.table(t, [(0, 0xFFFFFFFF, NEXT, 0)])
    assert riov.segments == [(rr.A, 2), (rr.A + 2, 2)]
    assert riov.pull() == b"good"
    h.complete(head, 0)


@pytest.mark.parametrize("features", [FEAT_ALL, L.F_INDIRECT_DESC], ids=["event_idx", "flags"])
def test_r29_garbage_avail_flags_and_used_event(raw, features):
    rr = raw(features=features)
    h = rr.host()
    seen = []
    for k, (flags, used_event) in enumerate([(0xFFFF, 0), (0, 0xFFFF), (0xFFFE, 0x8000),
                                             (1, 3), (0xABCD, 0x1234), (0x7FFF, 7)]):
        struct.pack_into("<H", rr.buf, rr.r.avail_off, flags)
        struct.pack_into("<H", rr.buf, rr.r.used_event_off, used_event)
        rr.data(rr.A + k, bytes([48 + k]))
        rr.desc(k % 4, rr.A + k, 1)
        rr.avail(k % 4)
        head, riov, _ = ok_chain(h)
        assert riov.pull() == bytes([48 + k])
        h.complete(head, 0)
        n = h.need_notify()
        assert isinstance(n, bool)
        seen.append(n)
        assert not h.broken
    assert h.last_avail_idx == 6 and rr.used_idx() == 6
    if features == L.F_INDIRECT_DESC:
        # Without EVENT_IDX only bit 0 of avail->flags (NO_INTERRUPT) matters.
        assert seen == [False, True, True, False, False, False]


@pytest.mark.timeout(20)
def test_r30_kick_storm_one_wait():
    with SharedRing.create(num=8, slot_size=64, backend="memfd") as ring:
        h = ring.host()
        d = ring.driver(slot_size=64)
        kfd = ring.kick_fds[0]
        for _ in range(10_000):
            os.eventfd_write(kfd, 1)
        d.add_slot(b"payload")
        d.kick()
        assert h.wait(timeout=10) is True
        riov = Iov()
        head = h.getdesc(riov)
        assert riov.pull() == b"payload"
        h.complete(head, 0)
        # The storm is not work: with nothing published, one wait drains the
        # whole counter with a single read and goes back to sleep until the
        # timeout, instead of spinning through 10000 wake-ups.
        assert h.wait(timeout=0.2, spin=0) is False
        with pytest.raises(BlockingIOError):
            os.eventfd_read(kfd)
        assert h.getdesc(Iov()) is None


@pytest.mark.timeout(20)
def test_r31_silent_producer_wait_times_out_and_check_can_raise():
    with SharedRing.create(num=8, slot_size=64, backend="memfd") as ring:
        h = ring.host()
        assert h.wait(timeout=0.05, spin=0) is False
        calls = []

        def check():
            calls.append(1)
            if len(calls) >= 2:
                raise PeerDead("producer went away")

        with pytest.raises(PeerDead):
            h.wait(timeout=10, spin=0, check=check, check_interval=0.02)
        assert len(calls) == 2


# ==========================================================================
# Host-API misuse (vringh trusts its caller; we do not)
# ==========================================================================

def _fetch(rr, h, heads, writable=0):
    for hd in heads:
        rr.desc(hd, rr.A + 16 * hd, 16, WRITE if writable else 0)
    rr.avail(*heads)
    got = [ok_chain(h)[0] for _ in heads]
    assert got == list(heads)
    return got


@pytest.mark.parametrize("head", [0, 3, 8, 0xFFFF, 0xFFFFFFFF])
def test_misuse_complete_never_fetched(rr, head):
    h = rr.host()
    with pytest.raises(ValueError):
        h.complete(head, 0)
    assert rr.used_idx() == 0 and h.in_flight == 0


def test_misuse_complete_other_head_than_fetched(rr):
    h = rr.host()
    _fetch(rr, h, [2])
    with pytest.raises(ValueError):
        h.complete(3, 0)
    h.complete(2, 0)
    assert rr.used_idx() == 1


def test_misuse_complete_twice(rr):
    h = rr.host()
    _fetch(rr, h, [1])
    h.complete(1, 0)
    with pytest.raises(ValueError):
        h.complete(1, 0)
    assert rr.used_idx() == 1 and h.in_flight == 0


def test_misuse_complete_length_above_writable_capacity(rr):
    h = rr.host()
    rr.desc(0, rr.A, 8, NEXT, 1)
    rr.desc(1, rr.A + 8, 10, WRITE | NEXT, 2)
    rr.desc(2, rr.A + 18, 6, WRITE)
    rr.avail(0)
    head, _, wiov = ok_chain(h)
    assert wiov.total == 16
    with pytest.raises(ValueError):
        h.complete(head, 17)
    with pytest.raises(ValueError):
        h.complete(head, 0xFFFFFFFF)
    assert rr.used_idx() == 0 and h.in_flight == 1
    h.complete(head, 16)
    assert rr.used_elem(0) == (0, 16)


def test_misuse_complete_length_on_readable_only_chain(rr):
    h = rr.host()
    _fetch(rr, h, [0])
    with pytest.raises(ValueError):
        h.complete(0, 1)
    h.complete(0, 0)


def test_misuse_complete_multi_duplicate_head(rr):
    h = rr.host()
    _fetch(rr, h, [0, 1, 2], writable=1)
    with pytest.raises(ValueError):
        h.complete_multi([(0, 0), (1, 0), (0, 0)])
    # All or nothing: nothing was written, all three still in flight.
    assert rr.used_idx() == 0 and h.in_flight == 3
    h.complete_multi([(2, 16), (0, 1), (1, 0)])
    assert rr.used_idx() == 3 and h.in_flight == 0
    assert [rr.used_elem(k) for k in range(3)] == [(2, 16), (0, 1), (1, 0)]


def test_misuse_complete_multi_error_later_leaves_earlier_in_flight(rr):
    h = rr.host()
    _fetch(rr, h, [0, 1], writable=1)
    with pytest.raises(ValueError):
        h.complete_multi([(0, 0), (1, 17)])   # 17 > 16 writable bytes
    with pytest.raises(ValueError):
        h.complete_multi([(0, 0), (5, 0)])    # 5 never fetched
    assert rr.used_idx() == 0 and h.in_flight == 2
    h.complete(0, 0)
    h.complete(1, 0)


def test_misuse_complete_multi_more_than_num(rr):
    h = rr.host()
    _fetch(rr, h, [0])
    with pytest.raises(ValueError):
        h.complete_multi([(0, 0)] * 9)
    assert rr.used_idx() == 0
    h.complete(0, 0)


def test_misuse_complete_multi_more_than_in_flight(rr):
    h = rr.host()
    _fetch(rr, h, [0, 1])
    with pytest.raises(ValueError):
        h.complete_multi([(0, 0), (1, 0), (2, 0)])
    assert rr.used_idx() == 0 and h.in_flight == 2
    h.complete_multi([(0, 0), (1, 0)])


def test_misuse_abandon_more_than_fetched(rr):
    h = rr.host()
    with pytest.raises(ValueError):
        h.abandon(1)
    _fetch(rr, h, [0, 1])
    with pytest.raises(ValueError):
        h.abandon(3)
    assert h.last_avail_idx == 2 and h.in_flight == 2
    h.abandon(2)
    assert h.last_avail_idx == 0 and h.in_flight == 0
    assert [ok_chain(h)[0] for _ in range(2)] == [0, 1]


def test_misuse_abandon_after_completing(rr):
    h = rr.host()
    _fetch(rr, h, [0])
    h.complete(0, 0)
    with pytest.raises(ValueError):
        h.abandon(1)
    assert h.last_avail_idx == 1 and h.in_flight == 0
    assert h.getdesc(Iov()) is None


def test_misuse_abandon_past_a_completed_one(rr):
    """Two fetched, the most recent completed: abandon(1) and abandon(2) both refuse."""
    h = rr.host()
    _fetch(rr, h, [0, 1])
    h.complete(1, 0)
    for n in (1, 2):
        with pytest.raises(ValueError):
            h.abandon(n)
    assert h.last_avail_idx == 2 and h.in_flight == 1
    h.complete(0, 0)


def test_misuse_same_iov_for_both_directions(rr):
    h = rr.host()
    d = rr.driver()
    head = d.add(readable=[(rr.A, 4)], writable=[(rr.A + 8, 4)])
    iov = Iov()
    with pytest.raises(ValueError):
        h.getdesc(iov, iov)
    assert h.last_avail_idx == 0 and h.in_flight == 0
    _, _, wiov = ok_chain(h)
    h.complete(head, wiov.total)
    assert d.get_buf() == (None, 4) and not d.broken


def test_abandon_after_descriptor_error_retries_it(rr):
    h = rr.host()
    rr.desc(0, 0, 4)
    rr.avail(0)
    for _ in range(2):
        with pytest.raises(InvalidDescriptor) as ei:
            h.getdesc(Iov(), Iov())
        assert ei.value.head == 0 and h.last_avail_idx == 1
        h.abandon(1)
        assert h.last_avail_idx == 0 and h.in_flight == 0
    rr.desc(0, rr.A, 4)   # the producer fixed it
    assert ok_chain(h)[0] == 0


def test_pull_many_stops_at_a_bad_chain(rr):
    """The batch path reports the same DESC error, after completing the good ones."""
    import array
    h = rr.host()
    rr.data(rr.A, b"abcd")
    rr.desc(0, rr.A, 2)
    rr.desc(1, rr.A + 2, 2)
    rr.desc(2, rr.A, 4, NEXT, 2)          # self loop
    rr.desc(3, rr.A, 4)
    rr.avail(0, 1, 2, 3)
    dst = bytearray(64)
    lens = array.array("I", [0] * 8)
    with pytest.raises(InvalidDescriptor) as ei:
        h.pull_many(dst, lens, 8)
    assert ei.value.errno == errno.ELOOP and ei.value.head == 2
    assert rr.used_idx() == 2 and h.in_flight == 1 and h.last_avail_idx == 3
    assert bytes(dst[:4]) == b"abcd"
    h.complete(2, 0)
    assert h.pull_many(dst, lens, 8) == 1


_CLOSED_PROG = textwrap.dedent("""
    import mmap, vringipc
    from vringipc import layout as L
    from vringipc.ring import SharedRing
    if {via_ring}:
        ring = SharedRing.create(num=8, slot_size=64, backend="memfd", event_idx={event_idx})
        h = ring.host(); d = ring.driver(slot_size=64)
        ring.close()
    else:
        feats = L.F_INDIRECT_DESC | (L.F_EVENT_IDX if {event_idx} else 0)
        lay = L.SegmentLayout.build([8], [4096], features=feats); r = lay.rings[0]
        buf = mmap.mmap(-1, lay.seg_size)
        h = vringipc.VringHost(buf, *r.ring_args(), features=lay.features)
        d = vringipc.VringDriver(buf, *r.ring_args(), features=lay.features)
        h.close(); d.close(); buf.close()      # the mapping is gone
    try:
        {call}
    except ValueError as e:
        print("ValueError", e)
    else:
        print("no error")
""")

_CLOSED_CALLS = [
    "h.pending()", "h.need_notify()", "h.notify()", "h.notify_enable()", "h.set_base(0)",
    "d.kick_prepare()", "d.kick()", "d.enable_cb()", "d.enable_cb_prepare()",
    "d.enable_cb_delayed()", "d.disable_cb()", "d.poll(0)", "d.pending()", "d.set_base(0)",
    "d.detach_unused()",
]


def _run_closed(call, via_ring=False, event_idx=True):
    prog = _CLOSED_PROG.format(call=call, via_ring=via_ring, event_idx=event_idx)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          timeout=60, env=env)


_CLOSED_REASON = (
    "BUG: VringHost/VringDriver.close() only clears h.base/d.base and releases the buffer; "
    "methods without _check_open() (host: pending, need_notify, notify, notify_enable, "
    "set_base; driver: kick_prepare, kick, *_cb*, poll, pending, set_base, detach_unused) "
    "still dereference the cached avail/used pointers: SIGSEGV once the mapping is unmapped "
    "(e.g. after SharedRing.close()). Fix: _check_open() in each, NULL the ring pointers in close().")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", [pytest.param(c)
                                  for c in _CLOSED_CALLS])
def test_misuse_closed_side_raises_instead_of_crashing(call):
    res = _run_closed(call)
    assert res.returncode == 0, f"{call} on a closed side: exit {res.returncode} {res.stderr[-300:]}"
    assert res.stdout.startswith("ValueError"), res.stdout


@pytest.mark.timeout(60)
def test_misuse_host_pending_after_shared_ring_close():
    res = _run_closed("h.pending()", via_ring=True)
    assert res.returncode == 0, f"exit {res.returncode} {res.stderr[-300:]}"
    assert res.stdout.startswith("ValueError"), res.stdout


@pytest.mark.timeout(60)
def test_misuse_host_notify_disable_after_close_without_event_idx():
    res = _run_closed("h.notify_disable()", event_idx=False)
    assert res.returncode == 0, f"exit {res.returncode} {res.stderr[-300:]}"
    assert res.stdout.startswith("ValueError"), res.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["h.getdesc(vringipc.Iov())", "h.complete(0, 0)", "h.wait(0)",
                                  "h.complete_multi([])", "d.add_slot(b'x')", "d.get_buf()",
                                  "d.wait_used(0)"])
def test_misuse_closed_side_checked_calls(call):
    """The calls that do check: a clean ValueError, no crash."""
    res = _run_closed(call)
    assert res.returncode == 0, f"{call}: exit {res.returncode} {res.stderr[-300:]}"
    assert res.stdout.startswith("ValueError"), res.stdout


# ==========================================================================
# Driver side against a hostile device (writes the used ring)
# ==========================================================================

@pytest.fixture
def drv(rr):
    d = rr.driver(slot_size=64)
    assert d.add_slot_writable(64, token="w0") == 0
    assert d.add(readable=[(rr.A + 1024, 8), (rr.A + 1040, 8)], token="r1") == 1   # direct chain 1->2
    assert d.add_buf(rr.A + 2048, 16, writable=True, token="w3") == 3
    return d


def _expect_driver_broken(rr, d):
    with pytest.raises(InvalidRing) as ei:
        d.get_buf()
    assert ei.value.errno == errno.EINVAL and ei.value.head is None
    assert d.broken
    for _ in range(2):
        with pytest.raises(InvalidRing):
            d.get_buf()
    with pytest.raises(InvalidRing):
        d.add_slot(b"x")
    return ei.value


def test_driver_valid_used_entries(rr, drv):
    rr.put_used(0, 3, 16)
    rr.put_used(1, 0, 5)
    rr.put_used(2, 1, 0)
    rr.set_used_idx(3)
    assert drv.get_buf() == ("w3", 16)
    assert drv.get_buf() == ("w0", 5)
    assert drv.get_buf() == ("r1", 0)
    assert drv.get_buf() is None and not drv.broken
    assert drv.num_free == 8


@pytest.mark.parametrize("bad_id", [8, 9, 0xFFFF, 0xFFFFFFFF])
def test_driver_used_id_out_of_range(rr, drv, bad_id):
    rr.put_used(0, bad_id, 0)
    rr.set_used_idx(1)
    e = _expect_driver_broken(rr, drv)
    assert str(bad_id) in str(e)


@pytest.mark.parametrize("bad_id", [2, 4, 7], ids=["mid-chain", "free", "never-used"])
def test_driver_used_id_not_in_flight_head(rr, drv, bad_id):
    rr.put_used(0, bad_id, 0)
    rr.set_used_idx(1)
    _expect_driver_broken(rr, drv)


def test_driver_used_id_returned_twice(rr, drv):
    rr.put_used(0, 3, 0)
    rr.put_used(1, 3, 0)
    rr.set_used_idx(2)
    assert drv.get_buf() == ("w3", 0)
    _expect_driver_broken(rr, drv)


@pytest.mark.parametrize("idx", [4, 9, 0x8000, 0xFFFF])
def test_driver_used_idx_jump(rr, drv, idx):
    """3 chains in flight: the device cannot hand back more (or go backwards)."""
    rr.put_used(0, 0, 0)
    rr.set_used_idx(idx)
    _expect_driver_broken(rr, drv)
    assert drv.num_free == 8 - 4   # nothing was reclaimed


@pytest.mark.parametrize("head,ln", [(0, 65), (3, 17), (1, 1), (0, 0xFFFFFFFF)],
                         ids=["slot+1", "buf+1", "readable-only", "huge"])
def test_driver_used_len_above_capacity(rr, drv, head, ln):
    rr.put_used(0, head, ln)
    rr.set_used_idx(1)
    _expect_driver_broken(rr, drv)


def test_driver_broken_until_set_base(rr, drv):
    rr.put_used(0, 8, 0)
    rr.set_used_idx(1)
    _expect_driver_broken(rr, drv)
    rr.put_used(0, 0, 0)       # the device fixes its entry: still broken
    with pytest.raises(InvalidRing):
        drv.get_buf()
    drv.set_base(0)
    rr.set_used_idx(0)
    assert not drv.broken and drv.num_free == 8
    assert drv.add_slot(b"again") == 0


def test_driver_reclaim_batch_reports_broken(rr, drv):
    rr.put_used(0, 3, 0)
    rr.put_used(1, 6, 0)
    rr.set_used_idx(2)
    with pytest.raises(InvalidRing):
        drv.reclaim()
    assert drv.broken


# ==========================================================================
# Randomised: arbitrary bytes from the producer never crash the host
# ==========================================================================

FUZZ_NUM = 8
FUZZ_ARENA = 1024


@pytest.fixture(scope="module")
def fuzz_ring():
    rr = Raw(num=FUZZ_NUM, arena=FUZZ_ARENA)
    yield rr
    rr.close()


def _drive(rr, h, iovs, rounds=FUZZ_NUM + 2):
    """Call getdesc until empty / ring error; check every outcome's invariants."""
    riov, wiov = iovs
    for _ in range(rounds):
        before = h.last_avail_idx
        try:
            head = h.getdesc(riov, wiov)
        except InvalidRing as e:
            assert e.head is None and h.broken and h.last_avail_idx == before
            assert e.errno == errno.EINVAL
            with pytest.raises(InvalidRing):
                h.getdesc(riov, wiov)
            return "ring"
        except InvalidDescriptor as e:
            assert 0 <= e.head < FUZZ_NUM
            assert e.errno in (errno.EINVAL, errno.ELOOP, errno.EPROTO, errno.EMSGSIZE, errno.E2BIG)
            assert h.last_avail_idx == (before + 1) & 0xFFFF
            h.complete(e.head, 0)
            continue
        if head is None:
            assert h.last_avail_idx == before
            return "empty"
        assert 0 <= head < FUZZ_NUM and h.last_avail_idx == (before + 1) & 0xFFFF
        total = 0
        for iov in (riov, wiov):
            if iov is None:
                continue
            assert iov.nsegs <= h.max_iov
            for off, ln in iov.segments:
                assert rr.A <= off and off + ln <= rr.END
                total += ln
        assert total <= h.max_msg
        if riov is not None:
            assert len(riov.pull()) == riov.total
        if wiov is not None:
            wcap = wiov.total
            assert wiov.push(b"\xee" * wcap) == wcap
        else:
            wcap = 0
        h.complete(head, wcap)
    return "rounds"


def _fresh(rr, blob_desc, blob_avail, blob_arena, n_avail):
    r = rr.r
    rr.buf[r.desc_off:r.desc_off + 16 * FUZZ_NUM] = blob_desc
    rr.buf[r.avail_off:r.avail_off + 4 + 2 * FUZZ_NUM + 2] = blob_avail
    rr.buf[rr.A:rr.END] = blob_arena
    rr.buf[r.used_off:r.used_off + 4 + 8 * FUZZ_NUM + 2] = bytes(4 + 8 * FUZZ_NUM + 2)
    rr.set_avail_idx(n_avail)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(desc=st.binary(min_size=16 * FUZZ_NUM, max_size=16 * FUZZ_NUM),
       avail=st.binary(min_size=4 + 2 * FUZZ_NUM + 2, max_size=4 + 2 * FUZZ_NUM + 2),
       arena=st.binary(min_size=FUZZ_ARENA, max_size=FUZZ_ARENA),
       n_avail=st.integers(0, FUZZ_NUM),
       dirs=st.sampled_from(["rw", "r", "w"]),
       max_iov=st.sampled_from([1, 4, 1024]),
       max_msg=st.sampled_from([0xFFFFFFFF, 64]))
def test_fuzz_raw_bytes(fuzz_ring, desc, avail, arena, n_avail, dirs, max_iov, max_msg):
    rr = fuzz_ring
    _fresh(rr, desc, avail, arena, n_avail)
    h = VringHost(rr.buf, *rr.r.ring_args(), features=rr.lay.features, max_iov=max_iov,
                  max_msg=max_msg)
    try:
        iovs = (Iov() if "r" in dirs else None, Iov() if "w" in dirs else None)
        _drive(rr, h, iovs)
    finally:
        h.close()


def _desc_strategy(A, END):
    addr = st.one_of(
        st.integers(0, U64 - 1),
        st.integers(A - 32, END + 32),
        st.sampled_from([0, A, END, END - 16, U64 - 16, U64 - 1]),
        st.integers(0, (FUZZ_ARENA // 16) - 1).map(lambda k: A + 16 * k),  # plausible tables
    )
    ln = st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(0, 64), st.sampled_from([0, 16, 32, 48, 24, 128, 144]))
    flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
    nxt = st.one_of(st.integers(0, FUZZ_NUM + 1), st.integers(0, 0xFFFF))
    return st.tuples(addr, ln, flags, nxt)


_A = L.SegmentLayout.build([FUZZ_NUM], [FUZZ_ARENA]).rings[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(descs=st.lists(_desc_strategy(_A.win_off, _A.win_off + _A.win_size),
                      min_size=FUZZ_NUM, max_size=FUZZ_NUM),
       tables=st.lists(_desc_strategy(_A.win_off, _A.win_off + _A.win_size), min_size=0, max_size=24),
       heads=st.lists(st.one_of(st.integers(0, FUZZ_NUM - 1), st.integers(0, 0xFFFF)),
                      min_size=0, max_size=FUZZ_NUM + 2),
       idx_delta=st.sampled_from([0, 0, 0, 1, -1, FUZZ_NUM, 0x8000]),
       indirect=st.booleans(),
       dirs=st.sampled_from(["rw", "r", "w"]))
def test_fuzz_structured_descriptors(fuzz_ring, descs, tables, heads, idx_delta, indirect, dirs):
    """Descriptors built from plausible pieces (arena addresses, table-sized
    lengths, real flag bits, small next values) to reach deep into the walk."""
    rr = fuzz_ring
    n = min(len(heads), FUZZ_NUM)
    _fresh(rr, bytes(16 * FUZZ_NUM), bytes(4 + 2 * FUZZ_NUM + 2), bytes(FUZZ_ARENA), 0)
    for i, d in enumerate(descs):
        rr.desc(i, *d)
    for i, d in enumerate(tables):   # back-to-back 16-byte entries from the arena start
        rr.desc(i, *d, table=rr.A)
    for k, hd in enumerate(heads[:FUZZ_NUM]):
        struct.pack_into("<H", rr.buf, rr.r.avail_off + 4 + 2 * k, hd)
    rr.set_avail_idx(n + idx_delta)
    features = L.F_EVENT_IDX | (L.F_INDIRECT_DESC if indirect else 0)
    h = VringHost(rr.buf, *rr.r.ring_args(), features=features, max_iov=16)
    try:
        iovs = (Iov() if "r" in dirs else None, Iov() if "w" in dirs else None)
        _drive(rr, h, iovs)
    finally:
        h.close()
