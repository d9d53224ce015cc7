"""Unit tests of the ring core: one process, both sides over one buffer.

The equivalents of tools/virtio/vringh_test.c's single-process sequence
(VRING_NOTES.md 3.2, 3.5): every ring size, data at the very end of the arena,
partial pulls/pushes across segment boundaries, iov growth, complete_multi
wrapping the used ring, the u16 index wrap, and the notification tables with
and without EVENT_IDX."""

import mmap

import pytest

import vringipc
from vringipc import Iov, InvalidDescriptor, VringDriver, VringHost
from vringipc.layout import SegmentLayout

EI = vringipc.FEATURE_EVENT_IDX
IND = vringipc.FEATURE_INDIRECT_DESC
SIZES = [1, 2, 8, 256, 32768]


class Pair:
    """A driver and a host over one anonymous mapping."""

    def __init__(self, num, arena=None, features=EI | IND, slot_size=0, ind_entries=0, **hostkw):
        arena = arena or max(4096, num * max(slot_size, 16) + num * max(ind_entries, 1) * 16)
        self.lay = SegmentLayout.build([num], [arena], features=features & (EI | IND))
        self.buf = mmap.mmap(-1, self.lay.seg_size)
        self.buf[:4096] = self.lay.pack_header()
        r = self.r = self.lay.rings[0]
        pool = None
        if ind_entries:
            pool = (r.win_off + r.win_size - num * ind_entries * 16, ind_entries)
        self.drv = VringDriver(self.buf, *r.ring_args(), features=features, slot_size=slot_size,
                               indirect_pool=pool)
        self.host = VringHost(self.buf, *r.ring_args(), features=features, **hostkw)

    @property
    def lo(self):
        return self.r.win_off

    @property
    def hi(self):
        return self.r.win_off + self.r.win_size

    def close(self):
        self.drv.close()
        self.host.close()
        self.buf.close()


