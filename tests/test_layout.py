"""The segment format against the C ABI, header validation, and Segment lifecycle.

* A C program (tests/c/layout_probe.c) compiled against this machine's
  <linux/virtio_ring.h> prints vring_size, vring_init placement, the event-index
  words, struct sizes/offsets and a vring_need_event truth table; every number is
  compared with vringipc.layout, vringipc._ring.abi_sizes() and vringipc.need_event.
* parse_header accepts a good header and refuses each corrupted field with a
  LayoutError naming it.
* Segment: permissions, names, existence errors, memfd seals, free-space check.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import vringipc
from vringipc import _ring
from vringipc import layout as L
from vringipc.segment import MAX_NAME, SHM_DIR, Segment, make_name, validate_name
from vringipc.testing import unique_name

HEADER = Path("/usr/include/linux/virtio_ring.h")
PROBE_SRC = Path(__file__).parent / "c" / "layout_probe.c"
NUMS = (1, 2, 8, 256, 32768)

# (event, new, old) triples with a known answer, including 16-bit wrap cases.
NEED_EVENT_FIXED = [
    (0, 1, 0), (1, 1, 0), (5, 10, 0), (9, 10, 0), (10, 10, 0), (11, 10, 0),
    (65535, 2, 65534), (0xFFFF, 0, 0xFFFF), (0, 0, 0), (0, 0, 0xFFFF), (0xFFFE, 0, 0xFFFF),
    (1, 2, 0xFFFF), (2, 2, 0xFFFF), (0x7FFF, 0x8000, 0x7FFF), (0x8000, 0x8000, 0x7FFF),
    (0, 0x8000, 0), (0x7FFF, 0x8000, 0), (0x8000, 0x8000, 0),
]


def _need_event_ref(event: int, new: int, old: int) -> bool:
    """vring_need_event written out in Python (the truth the C run confirms)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def _triples() -> list[tuple[int, int, int]]:
    rng = random.Random(0x5EED)
    out = list(NEED_EVENT_FIXED)
    for _ in range(400):
        old = rng.randrange(0x10000)
        step = rng.choice([0, 1, 2, rng.randrange(0x10000), rng.randrange(64)])
        new = (old + step) & 0xFFFF
        event = rng.choice([rng.randrange(0x10000), (old + rng.randrange(-3, 4)) & 0xFFFF,
                            (new + rng.randrange(-3, 4)) & 0xFFFF])
        out.append((event, new, old))
    return out


