"""The segment format: one place that says where every byte lives.

A vringipc segment is a header page, then one or more split rings laid out
exactly as ``vring_init(num, 4096)`` from ``<linux/virtio_ring.h>`` (so a C peer
can use that header unchanged), then the buffer arena.  All integers are
little-endian.  Descriptor ``addr`` fields are byte offsets from the start of
the segment, and only the arena window of a ring is addressable.

Header page (4096 bytes)::

    off    size  field              notes
    0x000  8     magic              b"VRINGIPC"
    0x008  2     version_major      1; a reader refuses any other major
    0x00A  2     version_minor      0
    0x00C  4     hdr_size           4096
    0x010  8     seg_size           total bytes; must equal the mapped size
    0x018  8     features           negotiated ring feature bits (INDIRECT_DESC 28,
                                    EVENT_IDX 29, VERSION_1 32 - always set)
    0x020  4     status             virtio-like: ACKNOWLEDGE 1, DRIVER 2, DRIVER_OK 4,
                                    FEATURES_OK 8, NEEDS_RESET 0x40, FAILED 0x80
                                    (atomic word, may change at run time)
    0x024  4     nrings             1..4
    0x028  4     addr_mode          0 = descriptor addr is a segment offset
    0x02C  4     app_kind           what the rings carry (0 raw ring, 1 channel, 2 queue)
    0x030  8     arena_off          start of the arena (4096-aligned)
    0x038  8     arena_size         bytes
    0x040  8     max_msg            largest chain the consumer accepts, bytes
    0x048  8     create_time_ns     CLOCK_REALTIME at creation (for `ls`)
    0x050  48    reserved           zero
    0x080  4*64  ring table         one 64-byte entry per ring, see below
    0x200  128   driver liveness    producer side: see PEER_* below
    0x280  128   device liveness    consumer side, on its own cache lines
    0x300  4     driver wait hint   producer side's CPU and state, see WAIT HINTS below
    0x340  4     device wait hint   consumer side's, on its own cache line
    0x380  128   reserved
    0x400  3072  application area; for a Queue (app_kind 2), see below

Queue control block (app_kind 2; words accessed atomically, each side's on
its own 64-byte line)::

    0x400  4  magic "VRQ2"         0x408  8  maxsize (items, 0 = none)
    0x410  8  creator's PID namespace inode (lock owners are thread ids)
    0x440  8  producer lock (cython_src/vr_lock.h: owner tid | WAITERS bit 31 |
              owner start time << 32; 0 = free)
    0x448  8  producer state: avail idx (bits 0-15) | arena head position << 16
              (positions count modulo the largest multiple of the arena size
              below 2**48, so offsets never jump when they wrap)
    0x450  4  reclaim idx: oldest message that may still occupy arena bytes
    0x458  8  messages published      0x460  8  arena chunks committed now
    0x480  8  consumer lock (as the producer lock)
    0x488  8  messages taken          0x490  8  batch cursor: used idx | position << 16
    0x4C0  4  producers asleep     0x500  4  consumers asleep
    0x540  8  unfinished tasks     0x548  4  processes asleep in join()
    0x580  4  producers' wait hint 0x5C0  4  consumers' wait hint (see below)
    0x600  16*160  process table: u32 pid, u32 reserved, u64 start time
    window start (cython_src/_queue.pxi, _side_bytes): u32 pinned extents in
                  use; 64 x {u64 position, u32 bytes, u32 holder pid} pinned
                  extents (held messages reclamation went past); u64
                  slot_start[num]; u64 held[num] (holder pid | position << 32
                  of a message pinned by a zero-copy view); the bitmap of
                  committed 1 MiB arena chunks; page aligned.  Then the data
                  region: messages (u32 nbufs, u32 kind, u64 main length, u64
                  buffer lengths; main at +64, each buffer 64-aligned) and
                  batches (u32 0xFFFFFFFF, u32 "BTCH", then records: u64
                  length or ~0 = go on at the next lap, padded to 64, then a
                  message).

Ring table entry (64 bytes, at 0x080 + 64*i)::

    +0   2  num            power of two, 1..32768
    +2   2  align          4096 (vring_init's align)
    +4   4  max_iov        segments per chain accepted by the consumer
    +8   8  desc_off       = ring start
    +16  8  avail_off      = desc_off + 16*num
    +24  8  used_off       = align_up(avail_off + 6 + 2*num, align)
    +32  8  ring_bytes     = vring_size(num, align)
    +40  8  win_off        this ring's addressable arena window
    +48  8  win_size
    +56  8  reserved

Liveness block (128 bytes)::

    +0   4  pid            0 = nobody attached
    +4   4  epoch          bumped on every attach
    +8   8  start_time     the process's start time (clock ticks since boot,
                           /proc/PID/stat field 22), guards against pid reuse
    +16  8  heartbeat_ns   CLOCK_MONOTONIC, optional
    +24  4  state          0 DETACHED, 1 ATTACHED, 2 CLOSED (clean exit)

Wait hints (u32, each alone on a 64-byte line; cython_src/vr_wait.h)::

    (cpu + 1) << 2 | state     state 1 RUNNING, 2 ASLEEP; 0 = never written

The side's process writes it (relaxed, only when the value changes) when it
puts/sends/gets, and ASLEEP before it sleeps in the kernel.  A waiter polls
only while the other side's word says RUNNING on another CPU, and yields the
CPU otherwise.  Hints carry no data and no wake-up: a wrong value costs at
most one spin budget.  A Channel uses 0x300/0x340, a Queue 0x580/0x5C0 (the
last producer / consumer).

Each ring (``vring_init(num, 4096)``)::

    desc   16*num bytes: {u64 addr, u32 len, u16 flags, u16 next}
    avail  u16 flags, u16 idx, u16 ring[num], u16 used_event
    (pad to 4096)
    used   u16 flags, u16 idx, {u32 id, u32 len} ring[num], u16 avail_event

Rings start on 4096-byte boundaries right after the header; the arena starts
on the next 4096-byte boundary after the last ring.

The layout is validated once when a process attaches (:func:`parse_header`)
and kept in a private :class:`SegmentLayout`; later writes to the header by a
peer change nothing for that process.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

MAGIC = b"VRINGIPC"
VERSION_MAJOR = 1
VERSION_MINOR = 0
HDR_SIZE = 4096
ALIGN = 4096
MAX_NUM = 32768
MAX_RINGS = 4

F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
KNOWN_FEATURES = F_INDIRECT_DESC | F_EVENT_IDX | F_VERSION_1

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

APP_RAW, APP_CHANNEL, APP_QUEUE = 0, 1, 2

OFF_STATUS = 0x020
RING_TABLE_OFF = 0x080
RING_ENTRY_SIZE = 64
DRIVER_LIVENESS_OFF = 0x200
DEVICE_LIVENESS_OFF = 0x280
APP_AREA_OFF = 0x400
APP_AREA_SIZE = HDR_SIZE - APP_AREA_OFF

PEER_PID, PEER_EPOCH, PEER_START, PEER_HEARTBEAT, PEER_STATE = 0, 4, 8, 16, 24
PEER_DETACHED, PEER_ATTACHED, PEER_CLOSED = 0, 1, 2

_HDR = struct.Struct("<8sHHIQQIIIIQQQQ")  # 0x000..0x050
_RING = struct.Struct("<HHIQQQQQQQ")       # 64 bytes
assert _HDR.size == 0x50 and _RING.size == RING_ENTRY_SIZE


class LayoutError(ValueError):
    """The segment header is not a valid vringipc layout."""


def align_up(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def vring_size(num: int, align: int = ALIGN) -> int:
    """``vring_size()`` of <linux/virtio_ring.h>."""
    return align_up(16 * num + 2 * (3 + num), align) + 2 * 3 + 8 * num


def vring_offsets(num: int, align: int = ALIGN) -> tuple[int, int, int]:
    """(desc, avail, used) offsets relative to the ring start, as ``vring_init``."""
    avail = 16 * num
    used = align_up(avail + 4 + 2 * num + 2, align)
    return 0, avail, used


def _check_num(num: int) -> None:
    if not (1 <= num <= MAX_NUM) or num & (num - 1):
        raise LayoutError(f"ring size must be a power of two in 1..{MAX_NUM}, got {num}")


@dataclass(frozen=True)
class RingLayout:
    """Where one ring and its arena window live, in segment offsets."""

    num: int
    desc_off: int
    avail_off: int
    used_off: int
    ring_bytes: int
    win_off: int
    win_size: int
    max_iov: int = 1024
    align: int = ALIGN

    @property
    def used_event_off(self) -> int:
        return self.avail_off + 4 + 2 * self.num

    @property
    def avail_event_off(self) -> int:
        return self.used_off + 4 + 8 * self.num

    def ring_args(self) -> tuple[int, int, int, int, int, int]:
        """Positional arguments for VringHost / VringDriver."""
        return (self.num, self.desc_off, self.avail_off, self.used_off, self.win_off, self.win_size)


@dataclass(frozen=True)
class SegmentLayout:
    """The validated, private copy of a segment's geometry."""

    seg_size: int
    features: int
    arena_off: int
    arena_size: int
    max_msg: int
    rings: tuple[RingLayout, ...]
    app_kind: int = APP_RAW
    create_time_ns: int = field(default=0, compare=False)

    @classmethod
    def build(
        cls,
        nums: list[int] | tuple[int, ...],
        arena_sizes: list[int] | tuple[int, ...],
        *,
        features: int = F_EVENT_IDX | F_INDIRECT_DESC,
        max_msg: int | None = None,
        max_iov: int = 1024,
        app_kind: int = APP_RAW,
    ) -> "SegmentLayout":
        """Lay out len(nums) rings, each with its own arena window of the given size."""
        if not 1 <= len(nums) <= MAX_RINGS or len(nums) != len(arena_sizes):
            raise LayoutError(f"1..{MAX_RINGS} rings, one arena size each")
        if features & ~KNOWN_FEATURES:
            raise LayoutError(f"unknown feature bits {features & ~KNOWN_FEATURES:#x}")
        features |= F_VERSION_1
        off = HDR_SIZE
        placed = []
        for num in nums:
            _check_num(num)
            d, a, u = vring_offsets(num)
            size = vring_size(num)
            placed.append((num, off + d, off + a, off + u, size))
            off = align_up(off + size, ALIGN)
        arena_off = off
        rings = []
        for (num, d, a, u, size), wsz in zip(placed, arena_sizes):
            if wsz < 16:
                raise LayoutError("each arena window needs at least 16 bytes")
            wsz = align_up(wsz, 64)
            rings.append(RingLayout(num, d, a, u, size, off, wsz, max_iov))
            off += wsz
        arena_size = off - arena_off
        seg_size = align_up(off, ALIGN)
        if max_msg is None:
            max_msg = min(max(r.win_size for r in rings), 0xFFFFFFFF)
        return cls(seg_size, features, arena_off, arena_size, max_msg, tuple(rings), app_kind,
                   time.time_ns())

    @property
    def event_idx(self) -> bool:
        return bool(self.features & F_EVENT_IDX)

    @property
    def indirect(self) -> bool:
        return bool(self.features & F_INDIRECT_DESC)

    def pack_header(self) -> bytes:
        """The header page as bytes (liveness blocks zero)."""
        buf = bytearray(HDR_SIZE)
        _HDR.pack_into(buf, 0, MAGIC, VERSION_MAJOR, VERSION_MINOR, HDR_SIZE, self.seg_size,
                       self.features, 0, len(self.rings), 0, self.app_kind, self.arena_off,
                       self.arena_size, self.max_msg, self.create_time_ns)
        for i, r in enumerate(self.rings):
            _RING.pack_into(buf, RING_TABLE_OFF + RING_ENTRY_SIZE * i, r.num, r.align, r.max_iov,
                            r.desc_off, r.avail_off, r.used_off, r.ring_bytes, r.win_off,
                            r.win_size, 0)
        return bytes(buf)


