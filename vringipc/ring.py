"""SharedRing: a segment laid out as split rings, with their eventfds.

This is the ring core's Python face: it creates (or attaches to) a segment,
writes or validates the header, owns one kick eventfd (driver -> device) and
one call eventfd (device -> driver) per ring, and hands out the two sides::

    ring = SharedRing.create(num=256, slot_size=256)
    drv = ring.driver()          # in the producer
    host = ring.host()           # in the consumer (after fork, spawn, or attach)

The hot paths are the VringHost / VringDriver methods themselves (Cython).
"""

from __future__ import annotations

import os
import weakref

from multiprocessing import context as _mp_context
from multiprocessing import reduction as _mp_reduction

from vringipc import layout as L
from vringipc._ring import SharedWords, VringDriver, VringHost
from vringipc.segment import Segment

__all__ = ["SharedRing", "make_eventfd"]


def make_eventfd() -> int:
    """A non-blocking, close-on-exec eventfd (non-blocking so that draining
    one that another waiter already drained never blocks)."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class SharedRing:
    """A segment with ``nrings`` split rings and their notification eventfds."""

    segment: Segment | None = None
    layout: L.SegmentLayout | None = None
    kick_fds: list[int] = []
    call_fds: list[int] = []

    def __init__(self, segment: Segment, layout: L.SegmentLayout, kick_fds, call_fds,
                 owns_fds: bool = True):
        self.segment = segment
        self.layout = layout
        self.kick_fds = list(kick_fds)
        self.call_fds = list(call_fds)
        self._owns_fds = owns_fds
        self._sides: weakref.WeakSet = weakref.WeakSet()
        self.words = SharedWords(segment.buf)

    # --- construction -------------------------------------------------------
    @classmethod
    def create(cls, num: int = 256, *, arena_size: int | None = None, slot_size: int | None = None,
               nrings: int = 1, event_idx: bool = True, indirect: bool = True,
               max_msg: int | None = None, max_iov: int = 1024, backend: str = "shm",
               name: str | None = None, mode: int = 0o600,
               app_kind: int = L.APP_RAW, reserve: int | None = None) -> "SharedRing":
        """Create a segment with `nrings` rings of `num` entries.

        Each ring's arena window is `arena_size` bytes, or num*slot_size when
        slot_size is given (plus room for an indirect pool when indirect).
        `reserve`: bytes of the segment to commit now (default: all; the
        queue commits its header and rings and reserves the arena as it
        fills, see Segment.create)."""
        if arena_size is None:
            if slot_size is None:
                slot_size = 256
            arena_size = num * slot_size
            if indirect:
                arena_size += num * min(num, 16) * 16
        features = (L.F_EVENT_IDX if event_idx else 0) | (L.F_INDIRECT_DESC if indirect else 0)
        lay = L.SegmentLayout.build([num] * nrings, [arena_size] * nrings, features=features,
                                    max_msg=max_msg, max_iov=max_iov, app_kind=app_kind)
        seg = Segment.create(lay.seg_size, name=name, mode=mode, backend=backend,
                             reserve=None if reserve is None else lay.rings[0].win_off + reserve)
        try:
            seg.buf[:L.HDR_SIZE] = lay.pack_header()
            kicks = [make_eventfd() for _ in range(nrings)]
            calls = [make_eventfd() for _ in range(nrings)]
        except BaseException:
            seg.close()
            seg.unlink()
            raise
        ring = cls(seg, lay, kicks, calls)
        ring.words.store32(L.OFF_STATUS, L.STATUS_ACKNOWLEDGE | L.STATUS_DRIVER
                           | L.STATUS_FEATURES_OK | L.STATUS_DRIVER_OK)
        return ring

    @classmethod
    def attach(cls, name: str, kick_fds=(), call_fds=()) -> "SharedRing":
        """Attach to a named segment; validate its header.  Without eventfds the
        sides poll (spin + yield) instead of sleeping."""
        seg = Segment.attach(name)
        try:
            lay = L.parse_header(seg.buf)
        except BaseException:
            seg.close()
            raise
        n = len(lay.rings)
        kick_fds = list(kick_fds) or [-1] * n
        call_fds = list(call_fds) or [-1] * n
        if len(kick_fds) != n or len(call_fds) != n:
            seg.close()
            raise ValueError(f"segment has {n} rings: pass {n} kick and call fds")
        return cls(seg, lay, kick_fds, call_fds)

    # --- the two sides --------------------------------------------------------
    def host(self, index: int = 0, *, trusted: bool = False, **kw) -> VringHost:
        """The device (consumer) side of ring `index`."""
        r = self.layout.rings[index]
        kw.setdefault("max_msg", self.layout.max_msg)
        kw.setdefault("max_iov", r.max_iov)
        h = VringHost(self.segment.buf, *r.ring_args(), features=self.layout.features,
                      trusted=trusted, kick_fd=self.kick_fds[index],
                      call_fd=self.call_fds[index], **kw)
        self._sides.add(h)
        return h

    def driver(self, index: int = 0, *, slot_size: int = 0, indirect_entries: int | None = None,
               **kw) -> VringDriver:
        """The driver (producer) side of ring `index`.

        With slot_size, head h owns window bytes [h*slot_size, +slot_size).  When
        INDIRECT is negotiated an indirect pool (indirect_entries descriptors per
        head, default min(num, 16)) takes the END of the window, if it fits
        after the slots; buffers you place yourself must stay below
        ``driver.indirect_pool_offset``."""
        r = self.layout.rings[index]
        pool = None
        if self.layout.indirect:
            ent = min(r.num, 16) if indirect_entries is None else indirect_entries
            pool_off = (r.win_off + r.win_size - ent * 16 * r.num) & ~15
            if ent >= 2 and pool_off >= r.win_off + slot_size * r.num:
                pool = (pool_off, ent)
        d = VringDriver(self.segment.buf, *r.ring_args(), features=self.layout.features,
                        indirect_pool=pool, slot_size=slot_size, kick_fd=self.kick_fds[index],
                        call_fd=self.call_fds[index], **kw)
        self._sides.add(d)
        return d

    # --- lifecycle -------------------------------------------------------------
    @property
    def name(self) -> str | None:
        return self.segment.name if self.segment else None

    def close(self) -> None:
        """Close every side handed out, the eventfds this handle owns, and the
        mapping.  Idempotent."""
        for side in list(self._sides):
            side.close()
        self._sides = weakref.WeakSet()
        if getattr(self, "words", None) is not None:
            self.words.close()
            self.words = None
        if self._owns_fds:
            for fd in self.kick_fds + self.call_fds:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        self.kick_fds = [-1] * len(self.kick_fds)
        self.call_fds = [-1] * len(self.call_fds)
        if self.segment is not None:
            self.segment.close()

    def unlink(self) -> None:
        if self.segment is not None:
            self.segment.unlink()

    def __enter__(self) -> "SharedRing":
        return self

    def __exit__(self, *exc) -> None:
        owner = self.segment is not None and self.segment.owner
        try:
            self.close()
        finally:
            if owner:
                self.unlink()

    # --- reaching child processes ----------------------------------------------
    def __reduce__(self):
        # Only while starting a child (spawn/forkserver), as multiprocessing
        # does for its own queues: fds travel through its fd-passing machinery.
        _mp_context.assert_spawning(self)
        seg = self.segment
        if seg.backend == "memfd":
            where = ("memfd", _mp_reduction.DupFd(seg.fd))
        else:
            where = ("shm", seg.name)
        kicks = [_mp_reduction.DupFd(fd) for fd in self.kick_fds]
        calls = [_mp_reduction.DupFd(fd) for fd in self.call_fds]
        return (_rebuild_shared_ring, (where, kicks, calls))


def _rebuild_shared_ring(where, kicks, calls) -> SharedRing:
    kind, ref = where
    if kind == "memfd":
        seg = Segment.from_fd(ref.detach())
    else:
        seg = Segment.attach(ref)
    try:
        lay = L.parse_header(seg.buf)
    except BaseException:
        seg.close()
        raise
    return SharedRing(seg, lay, [k.detach() for k in kicks], [c.detach() for c in calls])
