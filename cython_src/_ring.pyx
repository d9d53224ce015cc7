# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""vringipc._ring - the split ring in shared memory: device (VringHost) and
driver (VringDriver) sides, their iovecs, and eventfd waiting.

The verbs live in vringh.pxi / vringd.pxi as nogil C-level functions; this file
only turns them into Python methods: argument checking, exceptions, GIL release
around loops and sleeps.  The ring format itself is described in
vringipc/layout.py.
"""

cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memmove, memset
from libc.errno cimport errno, EINTR, EAGAIN, EINVAL, ENOSPC, EMSGSIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.bytearray cimport PyByteArray_FromStringAndSize, PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_RawMalloc, PyMem_RawCalloc, PyMem_RawFree

from vring cimport *

include "vringh.pxi"
include "vringd.pxi"
include "_wait.pxi"

from vringipc.errors import InvalidRing, InvalidDescriptor, MessageTooLarge, PeerDead, Full, Empty

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)

cdef extern from "<sched.h>" nogil:
    int sched_yield()


FEATURE_INDIRECT_DESC = 1 << VR_F_INDIRECT_DESC
FEATURE_EVENT_IDX = 1 << VR_F_EVENT_IDX
FEATURE_VERSION_1 = 1 << int(VR_F_VERSION_1)
MAX_NUM = VR_MAX_NUM

DEFAULT_MAX_IOV = 1024
DEFAULT_SPIN_NS = 50_000        # spin this long before sleeping on the eventfd

# Messages for the R_* / D_* / U_* reason codes (a, b are err_a / err_b).
_HOST_REASONS = {
    R_HEAD_RANGE: "avail ring offers head {a} but the ring has {b} entries",
    R_AVAIL_JUMP: "avail idx moved from {a} to {b}: more than num entries (or backwards)",
    R_HEAD_BUSY: "avail ring offers head {a} while it is still in flight",
    R_BROKEN: "ring is broken by an earlier invalid-ring error; reset it",
    D_NEXT_RANGE: "descriptor next {a} out of range (table of {b})",
    D_LOOP: "descriptor loop: more than {a} descriptors in chain {b}",
    D_ADDR: "buffer at {a} of {b} bytes is outside the arena",
    D_R_AFTER_W: "readable descriptor {a} after a writable one in chain {b}",
    D_NO_RIOV: "readable descriptor {a} in chain {b} but no riov given",
    D_NO_WIOV: "writable descriptor {a} in chain {b} but no wiov given",
    D_MSGSIZE: "chain of {a} bytes is above max_msg {b}",
    D_IND_NOFEAT: "INDIRECT descriptor {a} but VIRTIO_RING_F_INDIRECT_DESC was not negotiated",
    D_IND_LEN: "indirect table length {a} is 0 or not a multiple of 16",
    D_IND_BIG: "indirect table of {a} entries, more than num {b}",
    D_IND_ADDR: "indirect table at {a} of {b} bytes is outside the arena or not 16-aligned",
    D_IND_NESTED: "nested INDIRECT descriptor {a} in chain {b}",
    D_IOV_MAX: "chain has more than max_iov={a} segments",
    D_NOMEM: "out of memory growing an iovec to {a} segments",
}
_DRIVER_REASONS = {
    U_USED_JUMP: "used idx moved from {a} to {b}: more than the buffers in flight",
    U_USED_ID: "used ring names id {a} but the ring has {b} entries",
    U_USED_NOT_HEAD: "used ring names id {a} which is not a buffer in flight",
    U_USED_LEN: "used length {a} above the chain's {b} writable bytes",
    U_BROKEN: "ring is broken by an earlier invalid used entry",
}


cdef object _host_error(vrh_t *h, int rc, uint16_t head):
    msg = _HOST_REASONS.get(h.err_reason, "ring error").format(a=h.err_a, b=h.err_b)
    if h.err_ring:
        return InvalidRing(-rc, msg, None)
    return InvalidDescriptor(-rc, msg, head)


cdef inline bint _is_pow2(uint64_t n):
    return n != 0 and (n & (n - 1)) == 0


def check_ring_geometry(Py_ssize_t size, uint64_t num, uint64_t desc_off, uint64_t avail_off,
                        uint64_t used_off, uint64_t arena_off, uint64_t arena_size):
    """Validate ring placement inside a buffer of `size` bytes; ValueError if bad.

    num a power of two 1..32768; desc 16-, avail 2-, used 4-byte aligned;
    every part inside the buffer; no part overlapping another or the arena."""
    if not _is_pow2(num) or num > VR_MAX_NUM:
        raise ValueError(f"num must be a power of two in 1..{VR_MAX_NUM}, got {num}")
    if desc_off % 16 or avail_off % 2 or used_off % 4:
        raise ValueError("ring parts misaligned (desc 16, avail 2, used 4)")
    parts = [
        ("desc", desc_off, 16 * num),
        ("avail", avail_off, 6 + 2 * num),
        ("used", used_off, 6 + 8 * num),
        ("arena", arena_off, arena_size),
    ]
    for name, off, ln in parts:
        if off > <uint64_t>size or ln > <uint64_t>size - off:
            raise ValueError(f"{name} [{off}, +{ln}) does not fit in a buffer of {size} bytes")
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            a0, a1 = parts[i][1], parts[i][1] + parts[i][2]
            b0, b1 = parts[j][1], parts[j][1] + parts[j][2]
            if a0 < b1 and b0 < a1 and parts[i][2] and parts[j][2]:
                raise ValueError(f"{parts[i][0]} and {parts[j][0]} overlap")
    if arena_off == 0:
        raise ValueError("the arena cannot start at offset 0")


cdef int _wait_fds(int fd, int peer_fd, int64_t timeout_ns) noexcept nogil:
    """Sleep until fd (an eventfd) or peer_fd (a pidfd, -1 = none) is readable,
    or timeout_ns passes (<0 = forever); drain the eventfd.
    1 = eventfd readable, 2 = the peer exited, 0 = timeout, -errno (-EINTR: a
    signal arrived, check it)."""
    cdef pollfd p[2]
    cdef uint64_t buf
    cdef int ms, rc
    cdef unsigned long n = 1
    p[0].fd = fd
    p[0].events = POLLIN
    p[0].revents = 0
    if peer_fd >= 0:
        p[1].fd = peer_fd
        p[1].events = POLLIN
        p[1].revents = 0
        n = 2
    if timeout_ns < 0:
        ms = -1
    else:
        ms = <int>((timeout_ns + 999999) // 1000000)
    rc = poll(p, n, ms)
    if rc < 0:
        return -errno
    if rc == 0:
        return 0
    if p[0].revents:
        # eventfd: one read drains the counter (a kick storm costs one wake-up).
        read(fd, &buf, 8)
        return 1
    return 2


# How long one sleep lasts at most.  Between slices a sleeper re-arms its
# notification word (a peer that overwrote it -- buggy, or hostile -- cannot
# make us sleep forever once it behaves again), re-checks the ring, signals
# and its liveness check.  10 wake-ups a second cost nothing measurable.
DEF SLEEP_SLICE_NS = 100_000_000

# The wait loop shared by both sides: spin on `pending`, then arm
# notifications, re-check (the arm functions end with the SC fence of barrier
# C or D, so a publish racing with us is either seen here or kicks us), sleep
# on the eventfd, disarm.  Function pointers keep it one piece of code.
ctypedef bint (*pending_fn)(void *ring) noexcept nogil
ctypedef bint (*arm_fn)(void *ring) noexcept nogil     # True = still empty, safe to sleep
ctypedef void (*disarm_fn)(void *ring) noexcept nogil

cdef bint _host_pending(void *r) noexcept nogil:
    return vrh_avail_pending(<vrh_t *>r)
cdef bint _host_arm(void *r) noexcept nogil:
    return vrh_notify_enable(<vrh_t *>r)
cdef void _host_disarm(void *r) noexcept nogil:
    vrh_notify_disable(<vrh_t *>r)
cdef bint _drv_pending(void *r) noexcept nogil:
    return vrd_used_pending(<vrd_t *>r)
cdef bint _drv_arm(void *r) noexcept nogil:
    return vrd_enable_cb(<vrd_t *>r)
cdef bint _drv_arm_delayed(void *r) noexcept nogil:
    return vrd_enable_cb_delayed(<vrd_t *>r)
cdef void _drv_disarm(void *r) noexcept nogil:
    vrd_disable_cb(<vrd_t *>r)


cdef int _wait_ring(void *ring, pending_fn pending, arm_fn arm, disarm_fn disarm, int fd,
                    int peer_fd, int64_t deadline, int64_t spin_ns, object check,
                    double check_interval, _Mapped m, vr_wait_t *pol=NULL) except -1:
    """1 = ready, 0 = timeout (deadline in ns of vr_now_ns, <0 = none),
    2 = peer_fd readable (the peer exited).  Honours signals; `check()` (may
    raise) runs every check_interval seconds of sleep and after a wake-up that
    brought nothing.  ValueError if `m` is closed while we wait.  The caller
    has entered `m` (so the fds and the mapping outlive this call)."""
    cdef int64_t spin_end, slice_ns, rem
    cdef int rc
    cdef bint got = False
    cdef int64_t chunk = <int64_t>(check_interval * 1e9) if check is not None else -1
    cdef int64_t next_check = <int64_t>vr_now_ns() + chunk
    cdef vr_spin_t sp
    if pending(ring):
        return 1
    # Spin phase, in slices so that Ctrl-C is seen even with a long spin.
    # --- issue 10 hook (vr_wait.h): poll only while the peer runs on another
    # CPU, yield when it shares ours; `pol` adapts the budget (NULL = hints
    # unknown: plain adaptive-free spin then yield) ---
    if spin_ns > 0:
        vr_spin_begin(pol, &sp, spin_ns)
    while spin_ns > 0:
        slice_ns = spin_ns if spin_ns < 20_000_000 else 20_000_000
        spin_end = <int64_t>vr_now_ns() + slice_ns
        if deadline >= 0 and spin_end > deadline:
            spin_end = deadline
        with nogil:
            got = vr_spin_run(pol, &sp, <vr_pending_fn>pending, ring, spin_end)
        if got:
            vr_spin_end(pol, &sp, 1)
            return 1
        spin_ns -= slice_ns
        if spin_ns <= 0:
            vr_spin_end(pol, &sp, 0)
        m.check()
        if deadline >= 0 and _remaining(deadline) == 0:
            return 0
        PyErr_CheckSignals()
    vr_wait_sleeping(pol)
    # --- end of the issue 10 hook ---
    while True:
        m.check()
        # arm() (re)writes our suppression word every slice: see SLEEP_SLICE_NS
        if not arm(ring):
            disarm(ring)
            return 1
        rem = _remaining(deadline)
        if rem == 0:
            disarm(ring)
            return 1 if pending(ring) else 0
        if chunk > 0 and (rem < 0 or rem > chunk):
            rem = chunk
        if rem < 0 or rem > SLEEP_SLICE_NS:
            rem = SLEEP_SLICE_NS
        if fd < 0:
            # no eventfd (polling mode): yield the CPU and look again
            with nogil:
                sched_yield()
            rc = 0
        else:
            with nogil:
                rc = _wait_fds(fd, peer_fd, rem)
        disarm(ring)
        if rc == -EINTR:
            PyErr_CheckSignals()
            continue
        if rc < 0:
            raise OSError(-rc, "poll on eventfd failed")
        m.check()
        if pending(ring):
            return 1
        if rc == 2:
            return 2
        if check is not None and (fd >= 0 or <int64_t>vr_now_ns() >= next_check):
            if rc != 0 or <int64_t>vr_now_ns() >= next_check:
                next_check = <int64_t>vr_now_ns() + chunk
                check()


cdef int _signal_fd(int fd) noexcept nogil:
    cdef uint64_t one = 1
    if fd < 0:
        return 0
    if write(fd, &one, 8) != 8:
        return -errno
    return 1


cdef int64_t _deadline(object timeout) except? -2:
    if timeout is None:
        return -1
    t = float(timeout)
    if t < 0:
        t = 0.0          # as multiprocessing: a negative timeout means "don't wait"
    return <int64_t>vr_now_ns() + <int64_t>(t * 1e9)


cdef int64_t _remaining(int64_t deadline) noexcept nogil:
    cdef int64_t r
    if deadline < 0:
        return -1
    r = deadline - <int64_t>vr_now_ns()
    return r if r > 0 else 0


@cython.final            # direct (inlinable) calls of enter/leave on every call
@cython.no_gc_clear      # tp_clear must never drop view.obj without PyBuffer_Release
cdef class _Mapped:
    """The lifetime of one ring side's view of the segment: THE close protocol.

    Every object that touches the mapping (queue core, channel ends, ring
    sides) holds one.  Two counts keep the mapping alive:

    * ``calls``: calls in flight.  A blocking call enters before it first
      touches the segment and leaves when it returns; while it sleeps without
      the GIL the mapping, the eventfds it polls and this object stay valid.
    * ``pins``: objects that hand out raw pointers into the segment (message
      views, loans, held queue messages).

    close() marks the side closed (new calls raise ValueError), wakes the
    sleepers by writing the side's own eventfds (`wake_fds`; a sleeper that
    misses the write because another drained it first still sees the flag
    within one sleep slice, SLEEP_SLICE_NS: every sleep is sliced), and runs
    the finalizers -- which let the owner close its eventfds and unmap --
    only when the last call has left and the last pin is gone.  No extra
    descriptor per object.  Everything runs with the GIL held, so the counts need no
    atomics."""
    cdef Py_buffer view
    cdef bint has_view
    cdef uint8_t *base
    cdef Py_ssize_t size
    cdef object mv
    cdef public int pins
    cdef public int calls
    cdef public bint closing
    cdef list finalizers
    cdef str what

    def __cinit__(self, buffer, str what="ring"):
        PyObject_GetBuffer(buffer, &self.view, PyBUF_WRITABLE)
        self.has_view = True
        self.base = <uint8_t *>self.view.buf
        self.size = self.view.len
        self.mv = memoryview(buffer).cast("B")
        self.finalizers = []
        self.what = what

    def __dealloc__(self):
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False

    cdef inline int enter(self) except -1:
        """Start a call: ValueError if closed."""
        if self.closing:
            raise ValueError(f"{self.what} is closed")
        self.calls += 1
        return 0

    cdef inline void leave(self) noexcept:
        self.calls -= 1
        if self.closing and self.calls == 0 and self.pins == 0:
            self._finish()

    cdef int check(self) except -1:
        """Called by a sleeper after each wake-up: ValueError once closed."""
        if self.closing:
            raise ValueError(f"{self.what} was closed while waiting")
        return 0

    def close(self, finalizer=None, wake_fds=()):
        """Mark closed, wake the sleepers (write each of `wake_fds`, the
        eventfds they sleep on); `finalizer` (if any) runs once nothing uses
        the mapping any more (maybe right now)."""
        if finalizer is not None:
            self.finalizers.append(finalizer)
        if not self.closing:
            self.closing = True
            if self.calls:
                for fd in wake_fds:
                    _signal_fd(fd)
        if self.calls == 0 and self.pins == 0:
            self._finish()

    cdef release(self):
        self.close()

    cdef void _finish(self) noexcept:
        if self.mv is not None:
            try:
                self.mv.release()
            except BufferError:
                pass            # an Iov.views() memoryview is still alive; GC frees it
            self.mv = None
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False
        fins, self.finalizers = self.finalizers, []
        for f in fins:
            try:
                f()
            except BaseException:
                pass            # a finalizer closing fds must not stop the others

    cdef unpin(self):
        self.pins -= 1
        if self.pins == 0 and self.closing and self.calls == 0:
            self._finish()


cdef int _vrh_setup(vrh_t *h, _Mapped m, uint32_t num, uint64_t desc_off, uint64_t avail_off,
                    uint64_t used_off, uint64_t arena_off, uint64_t arena_size, uint64_t features,
                    uint64_t max_msg, uint32_t max_iov, bint trusted) except -1:
    """Validate the geometry and fill a host state over mapping m (one place
    for VringHost and ChannelReceiver).  Resumes at the current used idx."""
    check_ring_geometry(m.size, num, desc_off, avail_off, used_off, arena_off, arena_size)
    if max_iov < 1 or max_iov > 65536:
        raise ValueError("max_iov must be in 1..65536")
    memset(h, 0, sizeof(vrh_t))
    h.base = m.base
    h.num = num
    h.mask = num - 1
    h.desc = <vr_desc *>(m.base + desc_off)
    h.avail = <vr_avail *>(m.base + avail_off)
    h.used = <vr_used *>(m.base + used_off)
    h.used_event = vr_used_event(h.avail, num)
    h.avail_event = vr_avail_event(h.used, num)
    h.arena_lo = arena_off
    h.arena_hi = arena_off + arena_size
    h.event_idx = (features >> VR_F_EVENT_IDX) & 1
    h.indirect = (features >> VR_F_INDIRECT_DESC) & 1
    h.trusted = trusted
    h.max_msg = max_msg
    h.max_iov = max_iov
    h.inflight = <uint8_t *>PyMem_RawCalloc(num, 1)
    h.wcap = <uint32_t *>PyMem_RawCalloc(num, sizeof(uint32_t))
    h.fetched = <uint16_t *>PyMem_RawCalloc(num, sizeof(uint16_t))
    h.fetch_pos = <uint16_t *>PyMem_RawCalloc(num, sizeof(uint16_t))
    if not (h.inflight and h.wcap and h.fetched and h.fetch_pos):
        raise MemoryError()
    h.last_avail_idx = h.shadow_avail_idx = h.last_used_idx = vr_load_relaxed_u16(&h.used.idx)
    return 0


cdef void _vrh_free(vrh_t *h) noexcept:
    PyMem_RawFree(h.inflight)
    PyMem_RawFree(h.wcap)
    PyMem_RawFree(h.fetched)
    PyMem_RawFree(h.fetch_pos)
    h.inflight = NULL
    h.wcap = NULL
    h.fetched = NULL
    h.fetch_pos = NULL


cdef int _vrd_setup(vrd_t *d, _Mapped m, uint32_t num, uint64_t desc_off, uint64_t avail_off,
                    uint64_t used_off, uint64_t arena_off, uint64_t arena_size,
                    uint64_t features) except -1:
    """Validate the geometry and fill a driver state over mapping m (one place
    for VringDriver and ChannelSender): every descriptor free, starting at the
    current avail idx, callbacks disabled."""
    cdef uint32_t k
    cdef uint16_t base
    check_ring_geometry(m.size, num, desc_off, avail_off, used_off, arena_off, arena_size)
    memset(d, 0, sizeof(vrd_t))
    d.base = m.base
    d.num = num
    d.mask = num - 1
    d.desc = <vr_desc *>(m.base + desc_off)
    d.avail = <vr_avail *>(m.base + avail_off)
    d.used = <vr_used *>(m.base + used_off)
    d.used_event = vr_used_event(d.avail, num)
    d.avail_event = vr_avail_event(d.used, num)
    d.arena_lo = arena_off
    d.arena_hi = arena_off + arena_size
    d.event_idx = (features >> VR_F_EVENT_IDX) & 1
    d.link = <uint16_t *>PyMem_RawCalloc(num, sizeof(uint16_t))
    d.ndesc = <uint16_t *>PyMem_RawCalloc(num, sizeof(uint16_t))
    d.wcap = <uint32_t *>PyMem_RawCalloc(num, sizeof(uint32_t))
    d.token = <uint64_t *>PyMem_RawCalloc(num, sizeof(uint64_t))
    if not (d.link and d.ndesc and d.wcap and d.token):
        raise MemoryError()
    for k in range(num):
        d.link[k] = <uint16_t>(k + 1)
    d.num_free = num
    base = vr_load_relaxed_u16(&d.avail.idx)
    d.avail_idx = d.published_idx = d.kicked_idx = base
    d.last_used_idx = d.shadow_used_idx = base
    vrd_disable_cb(d)
    return 0


cdef void _vrd_free(vrd_t *d) noexcept:
    PyMem_RawFree(d.link)
    PyMem_RawFree(d.ndesc)
    PyMem_RawFree(d.wcap)
    PyMem_RawFree(d.token)
    d.link = NULL
    d.ndesc = NULL
    d.wcap = NULL
    d.token = NULL


cdef class Iov:
    """A chain's readable (riov) or writable (wiov) segments, with a cursor.

    Filled by VringHost.getdesc and reusable across calls (vringh_iov).  pull /
    push copy across segment boundaries; views() gives zero-copy memoryviews of
    shared memory (read-only for a readable iov)."""
    cdef vr_iov iov
    cdef _Mapped mapped       # keeps the segment mapped while the iov exists
    cdef bint writable        # set by getdesc: True for the wiov

    def __dealloc__(self):
        if self.iov.seg != NULL:
            PyMem_RawFree(self.iov.seg)
            self.iov.seg = NULL

    cdef _check(self):
        if self.mapped is None or self.mapped.closing or not self.mapped.has_view:
            raise ValueError("iov is not bound to an open ring")

    @property
    def nsegs(self):
        """Number of segments."""
        return self.iov.used

    @property
    def total(self):
        """Total bytes of all segments."""
        return self.iov.total

    @property
    def remaining(self):
        """Bytes not yet pulled/pushed."""
        cdef uint64_t r = 0
        cdef uint32_t k
        for k in range(self.iov.i, self.iov.used):
            r += self.iov.seg[k].len
        return r - self.iov.consumed

    def __len__(self):
        return self.remaining

    @property
    def segments(self):
        """[(segment offset, length), ...] of the chain, in order."""
        return [(self.iov.seg[k].off, self.iov.seg[k].len) for k in range(self.iov.used)]

    def reset(self):
        """Rewind the cursor to the first byte (vringh_iov_reset)."""
        self.iov.i = 0
        self.iov.consumed = 0

    def advance(self, uint64_t n):
        """Skip up to n bytes without copying; returns bytes skipped."""
        return vrh_iov_pull(&self.iov, NULL, NULL, n)

    def pull(self, Py_ssize_t n=-1):
        """Copy up to n (default: all remaining) bytes out; returns bytes."""
        self._check()
        if self.writable:
            raise ValueError("pull from a writable iov")
        cdef uint64_t want = self.remaining if n < 0 else min(<uint64_t>n, self.remaining)
        out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>want)
        cdef uint8_t *dst = <uint8_t *>PyBytes_AS_STRING(out)
        cdef _Mapped m = self.mapped
        m.enter()
        try:
            with nogil:
                vrh_iov_pull(&self.iov, m.base, dst, want)
        finally:
            m.leave()
        return out

    def pull_into(self, buffer):
        """Copy remaining bytes into a writable buffer; returns bytes copied."""
        self._check()
        if self.writable:
            raise ValueError("pull from a writable iov")
        cdef Py_buffer b
        cdef uint64_t done
        cdef _Mapped m = self.mapped
        PyObject_GetBuffer(buffer, &b, PyBUF_WRITABLE)
        m.enter()
        try:
            with nogil:
                done = vrh_iov_pull(&self.iov, m.base, <uint8_t *>b.buf, <uint64_t>b.len)
        finally:
            m.leave()
            PyBuffer_Release(&b)
        return done

    def push(self, data):
        """Copy bytes into the writable segments; returns bytes copied (may be
        fewer than len(data) when the space runs out)."""
        self._check()
        if not self.writable:
            raise ValueError("push into a readable iov")
        cdef Py_buffer b
        cdef uint64_t done
        cdef _Mapped m = self.mapped
        PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
        m.enter()
        try:
            with nogil:
                done = vrh_iov_push(&self.iov, m.base, <const uint8_t *>b.buf, <uint64_t>b.len)
        finally:
            m.leave()
            PyBuffer_Release(&b)
        return done

    def views(self):
        """Zero-copy memoryviews of each segment (read-only for a readable iov).
        They stay valid while the segment is mapped; their contents belong to
        the driver again once the chain is completed."""
        self._check()
        mv = self.mapped.mv
        out = []
        for k in range(self.iov.used):
            v = mv[self.iov.seg[k].off:self.iov.seg[k].off + self.iov.seg[k].len]
            out.append(v if self.writable else v.toreadonly())
        return out


cdef class VringHost:
    """The device (consumer) side of one split ring: vringh over shared memory.

    Construct over a writable buffer (normally the segment's mmap) with explicit
    offsets of the descriptor table, avail ring, used ring and arena.  Every
    descriptor address must fall inside the arena unless ``trusted=True``
    (vringh's _kern form, for a producer in the same trust domain)."""
    cdef vrh_t h
    cdef _Mapped mapped
    cdef object __weakref__
    cdef public int kick_fd       # eventfd the driver writes to kick us (-1 = poll only)
    cdef public int call_fd       # eventfd we write to call the driver (-1 = none)
    cdef public int64_t spin_ns   # default spin before sleeping in wait()
    cdef Iov _riov, _wiov         # scratch iovs for the batch API
    cdef vr_used_elem *_batch     # [num] scratch completions for the batch API

    def __cinit__(self, buffer, uint32_t num, uint64_t desc_off, uint64_t avail_off,
                  uint64_t used_off, uint64_t arena_off, uint64_t arena_size, *,
                  uint64_t features=0, uint64_t max_msg=0xffffffff,
                  uint32_t max_iov=DEFAULT_MAX_IOV, bint trusted=False,
                  int kick_fd=-1, int call_fd=-1, spin_ns=DEFAULT_SPIN_NS):
        self.mapped = _Mapped(buffer)
        _vrh_setup(&self.h, self.mapped, num, desc_off, avail_off, used_off, arena_off,
                   arena_size, features, max_msg, max_iov, trusted)
        self._batch = <vr_used_elem *>PyMem_RawCalloc(num, sizeof(vr_used_elem))
        if self._batch == NULL:
            raise MemoryError()
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.spin_ns = spin_ns
        self._riov = Iov()
        self._wiov = Iov()
        self.set_base(vr_load_relaxed_u16(&self.h.used.idx))

    def __dealloc__(self):
        _vrh_free(&self.h)
        PyMem_RawFree(self._batch)

    def set_base(self, uint16_t idx):
        """Resume at index `idx` (vhost SET_VRING_BASE): next avail entry, used
        idx.  Forgets in-flight chains and clears the broken state."""
        self._check_open()
        self.h.last_avail_idx = idx
        self.h.shadow_avail_idx = idx
        self.h.last_used_idx = idx
        self.h.completed = 0
        self.h.broken = False
        self.h.n_inflight = 0
        memset(self.h.inflight, 0, self.h.num)
        vr_store_release_u16(&self.h.used.idx, idx)

    reset = set_base

    def close(self):
        """Close this side (idempotent): later calls raise ValueError, a call
        blocked in another thread wakes up and raises ValueError; the mapping
        is let go when the last call in flight has returned."""
        self.mapped.close(wake_fds=(self.kick_fd,))

    cdef inline _check_open(self):
        if self.mapped.closing:
            raise ValueError("ring host is closed")

    # --- state ---------------------------------------------------------------
    @property
    def num(self): return self.h.num
    @property
    def event_idx(self): return bool(self.h.event_idx)
    @property
    def indirect(self): return bool(self.h.indirect)
    @property
    def trusted(self): return bool(self.h.trusted)
    @property
    def broken(self): return bool(self.h.broken)
    @property
    def last_avail_idx(self): return self.h.last_avail_idx
    @property
    def last_used_idx(self): return self.h.last_used_idx
    @property
    def completed(self): return self.h.completed
    @property
    def in_flight(self): return self.h.n_inflight
    @property
    def max_msg(self): return self.h.max_msg
    @property
    def max_iov(self): return self.h.max_iov

    # --- the vringh verbs -----------------------------------------------------
    def getdesc(self, Iov riov=None, Iov wiov=None):
        """vringh_getdesc: the next chain's readable segments into riov and
        writable ones into wiov.  Returns its head, or None if the ring is empty.

        Raises InvalidRing (nothing consumed) or InvalidDescriptor (consumed:
        ``exc.head`` is in flight; complete it with length 0 or abandon it).
        Passing None for a direction means such descriptors are an error (EPROTO)."""
        self._check_open()
        cdef uint16_t head
        cdef int rc
        if riov is None and wiov is None:
            raise ValueError("getdesc needs riov, wiov or both")
        if riov is wiov:
            raise ValueError("riov and wiov must be different Iov objects")
        # Bind the iovs to this ring and empty them first: whatever happens
        # below, they never keep segments validated against another mapping.
        if riov is not None:
            vrh_iov_rewind(&riov.iov)
            riov.mapped = self.mapped
            riov.writable = False
        if wiov is not None:
            vrh_iov_rewind(&wiov.iov)
            wiov.mapped = self.mapped
            wiov.writable = True
        rc = vrh_getdesc(&self.h, &riov.iov if riov is not None else NULL,
                         &wiov.iov if wiov is not None else NULL, &head)
        if rc == 1:
            return head
        if rc == 0:
            return None
        raise _host_error(&self.h, rc, head)

    def abandon(self, uint32_t n=1):
        """vringh_abandon: put back the last n fetched chains (to be returned by
        getdesc again).  ValueError if fewer than n recent fetches are in flight."""
        if vrh_abandon(&self.h, n) < 0:
            raise ValueError(f"cannot abandon {n}: only the still-in-flight most recent fetches can be")

    def complete(self, uint32_t head, uint32_t length=0):
        """vringh_complete: return chain `head` to the driver with `length`
        bytes written.  ValueError if head is not in flight (never fetched,
        completed twice) or length exceeds the chain's writable bytes."""
        self._check_open()
        cdef int rc = vrh_complete(&self.h, head, length)
        if rc == -EINVAL:
            raise ValueError(f"head {head} is not in flight")
        if rc == -EMSGSIZE:
            raise ValueError(f"length {length} above head {head}'s writable bytes")

    def complete_multi(self, completions):
        """vringh_complete_multi: complete [(head, length), ...] with one used
        index update (wraps the end of the used ring).  All-or-nothing."""
        self._check_open()
        items = list(completions)
        cdef uint32_t n = len(items)
        cdef uint32_t k
        if n > self.h.num:
            raise ValueError(f"{n} completions but the ring has {self.h.num} entries")
        for k in range(n):
            self._batch[k].id = items[k][0]
            self._batch[k].len = items[k][1]
        rc = vrh_complete_multi(&self.h, self._batch, n)
        if rc == -EINVAL:
            raise ValueError("a head is not in flight or listed twice")
        if rc == -EMSGSIZE:
            raise ValueError("a length exceeds its chain's writable bytes")

    def need_notify(self):
        """vringh_need_notify: True if the driver wants to hear about the
        completions since the last call."""
        self._check_open()
        return vrh_need_notify(&self.h) == 1

    def notify_enable(self):
        """vringh_notify_enable: ask to be kicked.  True = still empty (safe to
        sleep), False = buffers arrived meanwhile."""
        self._check_open()
        return vrh_notify_enable(&self.h)

    def notify_disable(self):
        """vringh_notify_disable: we are polling (a no-op with EVENT_IDX)."""
        self._check_open()
        vrh_notify_disable(&self.h)

    def pending(self):
        """True if the driver has published chains we have not fetched."""
        self._check_open()
        return vrh_avail_pending(&self.h)

    # --- notification ---------------------------------------------------------
    def notify(self):
        """need_notify(), and if so signal call_fd.  Returns True if signalled."""
        self._check_open()
        if vrh_need_notify(&self.h) == 1:
            _signal_fd(self.call_fd)
            return True
        return False

    def wait(self, timeout=None, spin=None, check=None, double check_interval=0.1):
        """Block until the driver publishes a chain.  True = something to fetch,
        False = timeout (seconds; None = forever).

        Spins for `spin` seconds (default spin_ns) with the GIL released, then
        re-enables notifications, re-checks (no lost wake-up) and sleeps on
        kick_fd.  `check()` is called every check_interval seconds while asleep
        and may raise (e.g. when the peer died).  Signals are honoured."""
        self._check_open()
        cdef int64_t spin_ns = self.spin_ns if spin is None else <int64_t>(float(spin) * 1e9)
        cdef int64_t deadline = _deadline(timeout)
        self.mapped.enter()
        try:
            return _wait_ring(&self.h, _host_pending, _host_arm, _host_disarm, self.kick_fd, -1,
                              deadline, spin_ns, check, check_interval, self.mapped) == 1
        finally:
            self.mapped.leave()

    # --- batch API (no GIL) ---------------------------------------------------
    def pull_many(self, dst, lengths, uint32_t max_count=0xffffffff, bint notify=True):
        """Fetch up to max_count readable chains, copy each one's bytes back to
        back into `dst`, their sizes into `lengths` (a writable uint32 buffer, e.g.
        array('I') or numpy uint32), complete them all with one used-index update,
        then need_notify() and signal call_fd if asked.  Runs without the GIL.
        Returns the number of chains.  Stops early when dst cannot hold the next
        chain (it stays in the ring).  A bad chain raises InvalidDescriptor after
        the good ones before it were completed; its head stays in flight."""
        self._check_open()
        cdef Py_buffer db, lb
        cdef uint32_t n = 0, cap, nmax, done = 0
        cdef uint64_t pos = 0, room
        cdef uint16_t head
        cdef int rc = 0, rc2 = 0
        cdef vr_iov *riov = &self._riov.iov
        self.mapped.enter()
        try:
            PyObject_GetBuffer(dst, &db, PyBUF_WRITABLE)
        except BaseException:
            self.mapped.leave()
            raise
        try:
            PyObject_GetBuffer(lengths, &lb, PyBUF_WRITABLE)
        except BaseException:
            PyBuffer_Release(&db)
            self.mapped.leave()
            raise
        try:
            if lb.itemsize != 4 and lb.itemsize != 1:
                raise ValueError("lengths must be a uint32 buffer")
            cap = <uint32_t>(lb.len // 4)
            nmax = max_count
            if nmax > cap:
                nmax = cap
            if nmax > self.h.num:
                nmax = self.h.num
            with nogil:
                while n < nmax:
                    rc = vrh_getdesc(&self.h, riov, NULL, &head)
                    if rc <= 0:
                        break
                    room = <uint64_t>db.len - pos
                    if riov.total > room:
                        vrh_abandon(&self.h, 1)
                        rc = 0
                        break
                    vrh_iov_pull(riov, self.h.base, <uint8_t *>db.buf + pos, riov.total)
                    (<uint32_t *>lb.buf)[n] = <uint32_t>riov.total
                    pos += riov.total
                    self._batch[n - done].id = head
                    self._batch[n - done].len = 0
                    n += 1
                    if n - done == 64:
                        # Complete in chunks of 64 so the driver can reuse
                        # buffers while we are still copying (both CPUs busy).
                        vrh_complete_multi(&self.h, self._batch, n - done)
                        done = n
                        if notify and vrh_need_notify(&self.h) == 1:
                            _signal_fd(self.call_fd)
                if n > done:
                    vrh_complete_multi(&self.h, self._batch, n - done)
                    done = n
                    if notify and vrh_need_notify(&self.h) == 1:
                        _signal_fd(self.call_fd)
        finally:
            PyBuffer_Release(&db)
            PyBuffer_Release(&lb)
            self.mapped.leave()
        if rc < 0:
            raise _host_error(&self.h, rc, head)
        return n


cdef class VringDriver:
    """The driver (producer) side of one split ring: virtio_ring.c's split
    virtqueue over shared memory.

    Buffers are (segment offset, length) pairs inside the arena.  Optional
    helpers: an indirect pool (``indirect_pool=(offset, entries)``: one table of
    `entries` descriptors per head, used when INDIRECT_DESC is negotiated and a
    chain has more than one segment) and slot mode (``slot_size``: head h owns
    arena bytes [arena_off + h*slot_size, +slot_size), for single-buffer chains)."""
    cdef vrd_t d
    cdef _Mapped mapped
    cdef object __weakref__
    cdef list _tokens             # Python tokens per head
    cdef public int kick_fd       # eventfd we write to kick the device (-1 = none)
    cdef public int call_fd       # eventfd the device writes to call us (-1 = poll only)
    cdef public int64_t spin_ns
    cdef vr_seg *_segs            # scratch segments for add()
    cdef uint32_t _segs_cap
    cdef uint16_t *_heads         # [num] scratch heads for reclaim()

    def __cinit__(self, buffer, uint32_t num, uint64_t desc_off, uint64_t avail_off,
                  uint64_t used_off, uint64_t arena_off, uint64_t arena_size, *,
                  uint64_t features=0, indirect_pool=None, uint64_t slot_size=0,
                  int kick_fd=-1, int call_fd=-1, spin_ns=DEFAULT_SPIN_NS):
        self.mapped = _Mapped(buffer)
        _vrd_setup(&self.d, self.mapped, num, desc_off, avail_off, used_off, arena_off,
                   arena_size, features)
        if slot_size and slot_size * num > arena_size:
            raise ValueError(f"{num} slots of {slot_size} bytes do not fit in an arena of {arena_size}")
        self.d.slot_size = slot_size
        if indirect_pool is not None and (features >> VR_F_INDIRECT_DESC) & 1:
            ind_off, ind_entries = indirect_pool
            if ind_entries < 2 or ind_entries > num or ind_off % 16:
                raise ValueError("indirect pool needs 2..num entries per table, 16-aligned")
            if ind_off < arena_off or ind_off + <uint64_t>ind_entries * 16 * num > arena_off + arena_size:
                raise ValueError("indirect pool must lie inside the arena")
            self.d.ind_off = ind_off
            self.d.ind_entries = ind_entries
            self.d.indirect = True
        self._heads = <uint16_t *>PyMem_RawCalloc(num, sizeof(uint16_t))
        self._segs_cap = 64
        self._segs = <vr_seg *>PyMem_RawMalloc(self._segs_cap * sizeof(vr_seg))
        if not (self._segs and self._heads):
            raise MemoryError()
        self._tokens = [None] * num
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.spin_ns = spin_ns
        self.set_base(vr_load_relaxed_u16(&self.d.avail.idx))

    def __dealloc__(self):
        _vrd_free(&self.d)
        PyMem_RawFree(self._segs)
        PyMem_RawFree(self._heads)

    def set_base(self, uint16_t idx):
        """Start (or restart) at index `idx` with every descriptor free and
        callbacks disabled.  Both sides must use the same base."""
        self._check_open()
        cdef uint32_t k
        for k in range(self.d.num):
            self.d.link[k] = <uint16_t>(k + 1)
            self.d.ndesc[k] = 0
            self._tokens[k] = None
        self.d.free_head = 0
        self.d.num_free = self.d.num
        self.d.avail_idx = idx
        self.d.published_idx = idx
        self.d.kicked_idx = idx
        self.d.num_added = 0
        self.d.last_used_idx = idx
        self.d.shadow_used_idx = idx
        self.d.broken = False
        vr_store_release_u16(&self.d.avail.idx, idx)
        vrd_disable_cb(&self.d)

    reset = set_base

    def close(self):
        """Close this side (idempotent; same protocol as VringHost.close)."""
        self.mapped.close(wake_fds=(self.call_fd,))

    cdef inline _check_open(self):
        if self.mapped.closing:
            raise ValueError("ring driver is closed")

    @property
    def num(self): return self.d.num
    @property
    def num_free(self): return self.d.num_free
    @property
    def in_flight(self): return <uint16_t>(self.d.avail_idx - self.d.last_used_idx)
    @property
    def broken(self): return bool(self.d.broken)
    @property
    def event_idx(self): return bool(self.d.event_idx)
    @property
    def indirect(self): return bool(self.d.indirect)
    @property
    def avail_idx(self): return self.d.avail_idx
    @property
    def last_used_idx(self): return self.d.last_used_idx
    @property
    def slot_size(self): return self.d.slot_size
    @property
    def indirect_pool_offset(self):
        """Start of the indirect pool in the segment (None without one)."""
        return self.d.ind_off if self.d.indirect else None

    def slot_offset(self, uint32_t head):
        """Segment offset of head's slot (slot mode)."""
        if not self.d.slot_size or head >= self.d.num:
            raise ValueError("no such slot")
        return self.d.arena_lo + <uint64_t>head * self.d.slot_size

    cdef _raise_add(self, int rc):
        if self.d.broken:
            raise InvalidRing(EINVAL, _DRIVER_REASONS.get(self.d.err_reason, "ring broken")
                              .format(a=self.d.err_a, b=self.d.err_b), None)
        raise ValueError("buffer outside the arena, empty chain, or too large")

    cdef inline _after_add(self, int head, object token):
        self._tokens[head] = token
        if self.d.num_added >= 0xffff:
            self.kick()

    def add(self, readable=(), writable=(), token=None):
        """virtqueue_add_sgs: expose readable then writable (offset, length)
        buffers as one chain.  Returns the head, or None if the ring has too few
        free descriptors.  Visible to the device at once; call kick() after."""
        self._check_open()
        cdef uint32_t n_out = len(readable), n_in = len(writable), k = 0
        cdef uint32_t total = n_out + n_in
        if total > self._segs_cap:
            if total > 65536:
                raise ValueError("too many segments")
            PyMem_RawFree(self._segs)
            self._segs = <vr_seg *>PyMem_RawMalloc(total * sizeof(vr_seg))
            if self._segs == NULL:
                self._segs_cap = 0
                raise MemoryError()
            self._segs_cap = total
        for off, ln in readable:
            self._segs[k].off = off
            self._segs[k].len = ln
            k += 1
        for off, ln in writable:
            self._segs[k].off = off
            self._segs[k].len = ln
            k += 1
        cdef int rc = vrd_add(&self.d, self._segs, n_out, n_in, 0)
        if rc == -ENOSPC:
            return None
        if rc < 0:
            self._raise_add(rc)
        vrd_publish(&self.d)
        self._after_add(rc, token)
        return rc

    def add_buf(self, uint64_t offset, uint32_t length, bint writable=False, token=None):
        """One-buffer chain (the fast path of add)."""
        self._check_open()
        cdef vr_seg s
        s.off = offset
        s.len = length
        cdef int rc = vrd_add(&self.d, &s, 0 if writable else 1, 1 if writable else 0, 0)
        if rc == -ENOSPC:
            return None
        if rc < 0:
            self._raise_add(rc)
        vrd_publish(&self.d)
        self._after_add(rc, token)
        return rc

    def add_slot(self, data, token=None):
        """Slot mode: copy `data` into a free head's slot and expose it readable.
        Returns the head or None if full."""
        self._check_open()
        cdef Py_buffer b
        cdef int rc
        PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
        try:
            if <uint64_t>b.len > self.d.slot_size:
                raise ValueError(f"{b.len} bytes do not fit a slot of {self.d.slot_size}")
            rc = vrd_add_slot(&self.d, <const uint8_t *>b.buf, <uint32_t>b.len, False, 0)
        finally:
            PyBuffer_Release(&b)
        if rc == -ENOSPC:
            return None
        if rc < 0:
            self._raise_add(rc)
        vrd_publish(&self.d)
        self._after_add(rc, token)
        return rc

    def add_slot_writable(self, uint32_t length, token=None):
        """Slot mode: expose `length` bytes of a free head's slot as writable."""
        self._check_open()
        cdef int rc = vrd_add_slot(&self.d, NULL, length, True, 0)
        if rc == -ENOSPC:
            return None
        if rc < 0:
            self._raise_add(rc)
        vrd_publish(&self.d)
        self._after_add(rc, token)
        return rc

    def kick_prepare(self):
        """virtqueue_kick_prepare: True if the device asked to be kicked."""
        self._check_open()
        return vrd_kick_prepare(&self.d)

    def kick(self):
        """kick_prepare() and, if needed, signal kick_fd.  True if signalled."""
        self._check_open()
        if vrd_kick_prepare(&self.d):
            _signal_fd(self.kick_fd)
            return True
        return False

    cdef _raise_used(self):
        raise InvalidRing(EINVAL, _DRIVER_REASONS.get(self.d.err_reason, "ring broken")
                          .format(a=self.d.err_a, b=self.d.err_b), None)

    def get_buf(self):
        """virtqueue_get_buf: (token, length written) of the next used chain, or
        None.  Raises InvalidRing if the device broke the used ring."""
        self._check_open()
        cdef uint16_t head
        cdef uint32_t ln
        cdef uint64_t tok
        cdef int rc = vrd_get_buf(&self.d, &head, &ln, &tok)
        if rc == 0:
            return None
        if rc < 0:
            self._raise_used()
        token = self._tokens[head]
        self._tokens[head] = None
        return (token, ln)

    def get_buf_head(self):
        """Like get_buf but returns (head, length); the slot stays readable
        until the head is reused by a later add."""
        self._check_open()
        cdef uint16_t head
        cdef uint32_t ln
        cdef uint64_t tok
        cdef int rc = vrd_get_buf(&self.d, &head, &ln, &tok)
        if rc == 0:
            return None
        if rc < 0:
            self._raise_used()
        self._tokens[head] = None
        return (head, ln)

    def disable_cb(self):
        """virtqueue_disable_cb: we poll; the device need not call."""
        self._check_open()
        vrd_disable_cb(&self.d)

    def enable_cb_prepare(self):
        self._check_open()
        return vrd_enable_cb_prepare(&self.d)

    def poll(self, uint16_t last):
        """virtqueue_poll(last): True if used entries arrived since `last`."""
        self._check_open()
        return vrd_poll(&self.d, last)

    def enable_cb(self):
        """virtqueue_enable_cb: True = nothing pending (safe to sleep)."""
        self._check_open()
        return vrd_enable_cb(&self.d)

    def enable_cb_delayed(self):
        """virtqueue_enable_cb_delayed: True = safe to sleep until ~3/4 of the
        outstanding buffers are used."""
        self._check_open()
        return vrd_enable_cb_delayed(&self.d)

    def pending(self):
        """True if the device returned chains we have not reclaimed."""
        self._check_open()
        return vrd_used_pending(&self.d)

    def detach_unused(self):
        """virtqueue_detach_unused_buf for all: tokens of chains never used,
        after the device has stopped.  Frees their descriptors."""
        self._check_open()
        out = []
        cdef uint32_t k
        for k in range(self.d.num):
            if self.d.ndesc[k]:
                out.append(self._tokens[k])
        self.set_base(self.d.avail_idx)
        return out

    def wait_used(self, timeout=None, spin=None, check=None, double check_interval=0.1,
                  bint delayed=False):
        """Block until the device returns a chain.  True = get_buf has something,
        False = timeout.  Same spin / sleep / check contract as VringHost.wait;
        delayed=True asks for a call only after ~3/4 of the outstanding chains
        are used (enable_cb_delayed)."""
        self._check_open()
        cdef int64_t spin_ns = self.spin_ns if spin is None else <int64_t>(float(spin) * 1e9)
        cdef int64_t deadline = _deadline(timeout)
        self.mapped.enter()
        try:
            return _wait_ring(&self.d, _drv_pending, _drv_arm_delayed if delayed else _drv_arm,
                              _drv_disarm, self.call_fd, -1, deadline, spin_ns, check,
                              check_interval, self.mapped) == 1
        finally:
            self.mapped.leave()

    # --- batch API (no GIL) ---------------------------------------------------
    def add_many_slots(self, src, lengths, uint32_t count, bint kick=True):
        """Slot mode: add up to `count` readable messages whose bytes lie back to
        back in `src` with sizes in `lengths` (uint32 buffer).  One avail index
        update and at most one kick for the batch; runs without the GIL.
        Returns how many were added (fewer when the ring fills)."""
        self._check_open()
        cdef Py_buffer sb, lb
        cdef uint32_t n = 0, cap, ln
        cdef uint64_t pos = 0
        cdef int rc
        self.mapped.enter()
        try:
            PyObject_GetBuffer(src, &sb, PyBUF_SIMPLE)
        except BaseException:
            self.mapped.leave()
            raise
        try:
            PyObject_GetBuffer(lengths, &lb, PyBUF_SIMPLE)
        except BaseException:
            PyBuffer_Release(&sb)
            self.mapped.leave()
            raise
        try:
            if not self.d.slot_size:
                raise ValueError("add_many_slots needs slot mode (slot_size)")
            cap = <uint32_t>(lb.len // 4)
            if count > cap:
                count = cap
            with nogil:
                while n < count:
                    ln = (<const uint32_t *>lb.buf)[n]
                    if ln > self.d.slot_size or pos + ln > <uint64_t>sb.len:
                        break
                    rc = vrd_add_slot(&self.d, <const uint8_t *>sb.buf + pos, ln, False, 0)
                    if rc < 0:
                        break
                    pos += ln
                    n += 1
                    if (n & 63) == 0:
                        # Publish in chunks of 64 so the device starts while
                        # we are still copying (both CPUs busy).
                        vrd_publish(&self.d)
                        if kick and vrd_kick_prepare(&self.d):
                            _signal_fd(self.kick_fd)
                    if self.d.num_added >= 0xffff:
                        if vrd_kick_prepare(&self.d):
                            _signal_fd(self.kick_fd)
                vrd_publish(&self.d)
                if kick and n and vrd_kick_prepare(&self.d):
                    _signal_fd(self.kick_fd)
        finally:
            PyBuffer_Release(&sb)
            PyBuffer_Release(&lb)
            self.mapped.leave()
        if n < count and self.d.broken:
            self._raise_used()
        return n

    def reclaim(self, uint32_t max_count=0xffffffff):
        """Reclaim up to max_count used chains, dropping their tokens (batch,
        no GIL).  Returns the count."""
        self._check_open()
        cdef uint32_t n = 0
        cdef uint16_t head
        cdef uint32_t ln
        cdef uint64_t tok
        cdef int rc = 0
        cdef uint32_t k
        self.mapped.enter()
        try:
            with nogil:
                while n < max_count and n < self.d.num:
                    rc = vrd_get_buf(&self.d, &head, &ln, &tok)
                    if rc <= 0:
                        break
                    self._heads[n] = head
                    n += 1
        finally:
            self.mapped.leave()
        for k in range(n):
            self._tokens[self._heads[k]] = None
        if rc < 0:
            self._raise_used()
        return n


# --- shared-memory word access for the segment header (liveness, status) -----

cdef uint8_t *_word(object mapped_obj, Py_ssize_t off, Py_ssize_t width) except NULL:
    cdef _Mapped m = <_Mapped>mapped_obj
    if not m.has_view or off < 0 or off % width or off + width > m.size:
        raise ValueError(f"bad header word offset {off}")
    return m.base + off


cdef class SharedWords:
    """Atomic access to aligned u32/u64 words of a shared buffer (the segment
    header's status and liveness fields): acquire loads, release stores, CAS."""
    cdef _Mapped mapped

    def __cinit__(self, buffer):
        self.mapped = _Mapped(buffer)

    def close(self):
        self.mapped.release()

    def load32(self, Py_ssize_t off):
        return vr_load_acquire_u32(<uint32_t *>_word(self.mapped, off, 4))

    def store32(self, Py_ssize_t off, uint32_t v):
        vr_store_release_u32(<uint32_t *>_word(self.mapped, off, 4), v)

    def cas32(self, Py_ssize_t off, uint32_t expected, uint32_t desired):
        return bool(vr_cas_u32(<uint32_t *>_word(self.mapped, off, 4), expected, desired))

    def add32(self, Py_ssize_t off, uint32_t v):
        return vr_fetch_add_u32(<uint32_t *>_word(self.mapped, off, 4), v)

    def load64(self, Py_ssize_t off):
        return vr_load_acquire_u64(<uint64_t *>_word(self.mapped, off, 8))

    def store64(self, Py_ssize_t off, uint64_t v):
        vr_store_release_u64(<uint64_t *>_word(self.mapped, off, 8), v)

    def add64(self, Py_ssize_t off, uint64_t v):
        return vr_fetch_add_u64(<uint64_t *>_word(self.mapped, off, 8), v)


include "_channel.pxi"
include "_queue.pxi"


def need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old):
    """vring_need_event from <linux/virtio_ring.h>."""
    return bool(vr_need_event(event_idx, new_idx, old))


def abi_sizes():
    """sizeof of the C structs, for the layout test."""
    return {"vring_desc": vr_abi_sizeof_desc(), "vring_used_elem": vr_abi_sizeof_used_elem()}