# --------------------------------------------------------------------------
# C ABI probe
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def c_abi(tmp_path_factory):
    """Compile and run layout_probe.c; parsed output, or skip without gcc/header."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not available")
    if not HEADER.exists():
        pytest.skip(f"{HEADER} not installed (linux-libc-dev)")
    d = tmp_path_factory.mktemp("abi")
    exe = d / "layout_probe"
    cc = subprocess.run([gcc, "-std=gnu11", "-O1", "-Wall", "-Werror", "-o", str(exe), str(PROBE_SRC)],
                        capture_output=True, text=True, timeout=60)
    assert cc.returncode == 0, f"layout_probe.c failed to compile:\n{cc.stderr}"
    triples = _triples()
    stdin = "".join(f"{e} {n} {o}\n" for e, n, o in triples)
    run = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    facts, flags, rings, ne = {}, {}, {}, []
    for line in run.stdout.splitlines():
        k, *v = line.split()
        if k == "ring":
            num, size, dsc, av, us, ue, ae = map(int, v)
            rings[num] = dict(size=size, desc=dsc, avail=av, used=us, used_event=ue, avail_event=ae)
        elif k == "flag":
            flags[v[0]] = int(v[1])
        elif k == "ne":
            e, n, o, r = map(int, v)
            ne.append(((e, n, o), bool(r)))
        else:
            facts[k] = int(v[0])
    assert len(ne) == len(triples) and sorted(rings) == sorted(NUMS)
    return dict(facts=facts, flags=flags, rings=rings, ne=ne)


def test_struct_sizes_and_offsets(c_abi):
    f = c_abi["facts"]
    assert f["sizeof_desc"] == 16 and f["sizeof_used_elem"] == 8
    assert f["sizeof_avail"] == 4 and f["sizeof_used"] == 4
    assert (f["off_desc_addr"], f["off_desc_len"], f["off_desc_flags"], f["off_desc_next"]) == (0, 8, 12, 14)
    assert (f["off_used_elem_id"], f["off_used_elem_len"]) == (0, 4)
    assert (f["off_avail_idx"], f["off_avail_ring"], f["off_used_idx"], f["off_used_ring"]) == (2, 4, 2, 4)
    sizes = _ring.abi_sizes()
    assert sizes == {"vring_desc": f["sizeof_desc"], "vring_used_elem": f["sizeof_used_elem"]}
    # The struct formats the hostile tests write with match the C layout.
    assert struct.calcsize("<QIHH") == f["sizeof_desc"]
    assert struct.calcsize("<II") == f["sizeof_used_elem"]


def test_flag_and_feature_values(c_abi):
    fl = c_abi["flags"]
    assert (fl["VRING_DESC_F_NEXT"], fl["VRING_DESC_F_WRITE"], fl["VRING_DESC_F_INDIRECT"]) == (1, 2, 4)
    assert fl["VRING_USED_F_NO_NOTIFY"] == 1 and fl["VRING_AVAIL_F_NO_INTERRUPT"] == 1
    assert L.F_INDIRECT_DESC == vringipc.FEATURE_INDIRECT_DESC == 1 << fl["VIRTIO_RING_F_INDIRECT_DESC"]
    assert L.F_EVENT_IDX == vringipc.FEATURE_EVENT_IDX == 1 << fl["VIRTIO_RING_F_EVENT_IDX"]
    assert L.F_VERSION_1 == 1 << 32


def test_feature_version_1_constant():
    assert vringipc.FEATURE_VERSION_1 == L.F_VERSION_1 == 1 << 32


@pytest.mark.parametrize("num", NUMS)
def test_vring_size_and_offsets(c_abi, num):
    c = c_abi["rings"][num]
    assert L.vring_size(num, 4096) == c["size"]
    assert L.vring_offsets(num, 4096) == (c["desc"], c["avail"], c["used"])


@pytest.mark.parametrize("num", NUMS)
def test_segment_layout_places_rings_like_vring_init(c_abi, num):
    c = c_abi["rings"][num]
    lay = L.SegmentLayout.build([num], [4096])
    (r,) = lay.rings
    assert r.desc_off % 4096 == 0 and r.desc_off >= L.HDR_SIZE
    assert r.avail_off - r.desc_off == c["avail"]
    assert r.used_off - r.desc_off == c["used"]
    assert r.used_event_off - r.desc_off == c["used_event"]
    assert r.avail_event_off - r.desc_off == c["avail_event"]
    assert r.ring_bytes == c["size"]
    assert lay.arena_off >= r.desc_off + r.ring_bytes and lay.arena_off % 4096 == 0


def test_multi_ring_layout_each_ring_like_vring_init(c_abi):
    nums = [256, 2, 32768, 8]
    lay = L.SegmentLayout.build(nums, [4096, 100, 64, 1 << 16])
    prev_end = L.HDR_SIZE
    for num, r in zip(nums, lay.rings):
        c = c_abi["rings"][num]
        assert r.desc_off == L.align_up(prev_end, 4096)
        assert (r.avail_off - r.desc_off, r.used_off - r.desc_off) == (c["avail"], c["used"])
        assert (r.used_event_off - r.desc_off, r.avail_event_off - r.desc_off) == (
            c["used_event"], c["avail_event"])
        prev_end = r.desc_off + r.ring_bytes
    assert lay.arena_off == L.align_up(prev_end, 4096)
    # The windows tile the arena without overlap.
    off = lay.arena_off
    for r in lay.rings:
        assert r.win_off == off and r.win_size >= 16
        off += r.win_size
    assert lay.arena_off + lay.arena_size == off <= lay.seg_size
    # And the packed header parses back to the same geometry.
    assert L.parse_header(lay.pack_header(), lay.seg_size) == lay


def test_need_event_truth_table(c_abi):
    ne = c_abi["ne"]
    assert len(ne) > 400
    bad = [(t, want, vringipc.need_event(*t)) for t, want in ne if vringipc.need_event(*t) != want]
    assert not bad, f"need_event disagrees with vring_need_event: {bad[:10]}"
    # The Python reference used elsewhere agrees too (so the table is not vacuous).
    assert all(_need_event_ref(*t) == want for t, want in ne)
    fixed = dict(ne[:len(NEED_EVENT_FIXED)])
    assert fixed[(0, 1, 0)] and not fixed[(1, 1, 0)] and fixed[(5, 10, 0)] and fixed[(9, 10, 0)]
    assert not fixed[(10, 10, 0)] and fixed[(65535, 2, 65534)] and fixed[(0xFFFF, 0, 0xFFFF)]  # event == old, wrapping


# --------------------------------------------------------------------------
# parse_header
# --------------------------------------------------------------------------

HDR = struct.Struct("<8sHHIQQIIIIQQQQ")
OFF_MAGIC, OFF_VMAJ, OFF_HDRSZ, OFF_SEGSZ, OFF_FEAT = 0x00, 0x08, 0x0C, 0x10, 0x18
OFF_NRINGS, OFF_ADDRMODE, OFF_ARENA_OFF, OFF_ARENA_SIZE, OFF_MAXMSG = 0x24, 0x28, 0x30, 0x38, 0x40
RING0 = L.RING_TABLE_OFF
R_NUM, R_ALIGN, R_MAXIOV, R_DESC, R_AVAIL, R_USED, R_BYTES, R_WOFF, R_WSIZE = 0, 2, 4, 8, 16, 24, 32, 40, 48


@pytest.fixture
def good():
    lay = L.SegmentLayout.build([8, 16], [4096, 4096])
    return lay, bytearray(lay.pack_header())


def _refused(buf, size, match):
    with pytest.raises(L.LayoutError, match=match):
        L.parse_header(buf, size)


def test_parse_header_roundtrip(good):
    lay, hdr = good
    got = L.parse_header(hdr, lay.seg_size)
    assert got == lay
    assert got.create_time_ns == lay.create_time_ns
    # A full-size buffer with the header at the front parses without mapped_size.
    seg = bytearray(lay.seg_size)
    seg[:L.HDR_SIZE] = hdr
    assert L.parse_header(seg) == lay
    # The result is a private copy: scribbling on the buffer changes nothing.
    struct.pack_into("<H", seg, RING0 + R_NUM, 3)
    assert got.rings[0].num == 8


def test_parse_header_bad_magic(good):
    lay, hdr = good
    struct.pack_into("<8s", hdr, OFF_MAGIC, b"VRINGIPX")
    _refused(hdr, lay.seg_size, "bad magic")


@pytest.mark.parametrize("major", [0, 2, 0xFFFF])
def test_parse_header_wrong_major(good, major):
    lay, hdr = good
    struct.pack_into("<H", hdr, OFF_VMAJ, major)
    _refused(hdr, lay.seg_size, "version")


def test_parse_header_minor_version_is_accepted(good):
    lay, hdr = good
    struct.pack_into("<H", hdr, OFF_VMAJ + 2, 7)
    assert L.parse_header(hdr, lay.seg_size).rings == lay.rings


@pytest.mark.parametrize("hs", [0, 4095, 8192])
def test_parse_header_hdr_size(good, hs):
    lay, hdr = good
    struct.pack_into("<I", hdr, OFF_HDRSZ, hs)
    _refused(hdr, lay.seg_size, "hdr_size")


@pytest.mark.parametrize("delta", [-4096, -1, 1, 4096], ids=["trunc-page", "trunc-1", "over-1", "over-page"])
def test_parse_header_seg_size_vs_mapped(good, delta):
    lay, hdr = good
    _refused(hdr, lay.seg_size + delta, "header says")


def test_parse_header_truncated_buffer(good):
    """The real mapping shorter than the header claims (no mapped_size given)."""
    lay, hdr = good
    seg = bytearray(lay.seg_size - 4096)
    seg[:L.HDR_SIZE] = hdr
    _refused(seg, None, "header says")


@pytest.mark.parametrize("bits", [1 << 0, 1 << 24, 1 << 33, 1 << 63], ids=hex)
def test_parse_header_unknown_features(good, bits):
    lay, hdr = good
    struct.pack_into("<Q", hdr, OFF_FEAT, lay.features | bits)
    _refused(hdr, lay.seg_size, "feature")


def test_parse_header_features_without_version_1(good):
    lay, hdr = good
    struct.pack_into("<Q", hdr, OFF_FEAT, lay.features & ~L.F_VERSION_1)
    _refused(hdr, lay.seg_size, "feature")


@pytest.mark.parametrize("n", [0, 5, 0xFFFFFFFF])
def test_parse_header_nrings(good, n):
    lay, hdr = good
    struct.pack_into("<I", hdr, OFF_NRINGS, n)
    _refused(hdr, lay.seg_size, "nrings")


def test_parse_header_addr_mode(good):
    lay, hdr = good
    struct.pack_into("<I", hdr, OFF_ADDRMODE, 1)
    _refused(hdr, lay.seg_size, "addr_mode")


@pytest.mark.parametrize("num", [0, 3, 12, 65535, 65536], ids=lambda n: f"num{n}")
def test_parse_header_bad_num(good, num):
    """Not a power of two, or out of 1..32768.  65536 does not fit the u16
    field: written truncated it reads back as 0, which is refused too."""
    lay, hdr = good
    struct.pack_into("<H", hdr, RING0 + R_NUM, num & 0xFFFF)
    _refused(hdr, lay.seg_size, r"ring 0: ring size must be a power of two")


@pytest.mark.parametrize("num", [0, 3, 65536, 1 << 17])
def test_build_refuses_bad_num(num):
    with pytest.raises(L.LayoutError, match="power of two"):
        L.SegmentLayout.build([num], [4096])


def test_parse_header_bad_num_second_ring(good):
    lay, hdr = good
    struct.pack_into("<H", hdr, RING0 + 64 + R_NUM, 24)
    _refused(hdr, lay.seg_size, "ring 1: ring size must be a power of two")


def test_parse_header_align(good):
    lay, hdr = good
    struct.pack_into("<H", hdr, RING0 + R_ALIGN, 4)
    _refused(hdr, lay.seg_size, "align")


@pytest.mark.parametrize("field,delta", [
    (R_DESC, 16), (R_DESC, -4096), (R_AVAIL, 2), (R_AVAIL, -16), (R_USED, -4), (R_USED, 4096),
    (R_BYTES, 1), (R_BYTES, -2),
], ids=["desc+16", "desc-page", "avail+2", "avail-16", "used-4", "used+page", "bytes+1", "bytes-2"])
def test_parse_header_offsets_not_vring_init(good, field, delta):
    lay, hdr = good
    (v,) = struct.unpack_from("<Q", hdr, RING0 + field)
    struct.pack_into("<Q", hdr, RING0 + field, v + delta)
    _refused(hdr, lay.seg_size, "offsets do not follow vring_init")


def test_parse_header_num_changed_keeps_old_offsets(good):
    """A valid power of two that does not match the offsets is refused."""
    lay, hdr = good
    struct.pack_into("<H", hdr, RING0 + R_NUM, 16)
    _refused(hdr, lay.seg_size, "offsets do not follow vring_init")


@pytest.mark.parametrize("case", ["size-past-end", "off-past-end", "off-in-header", "off-unaligned",
                                  "size-zero", "size-huge"])
def test_parse_header_arena_outside_segment(good, case):
    lay, hdr = good
    off, size = lay.arena_off, lay.arena_size
    if case == "size-past-end":
        size = lay.seg_size - off + 1
    elif case == "off-past-end":
        off = lay.seg_size
    elif case == "off-in-header":
        off = 0
    elif case == "off-unaligned":
        off += 64
    elif case == "size-zero":
        size = 0
    else:
        size = (1 << 64) - 1
    struct.pack_into("<QQ", hdr, OFF_ARENA_OFF, off, size)
    _refused(hdr, lay.seg_size, "arena")


def test_parse_header_arena_not_after_rings(good):
    """An arena placed over the second ring (inside the segment, aligned)."""
    lay, hdr = good
    struct.pack_into("<QQ", hdr, OFF_ARENA_OFF, lay.rings[1].desc_off,
                     lay.arena_size + lay.arena_off - lay.rings[1].desc_off)
    with pytest.raises(L.LayoutError):
        L.parse_header(hdr, lay.seg_size)


@pytest.mark.parametrize("case", ["below", "above", "zero"])
def test_parse_header_window_outside_arena(good, case):
    lay, hdr = good
    r = lay.rings[1]
    woff, wsize = r.win_off, r.win_size
    if case == "below":
        woff = lay.arena_off - 64
    elif case == "above":
        wsize += 64
    else:
        wsize = 0
    struct.pack_into("<QQ", hdr, RING0 + 64 + R_WOFF, woff, wsize)
    _refused(hdr, lay.seg_size, "ring 1: arena window outside the arena")


@pytest.mark.parametrize("shift", [0, 64, -64])
def test_parse_header_windows_overlap(good, shift):
    lay, hdr = good
    r0, r1 = lay.rings
    struct.pack_into("<QQ", hdr, RING0 + 64 + R_WOFF, r0.win_off + max(shift, 0),
                     r1.win_size - max(shift, 0))
    if shift < 0:  # ring 0's window grown into ring 1's
        struct.pack_into("<QQ", hdr, RING0 + R_WOFF, r0.win_off, r0.win_size + 64)
        struct.pack_into("<QQ", hdr, RING0 + 64 + R_WOFF, r1.win_off, r1.win_size)
    _refused(hdr, lay.seg_size, "overlap")


@pytest.mark.parametrize("m", [0, 65537])
def test_parse_header_max_iov(good, m):
    lay, hdr = good
    struct.pack_into("<I", hdr, RING0 + R_MAXIOV, m)
    _refused(hdr, lay.seg_size, "max_iov")


@pytest.mark.parametrize("m", [0, 1 << 32])
def test_parse_header_max_msg(good, m):
    lay, hdr = good
    struct.pack_into("<Q", hdr, OFF_MAXMSG, m)
    _refused(hdr, lay.seg_size, "max_msg")


@pytest.mark.parametrize("n", [0, 16, 4095])
def test_parse_header_short_buffer(good, n):
    lay, hdr = good
    _refused(hdr[:n], lay.seg_size, "smaller than the header page")


def test_parse_header_random_single_byte_corruption_never_crashes(good):
    """Any one-byte change is either still valid or a LayoutError - never another exception."""
    lay, hdr = good
    rng = random.Random(7)
    for _ in range(300):
        h = bytearray(hdr)
        pos = rng.randrange(0x80 + 2 * 64)
        h[pos] = rng.randrange(256)
        try:
            L.parse_header(h, lay.seg_size)
        except L.LayoutError:
            pass


# --------------------------------------------------------------------------
# Segment
# --------------------------------------------------------------------------

def _shm_path(name: str) -> str:
    return os.path.join(SHM_DIR, name.lstrip("/"))


def test_segment_shm_mode_0600_and_name():
    with Segment.create(8192) as seg:
        assert seg.owner and seg.backend == "shm"
        assert len(seg.name) <= MAX_NAME == 30
        validate_name(seg.name)
        st = os.stat(_shm_path(seg.name))
        assert st.st_mode & 0o777 == 0o600
        assert st.st_size == 8192
        assert len(seg.buf) == 8192
    assert not os.path.exists(_shm_path(seg.name))


def test_make_name_short_and_unique():
    names = {make_name() for _ in range(200)}
    assert len(names) == 200
    for n in names:
        assert len(n) <= 30 and validate_name(n) == n


@pytest.mark.parametrize("bad", [
    "", "/", "noslash", "//x", "/a/b", "/" + "a" * 30, "/bad name", "/bad\x00", "/ümlaut",
    "/semi;colon", None, b"/bytes", 42,
], ids=repr)
def test_validate_name_rejects(bad):
    with pytest.raises(ValueError):
        validate_name(bad)


@pytest.mark.parametrize("bad", ["/abc\n", "/" + "a" * 29 + "\n"], ids=["newline", "newline-31"])
def test_validate_name_rejects_trailing_newline(bad):
    with pytest.raises(ValueError):
        validate_name(bad)


@pytest.mark.parametrize("good_name", ["/a", "/" + "a" * 29, "/vr_0123456789abcdef", "/A-b_c.d"])
def test_validate_name_accepts(good_name):
    assert validate_name(good_name) == good_name


def test_create_with_bad_name_refused():
    with pytest.raises(ValueError):
        Segment.create(4096, name="/" + "x" * 40)


def test_create_existing_explicit_name():
    name = unique_name("dup")
    with Segment.create(4096, name=name) as seg:
        assert seg.name == name
        with pytest.raises(FileExistsError):
            Segment.create(4096, name=name)
        # The failed create did not unlink or disturb the existing one.
        assert os.path.exists(_shm_path(name))
        with Segment.attach(name) as other:
            assert not other.owner and other.size == 4096
        assert os.path.exists(_shm_path(name)), "attacher must never unlink"


def test_attach_missing():
    with pytest.raises(FileNotFoundError):
        Segment.attach(unique_name("miss"))


def test_attach_shares_memory():
    with Segment.create(4096) as seg:
        with Segment.attach(seg.name, expect_size=4096) as other:
            seg.buf[100:105] = b"hello"
            assert other.buf[100:105] == b"hello"
        with pytest.raises(ValueError):
            Segment.attach(seg.name, expect_size=8192)


def test_memfd_segment_is_sealed():
    with Segment.create(8192, backend="memfd") as seg:
        assert seg.name is None and seg.fd >= 0
        seals = fcntl.fcntl(seg.fd, fcntl.F_GET_SEALS)
        want = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
        assert seals & want == want
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 4096)
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 16384)
        # A sealed memfd passed along is accepted by from_fd.
        other = Segment.from_fd(os.dup(seg.fd))
        try:
            seg.buf[0:3] = b"abc"
            assert other.buf[0:3] == b"abc" and other.size == 8192
        finally:
            other.close()


def test_from_fd_refuses_unsealed_memfd():
    fd = os.memfd_create("vr_unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, 8192)
    with pytest.raises(PermissionError, match="sealed"):
        Segment.from_fd(fd)
    # from_fd took ownership of the fd and closed it on failure.
    with pytest.raises(OSError) as ei:
        os.fstat(fd)
    assert ei.value.errno == errno.EBADF


def test_from_fd_refuses_partly_sealed_memfd():
    fd = os.memfd_create("vr_half", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 8192)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)  # can still shrink
    with pytest.raises(PermissionError):
        Segment.from_fd(fd)


def test_create_larger_than_dev_shm_free_space():
    st = os.statvfs(SHM_DIR)
    free = st.f_bavail * st.f_frsize
    want = free + (1 << 30)
    with pytest.raises(OSError) as ei:
        Segment.create(want)
    assert ei.value.errno == errno.ENOSPC
    msg = str(ei.value)
    assert SHM_DIR in msg and str(want) in msg


@pytest.mark.parametrize("size", [0, -1])
def test_create_nonpositive_size(size):
    with pytest.raises(ValueError):
        Segment.create(size)


def test_close_is_idempotent_and_buf_after_close():
    seg = Segment.create(4096)
    try:
        seg.close()
        seg.close()
        assert seg.closed
        with pytest.raises(ValueError):
            seg.buf
    finally:
        seg.unlink()
        seg.unlink()
    assert not os.path.exists(_shm_path(seg.name))