def parse_header(buf, mapped_size: int | None = None) -> SegmentLayout:
    """Validate a header against everything we know and return a private copy.

    ``buf`` is the segment (or at least its first page); ``mapped_size`` is the
    size actually mapped (defaults to len(buf)).  Raises LayoutError naming the
    first field that is wrong."""
    mv = memoryview(buf).cast("B")
    size = len(mv) if mapped_size is None else mapped_size
    if len(mv) < HDR_SIZE:
        raise LayoutError(f"segment of {len(mv)} bytes is smaller than the header page")
    hdr = bytes(mv[:HDR_SIZE])  # private copy: a racing peer cannot change what we check
    (magic, vmaj, vmin, hdr_size, seg_size, features, _status, nrings, addr_mode, app_kind,
     arena_off, arena_size, max_msg, ctime) = _HDR.unpack_from(hdr, 0)
    if magic != MAGIC:
        raise LayoutError(f"bad magic {magic!r}: not a vringipc segment")
    if vmaj != VERSION_MAJOR:
        raise LayoutError(f"segment format version {vmaj}.{vmin}, this library reads {VERSION_MAJOR}.x")
    if hdr_size != HDR_SIZE:
        raise LayoutError(f"hdr_size {hdr_size} != {HDR_SIZE}")
    if seg_size != size:
        raise LayoutError(f"header says {seg_size} bytes but the segment has {size}")
    if features & ~KNOWN_FEATURES or not features & F_VERSION_1:
        raise LayoutError(f"unsupported feature bits {features:#x}")
    if not 1 <= nrings <= MAX_RINGS:
        raise LayoutError(f"nrings {nrings} not in 1..{MAX_RINGS}")
    if addr_mode != 0:
        raise LayoutError(f"addr_mode {addr_mode} not supported")
    if app_kind not in (APP_RAW, APP_CHANNEL, APP_QUEUE):
        raise LayoutError(f"unknown app_kind {app_kind}")
    if arena_off % ALIGN or arena_off < HDR_SIZE or arena_size == 0 or arena_off + arena_size > seg_size:
        raise LayoutError(f"arena [{arena_off:#x}, +{arena_size:#x}) invalid for a segment of {seg_size}")
    if not 1 <= max_msg <= 0xFFFFFFFF:
        raise LayoutError(f"max_msg {max_msg} out of range")
    rings = []
    expect = HDR_SIZE
    for i in range(nrings):
        (num, align, max_iov, d, a, u, rbytes, woff, wsize, _r) = _RING.unpack_from(
            hdr, RING_TABLE_OFF + RING_ENTRY_SIZE * i)
        try:
            _check_num(num)
        except LayoutError as e:
            raise LayoutError(f"ring {i}: {e}") from None
        if align != ALIGN:
            raise LayoutError(f"ring {i}: align {align} != {ALIGN}")
        ed, ea, eu = vring_offsets(num)
        if (d, a, u, rbytes) != (expect + ed, expect + ea, expect + eu, vring_size(num)):
            raise LayoutError(f"ring {i}: offsets do not follow vring_init(num={num}, {ALIGN})")
        if not 1 <= max_iov <= 65536:
            raise LayoutError(f"ring {i}: max_iov {max_iov} out of range")
        if woff < arena_off or wsize == 0 or woff + wsize > arena_off + arena_size:
            raise LayoutError(f"ring {i}: arena window outside the arena")
        expect = align_up(expect + rbytes, ALIGN)
        rings.append(RingLayout(num, d, a, u, rbytes, woff, wsize, max_iov))
    if expect != arena_off:
        raise LayoutError("arena does not follow the rings")
    for i in range(len(rings)):
        for j in range(i + 1, len(rings)):
            ri, rj = rings[i], rings[j]
            if ri.win_off < rj.win_off + rj.win_size and rj.win_off < ri.win_off + ri.win_size:
                raise LayoutError(f"arena windows of rings {i} and {j} overlap")
    return SegmentLayout(seg_size, features, arena_off, arena_size, max_msg, tuple(rings),
                         app_kind, ctime)