@pytest.fixture
def pairs():
    made = []

    def make(*a, **kw):
        p = Pair(*a, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.mark.parametrize("num", SIZES)
def test_empty_then_one_chain_at_arena_end(pairs, num):
    p = pairs(num)
    riov, wiov = Iov(), Iov()
    assert p.host.getdesc(riov, wiov) is None
    # readable: the last byte of the arena; writable: the 2 bytes before it
    p.buf[p.hi - 1] = ord("a")
    if num == 1:
        # one descriptor cannot hold a 2-segment chain (and an indirect
        # table needs 2..num entries): the driver says "full"
        assert p.drv.add([(p.hi - 1, 1)], [(p.hi - 3, 2)]) is None
        head = p.drv.add([(p.hi - 1, 1)], token="tok")
        assert p.drv.kick_prepare() is True
        assert p.host.getdesc(riov, wiov) == head
        assert riov.pull(5) == b"a" and wiov.nsegs == 0
        p.host.complete(head, 0)
        assert p.drv.get_buf() == ("tok", 0)
        return
    head = p.drv.add([(p.hi - 1, 1)], [(p.hi - 3, 2)], token="tok")
    assert head is not None
    assert p.drv.kick_prepare() is True
    got = p.host.getdesc(riov, wiov)
    assert got == head
    assert riov.segments == [(p.hi - 1, 1)] and wiov.segments == [(p.hi - 3, 2)]
    assert riov.pull(5) == b"a"
    assert riov.pull(5) == b""
    assert wiov.push(b"bcdef") == 2
    assert wiov.push(b"x") == 0
    assert bytes(p.buf[p.hi - 3:p.hi - 1]) == b"bc"
    p.host.complete(head, 2)
    assert p.drv.get_buf() == ("tok", 2)
    assert p.drv.get_buf() is None
    assert p.host.getdesc(riov, wiov) is None


@pytest.mark.parametrize("num", SIZES)
def test_fill_ring_and_drain(pairs, num):
    p = pairs(num, slot_size=8)
    for i in range(num):
        assert p.drv.add_slot(i.to_bytes(8, "little"), token=i) is not None
    assert p.drv.add_slot(b"x") is None          # full: no free descriptor
    assert p.drv.num_free == 0
    riov = Iov()
    heads = []
    for i in range(num):
        h = p.host.getdesc(riov)
        assert int.from_bytes(riov.pull(), "little") == i
        heads.append(h)
    assert p.host.getdesc(riov) is None
    assert p.host.in_flight == num
    p.host.complete_multi([(h, 0) for h in heads])
    assert [p.drv.get_buf()[0] for _ in range(num)] == list(range(num))
    assert p.drv.num_free == num


@pytest.mark.parametrize("num", [8, 256])
@pytest.mark.parametrize("indirect", [False, True])
def test_big_chain_grows_iov_and_pulls_in_3_byte_chunks(pairs, num, indirect):
    # num segments of 7 bytes with a byte pattern: one direct chain of num
    # descriptors, or one indirect table of num entries.
    p = pairs(num, arena=num * 7 + num * num * 16 + 64, ind_entries=num if indirect else 0,
              features=EI | (IND if indirect else 0))
    pattern = bytes(i & 0xFF for i in range(num * 7))
    p.buf[p.lo:p.lo + len(pattern)] = pattern
    segs = [(p.lo + 7 * i, 7) for i in range(num)]
    head = p.drv.add(segs)
    riov = Iov()
    assert p.host.getdesc(riov) == head
    assert riov.nsegs == num and riov.total == num * 7
    out = bytearray()
    while True:
        chunk = riov.pull(3)
        if not chunk:
            break
        out += chunk
    assert bytes(out) == pattern
    assert riov.remaining == 0
    riov.reset()
    assert riov.advance(10) == 10 and riov.pull(4) == pattern[10:14]
    p.host.complete(head)
    assert p.drv.get_buf() == (None, 0)


def test_views_are_zero_copy_and_readonly_for_readable(pairs):
    p = pairs(8)
    p.buf[p.lo:p.lo + 4] = b"abcd"
    head = p.drv.add([(p.lo, 4)], [(p.lo + 64, 4)])
    riov, wiov = Iov(), Iov()
    p.host.getdesc(riov, wiov)
    (rv,), (wv,) = riov.views(), wiov.views()
    assert rv.readonly and not wv.readonly
    assert bytes(rv) == b"abcd"
    p.buf[p.lo] = ord("z")                    # the view sees shared memory, no copy
    assert bytes(rv) == b"zbcd"
    wv[:] = b"WXYZ"
    assert bytes(p.buf[p.lo + 64:p.lo + 68]) == b"WXYZ"
    rv.release()
    wv.release()
    p.host.complete(head, 4)


def test_pull_into_and_zero_length_segments(pairs):
    p = pairs(8)
    p.buf[p.lo:p.lo + 6] = b"012345"
    head = p.drv.add([(p.lo, 0), (p.lo, 3), (p.lo + 3, 0), (p.lo + 3, 3)])
    riov = Iov()
    assert p.host.getdesc(riov) == head
    assert riov.nsegs == 4 and riov.total == 6
    dst = bytearray(4)
    assert riov.pull_into(dst) == 4 and dst == b"0123"
    assert riov.pull() == b"45"
    p.host.complete(head)


@pytest.mark.parametrize("num", [8, 256])
def test_complete_multi_wraps_used_ring(pairs, num):
    p = pairs(num, slot_size=4)
    riov = Iov()
    # move the used index to num - 2 so the next batch crosses the end
    for _ in range(num - 2):
        p.drv.add_slot(b"x")
        h = p.host.getdesc(riov)
        p.host.complete(h)
        p.drv.get_buf()
    for i in range(num):
        p.drv.add_slot(i.to_bytes(4, "little"), token=i)
    heads = [p.host.getdesc(riov) for _ in range(num)]
    p.host.complete_multi([(h, 0) for h in heads])
    assert [p.drv.get_buf()[0] for _ in range(num)] == list(range(num))
    # exactly at the end: off + n == num
    for i in range(2):
        p.drv.add_slot(b"y", token=i)
    heads = [p.host.getdesc(riov) for _ in range(2)]
    p.host.complete_multi([(h, 0) for h in heads])
    assert [p.drv.get_buf()[0] for _ in range(2)] == [0, 1]


def test_complete_multi_rejects_more_than_num(pairs):
    p = pairs(2, slot_size=4)
    with pytest.raises(ValueError):
        p.host.complete_multi([(0, 0)] * 3)


@pytest.mark.parametrize("features", [0, EI, IND, EI | IND])
def test_u16_wrap_more_than_65536_messages(pairs, features):
    num = 8
    p = pairs(num, slot_size=8, features=features)
    base = 0xFFF0
    p.drv.set_base(base)
    p.host.set_base(base)
    riov = Iov()
    total = 65536 + 100
    sent = got = 0
    lens = bytearray(4 * num)
    while got < total:
        while sent < total and p.drv.add_slot(sent.to_bytes(8, "little"), token=sent) is not None:
            sent += 1
        p.drv.kick_prepare()
        while True:
            h = p.host.getdesc(riov)
            if h is None:
                break
            assert int.from_bytes(riov.pull(), "little") == got
            p.host.complete(h)
            got += 1
        p.host.need_notify()
        while p.drv.get_buf() is not None:
            pass
    assert p.host.last_avail_idx == (base + total) & 0xFFFF
    assert p.drv.avail_idx == (base + total) & 0xFFFF
    del lens


def test_need_notify_forced_after_more_than_0xffff_completions(pairs):
    p = pairs(8, slot_size=8, features=EI)
    riov = Iov()
    p.drv.disable_cb()                         # used_event far behind: window never crossed
    for _ in range(0x10000):
        p.drv.add_slot(b"a")
        h = p.host.getdesc(riov)
        p.host.complete(h)
        p.drv.get_buf()
    assert p.host.completed == 0x10000
    assert p.host.need_notify() is True        # "just in case we added so many that we wrap"
    assert p.host.completed == 0


# --- notification tables ---------------------------------------------------------

def test_event_idx_kick_suppression(pairs):
    p = pairs(8, slot_size=8, features=EI)
    riov = Iov()
    # the host asked (avail_event = 0 initially): first add kicks
    p.drv.add_slot(b"1")
    assert p.drv.kick_prepare() is True
    # host is busy (did not re-enable): no more kicks
    p.drv.add_slot(b"2")
    assert p.drv.kick_prepare() is False
    for _ in range(2):
        p.host.complete(p.host.getdesc(riov))
    # host goes to sleep: notify_enable says "still empty"
    assert p.host.notify_enable() is True
    p.drv.add_slot(b"3")
    assert p.drv.kick_prepare() is True
    # a buffer slipping in before notify_enable: enable reports it
    p.host.complete(p.host.getdesc(riov))
    p.drv.add_slot(b"4")
    assert p.host.notify_enable() is False
    p.host.notify_disable()                    # no-op with EVENT_IDX


def test_flags_kick_suppression_without_event_idx(pairs):
    p = pairs(8, slot_size=8, features=0)
    p.drv.add_slot(b"1")
    assert p.drv.kick_prepare() is True        # used->flags = 0 initially
    p.host.notify_disable()
    p.drv.add_slot(b"2")
    assert p.drv.kick_prepare() is False       # VRING_USED_F_NO_NOTIFY
    riov = Iov()
    p.host.complete(p.host.getdesc(riov))
    assert p.host.notify_enable() is False     # #2 still pending
    p.host.complete(p.host.getdesc(riov))
    assert p.host.notify_enable() is True
    p.drv.add_slot(b"3")
    assert p.drv.kick_prepare() is True


def test_event_idx_call_suppression(pairs):
    p = pairs(8, slot_size=8, features=EI)
    riov = Iov()
    # driver polling (callbacks disabled, the initial state): no calls
    p.drv.add_slot(b"1")
    p.host.complete(p.host.getdesc(riov))
    assert p.host.need_notify() is False
    assert p.drv.get_buf() is not None
    # driver about to sleep: enable_cb says "nothing pending"
    assert p.drv.enable_cb() is True
    p.drv.add_slot(b"2")
    p.host.complete(p.host.getdesc(riov))
    assert p.host.need_notify() is True
    # nothing new completed: need_notify is False
    assert p.host.need_notify() is False
    # enable_cb with something already used: reports it (no sleep)
    p.drv.add_slot(b"3")
    p.host.complete(p.host.getdesc(riov))
    assert p.drv.get_buf() is not None          # reclaims #2 and re-arms used_event
    assert p.drv.enable_cb() is False            # #3 is pending
    p.drv.disable_cb()


def test_flags_call_suppression_without_event_idx(pairs):
    p = pairs(8, slot_size=8, features=0)
    riov = Iov()
    p.drv.add_slot(b"1")
    p.host.complete(p.host.getdesc(riov))
    assert p.host.need_notify() is False        # VRING_AVAIL_F_NO_INTERRUPT (disabled)
    p.drv.get_buf()
    assert p.drv.enable_cb() is True
    p.drv.add_slot(b"2")
    p.host.complete(p.host.getdesc(riov))
    assert p.host.need_notify() is True
    # without EVENT_IDX need_notify answers from the flag alone, even with nothing new
    assert p.host.need_notify() is True


def test_enable_cb_delayed(pairs):
    p = pairs(8, slot_size=8, features=EI)
    riov = Iov()
    for i in range(8):
        p.drv.add_slot(b"x")
    assert p.drv.enable_cb_delayed() is True     # wants a call after 6 of 8
    heads = [p.host.getdesc(riov) for _ in range(8)]
    for i, h in enumerate(heads):
        p.host.complete(h)
        notify = p.host.need_notify()
        assert notify is (i == 6), i              # used idx crosses used_event = 6


def test_abandon_returns_same_heads(pairs):
    p = pairs(8, slot_size=8)
    for i in range(3):
        p.drv.add_slot(bytes([i]))
    riov = Iov()
    heads = [p.host.getdesc(riov) for _ in range(3)]
    p.host.abandon(2)
    assert p.host.in_flight == 1
    assert [p.host.getdesc(riov) for _ in range(2)] == heads[1:]
    with pytest.raises(ValueError):
        p.host.abandon(4)


def test_descriptor_error_can_be_completed_and_ring_continues(pairs):
    p = pairs(8, slot_size=8)
    head = p.drv.add_buf(p.lo, 8, writable=True)
    p.drv.add_slot(b"next")
    riov = Iov()
    with pytest.raises(InvalidDescriptor) as ei:
        p.host.getdesc(riov, None)             # writable descriptor, no wiov: EPROTO
    assert ei.value.head == head
    p.host.complete(head, 0)
    h2 = p.host.getdesc(riov)
    assert riov.pull() == b"next"
    p.host.complete(h2)
    assert p.drv.get_buf() == (None, 0)
    assert p.drv.get_buf() == (None, 0)


def test_pull_many_and_add_many_slots(pairs):
    num = 16
    p = pairs(num, slot_size=16)
    msgs = [bytes([i]) * (1 + i % 16) for i in range(num)]
    src = b"".join(msgs)
    import array
    lens = array.array("I", [len(m) for m in msgs])
    assert p.drv.add_many_slots(src, lens, num) == num
    assert p.drv.add_many_slots(src, lens, num) == 0        # full
    dst = bytearray(sum(lens))
    out_lens = array.array("I", [0] * num)
    assert p.host.pull_many(dst, out_lens) == num
    assert bytes(dst) == src and list(out_lens) == list(lens)
    assert p.drv.reclaim() == num
    assert p.drv.num_free == num


def test_pull_many_stops_when_destination_is_full(pairs):
    import array
    p = pairs(8, slot_size=16)
    for i in range(4):
        p.drv.add_slot(bytes([i]) * 10)
    dst = bytearray(25)
    lens = array.array("I", [0] * 8)
    assert p.host.pull_many(dst, lens) == 2
    assert p.host.pending()
    assert p.host.in_flight == 0


def test_trusted_host_skips_range_checks(pairs):
    p = pairs(8, trusted=True)
    p.buf[100:104] = b"hdr!"                    # outside the arena, trusted anyway
    import struct
    r = p.r
    struct.pack_into("<QIHH", p.buf, r.desc_off, 100, 4, 0, 0)
    struct.pack_into("<H", p.buf, r.avail_off + 4, 0)
    struct.pack_into("<H", p.buf, r.avail_off + 2, 1)
    riov = Iov()
    assert p.host.getdesc(riov) == 0
    assert riov.pull() == b"hdr!"
    assert p.host.trusted


def test_closed_sides_refuse():
    p = Pair(8, slot_size=8)
    p.drv.close()
    p.host.close()
    with pytest.raises(ValueError):
        p.host.getdesc(Iov())
    with pytest.raises(ValueError):
        p.drv.add_slot(b"x")
    p.buf.close()


def test_ring_geometry_rejected():
    buf = mmap.mmap(-1, 65536)
    try:
        for num in (0, 3, 65536):
            with pytest.raises(ValueError):
                VringHost(buf, num, 4096, 4096 + 16 * 8, 8192, 12288, 4096)
        with pytest.raises(ValueError):     # used ring overlaps the arena
            VringHost(buf, 8, 4096, 4224, 8192, 8192, 4096)
        with pytest.raises(ValueError):     # arena beyond the buffer
            VringHost(buf, 8, 4096, 4224, 8192, 12288, 65536)
    finally:
        buf.close()
