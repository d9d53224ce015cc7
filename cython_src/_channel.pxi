# _channel.pxi - the hot path of the zero-copy Channel (one producer, one
# consumer), over the same vrd_t / vrh_t verbs as VringDriver / VringHost.
# Included by _ring.pyx; the public API is vringipc/channel.py.
#
# Producer: every message is one contiguous arena allocation and one
# descriptor.  Allocation is a byte ring over the arena window (FIFO order)
# that tolerates out-of-order release: a message's bytes return to the pool
# once it and every older allocation are done.  An allocation still live when
# younger ones are done (a kept MessageView, a loan not yet committed) does
# not hold the ring up: when room runs short the tail skips over it and its
# extent goes to a small private table that placement steps around, so it
# pins only its own bytes (no head-of-line stall).  Later traffic still never
# overwrites it.
# Consumer: recv copies out and completes at once; recv_view hands out a
# MessageView over shared memory and completes when the view is released and
# no buffer export of it remains.
#
# Memory follows the data: the window is committed in 1 MiB chunks by the
# producer just before it first writes into one (MADV_POPULATE_WRITE, so "no
# memory" is an errno here, a MemoryError for the caller, instead of SIGBUS
# or the OOM killer at first touch), and chunks past the first RETAIN ones
# are given back (MADV_REMOVE) when nothing is in flight over them.  The
# record of reserved chunks is the producer's own (its allocator state is
# private anyway): a producer that takes over starts with every chunk
# unknown, re-reserves what it uses (harmless) and gives back the whole
# window tail at its first drain.  Placement prefers low offsets: an empty
# channel restarts at the window start and one with little in flight wraps
# early, so a steady stream stays in the retained chunks whatever the
# capacity.
#
# Lifetime (the _Mapped protocol of _ring.pyx): close() only marks an end
# closed and wakes its sleepers; every method that sleeps or copies without
# the GIL holds a call (enter/leave), and every Loan / MessageView holds a pin,
# so the mapping and the eventfds outlive them (Channel.close passes the
# finalizer that closes them).  A Loan or MessageView inherited by a forked
# child belongs to the parent: in the child it never writes shared memory.

from cpython.buffer cimport PyBuffer_FillInfo

cdef enum:
    ALLOC_ALIGN = 64          # cache line; also keeps NumPy buffers aligned
    CONSUMER_STATE_HDR = 64   # consumer state area: u32 fetch record, u32 journal, pad; u8 taken[num]
    F_LIVE = 0                # fifo entry states
    F_DONE = 1                # used by the consumer (head already back on the free list)
    F_CANCELLED = 2           # loan cancelled: head freed when the entry is popped
    CH_CHUNK_SHIFT = 20       # arena committed in 1 MiB chunks
    CH_RETAIN_CHUNKS = 4      # kept when the channel drains


cdef extern from "<sys/mman.h>" nogil:
    int _ch_madvise "madvise"(void *addr, size_t length, int advice)
    enum:
        CH_MADV_REMOVE "MADV_REMOVE"
cdef extern from *:
    """
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    """
    enum:
        CH_MADV_POPULATE_WRITE "MADV_POPULATE_WRITE"


cdef int _ch_populate(uint8_t *addr, uint64_t n) noexcept nogil:
    """Commit [addr, addr + n) (addr page-aligned): 0 or -errno."""
    while _ch_madvise(addr, n, CH_MADV_POPULATE_WRITE) != 0:
        if errno == EINTR or errno == EAGAIN:
            continue
        if errno == EINVAL:             # a kernel before 5.14: pages come on
            return 0                    # first touch (unreserved)
        return -errno
    return 0


def _commit_range(buffer, uint64_t off, uint64_t n):
    """Commit bytes [off, off + n) of a mapping now (page-wise); MemoryError
    if there is no memory for them.  Channel uses it for the consumer state
    area, which lies past the arena window that is committed as it fills."""
    cdef Py_buffer b
    cdef uint64_t start = off & ~(<uint64_t>4095)
    cdef int rc
    PyObject_GetBuffer(buffer, &b, PyBUF_SIMPLE)
    try:
        if off + n > <uint64_t>b.len or n == 0:
            raise ValueError("range outside the mapping")
        rc = _ch_populate(<uint8_t *>b.buf + start, off + n - start)
    finally:
        PyBuffer_Release(&b)
    if rc < 0:
        raise MemoryError(f"cannot commit {n} bytes of shared memory "
                          f"({__import__('os').strerror(-rc)})")


cdef inline void _drain_fd(int fd) noexcept nogil:
    # Non-blocking read of an (O_NONBLOCK) eventfd: clears a stale wake-up.
    cdef uint64_t buf
    if fd >= 0:
        read(fd, &buf, 8)


cdef inline uint64_t _align_up(uint64_t x, uint64_t a) noexcept nogil:
    return (x + a - 1) & ~(a - 1)


cdef class ChannelSender:
    """Producer end of a Channel (hot path)."""
    cdef vrd_t d
    cdef _Mapped mapped
    cdef object __weakref__
    cdef public int kick_fd        # eventfd: producer -> consumer
    cdef public int call_fd        # eventfd: consumer -> producer
    cdef public int peer_fd        # pidfd of the consumer, -1 if unknown
    cdef public int64_t spin_ns    # spin before sleeping when the ring is full
    cdef public object check       # callable run while waiting (peer liveness); may raise
    cdef public int64_t stall_ns   # see _stalled(): held views end a blocked call after this
    cdef public int fail_reserve   # test hook: reserving a new chunk fails with this errno
    cdef uint64_t win_off          # arena window [win_off, win_off + win_size)
    cdef uint64_t win_size
    cdef uint64_t pos_head         # next allocation position (bytes, relative)
    cdef uint64_t pos_tail         # start of the oldest live allocation in the fifo
    cdef uint16_t *f_head          # [num] fifo: head of each allocation, in order
    cdef uint64_t *f_start         # [num] fifo: start position of each allocation
    cdef uint64_t *f_end           # [num] fifo: end position of each allocation
    cdef uint64_t *f_prev          # [num] fifo: pos_head before it (to roll back a cancel)
    cdef uint8_t *f_state          # [num] fifo: F_LIVE / F_DONE / F_CANCELLED
    cdef uint32_t *h_fifo          # [num] fifo counter of each head's allocation
    cdef uint32_t f_r, f_w         # fifo read / write counters
    cdef uint32_t n_loans          # loans handed out and not yet committed/cancelled
    cdef vr_wait_t wpol            # issue 10: wait policy (_wait.pxi)
    # Live allocations the tail skipped (pinned: a kept view, a pending loan):
    # window offsets [x_lo, x_hi) of head x_head; placement steps around them.
    cdef uint8_t *h_skipped        # [num] 1 while the head's allocation is in the table
    cdef uint16_t *x_head          # [num]
    cdef uint64_t *x_lo            # [num]
    cdef uint64_t *x_hi            # [num]
    cdef uint32_t n_skipped
    cdef uint64_t skipped_bytes
    # Chunks this producer has reserved (private: see the top of the file).
    cdef uint64_t *chunk_map
    cdef uint64_t nchunks
    cdef uint64_t n_reserved
    cdef bint chunks_unknown       # a previous producer may have left chunks committed
    cdef bint trim_due             # something may have become trimmable since the last trim
    cdef uint64_t hi_chunk         # 1 + the highest chunk ever reserved
    # Consumer state (read only, for diagnostics): its fetch record.
    cdef uint32_t *fetch_rec
    cdef int64_t stall_since       # when the held-views stall was first seen, -1 = not stalled
    cdef uint16_t stall_used       # used idx then
    cdef uint64_t _want            # size the blocked call waits to place

    def __cinit__(self, buffer, uint32_t num, uint64_t desc_off, uint64_t avail_off,
                  uint64_t used_off, uint64_t win_off, uint64_t win_size, *,
                  uint64_t features=0, int kick_fd=-1, int call_fd=-1, spin_ns=DEFAULT_SPIN_NS,
                  uint64_t state_off=0, double stall=1.0):
        self.mapped = _Mapped(buffer, "channel")
        _vrd_setup(&self.d, self.mapped, num, desc_off, avail_off, used_off, win_off, win_size,
                   features)
        self.win_off = win_off
        self.win_size = win_size
        self.f_head = <uint16_t *>PyMem_RawCalloc(num, sizeof(uint16_t))
        self.f_start = <uint64_t *>PyMem_RawCalloc(num, sizeof(uint64_t))
        self.f_end = <uint64_t *>PyMem_RawCalloc(num, sizeof(uint64_t))
        self.f_prev = <uint64_t *>PyMem_RawCalloc(num, sizeof(uint64_t))
        self.f_state = <uint8_t *>PyMem_RawCalloc(num, 1)
        self.h_fifo = <uint32_t *>PyMem_RawCalloc(num, sizeof(uint32_t))
        self.h_skipped = <uint8_t *>PyMem_RawCalloc(num, 1)
        self.x_head = <uint16_t *>PyMem_RawCalloc(num, sizeof(uint16_t))
        self.x_lo = <uint64_t *>PyMem_RawCalloc(num, sizeof(uint64_t))
        self.x_hi = <uint64_t *>PyMem_RawCalloc(num, sizeof(uint64_t))
        self.nchunks = (win_size + (1ULL << CH_CHUNK_SHIFT) - 1) >> CH_CHUNK_SHIFT
        self.chunk_map = <uint64_t *>PyMem_RawCalloc((self.nchunks + 63) // 64 + 1, 8)
        if not (self.f_head and self.f_start and self.f_end and self.f_prev and self.f_state
                and self.h_fifo and self.h_skipped and self.x_head and self.x_lo and self.x_hi
                and self.chunk_map):
            raise MemoryError()
        self.chunks_unknown = True
        if state_off and state_off % 64 == 0 and state_off + 8 <= <uint64_t>self.mapped.size:
            self.fetch_rec = <uint32_t *>(self.mapped.base + state_off)
        self.stall_ns = <int64_t>(stall * 1e9)
        self.stall_since = -1
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.peer_fd = -1
        self.spin_ns = spin_ns
        _wait_setup(&self.wpol, self.mapped, WS_CHAN_DRIVER_OFF, WS_CHAN_DEVICE_OFF, 1)  # issue 10

    def __dealloc__(self):
        _vrd_free(&self.d)
        PyMem_RawFree(self.f_head)
        PyMem_RawFree(self.f_start)
        PyMem_RawFree(self.f_end)
        PyMem_RawFree(self.f_prev)
        PyMem_RawFree(self.f_state)
        PyMem_RawFree(self.h_fifo)
        PyMem_RawFree(self.h_skipped)
        PyMem_RawFree(self.x_head)
        PyMem_RawFree(self.x_lo)
        PyMem_RawFree(self.x_hi)
        PyMem_RawFree(self.chunk_map)

    def close(self, finalizer=None):
        """Close this end (idempotent): later calls raise ValueError, a call
        blocked in another thread wakes up with ValueError.  `finalizer` runs
        once no call is in flight and no Loan is alive (maybe at once)."""
        self.mapped.close(finalizer, (self.call_fd,))

    @property
    def closed(self): return self.mapped.closing
    @property
    def max_message(self): return self.win_size
    @property
    def in_flight(self): return self.f_w - self.f_r + self.n_skipped
    @property
    def bytes_in_flight(self): return self.pos_head - self.pos_tail + self.skipped_bytes
    @property
    def pinned(self):
        """Live allocations the allocator steps around (kept views, pending
        loans older than finished traffic): (count, bytes)."""
        return self.n_skipped, self.skipped_bytes
    @property
    def reserved_bytes(self):
        """Window bytes this producer has committed (its own record: chunks a
        previous producer left are not counted)."""
        return self.n_reserved << CH_CHUNK_SHIFT
    @property
    def broken(self): return bool(self.d.broken)
    @property
    def avail_idx(self): return self.d.avail_idx
    @property
    def last_used_idx(self): return self.d.last_used_idx

    # --- skipped (pinned) allocations ----------------------------------------------
    cdef inline void _unskip(self, uint16_t head) noexcept nogil:
        cdef uint32_t k
        for k in range(self.n_skipped):
            if self.x_head[k] == head:
                self.skipped_bytes -= self.x_hi[k] - self.x_lo[k]
                self.trim_due = True
                self.n_skipped -= 1
                self.x_head[k] = self.x_head[self.n_skipped]
                self.x_lo[k] = self.x_lo[self.n_skipped]
                self.x_hi[k] = self.x_hi[self.n_skipped]
                break
        self.h_skipped[head] = 0

    cdef inline uint64_t _pinned_at(self, uint64_t lo, uint64_t hi) noexcept nogil:
        """End offset of a skipped extent overlapping window offsets [lo, hi),
        or 0 if none does."""
        cdef uint32_t k
        for k in range(self.n_skipped):
            if self.x_lo[k] < hi and lo < self.x_hi[k]:
                return self.x_hi[k]
        return 0

    cdef bint _skip_pinned(self) noexcept nogil:
        """The oldest allocations are live but younger ones are done: move the
        live ones at the tail to the skipped table, so that the tail can pass
        them.  True if the tail moved."""
        cdef uint32_t j = self.f_r, i
        cdef uint16_t head
        while j != self.f_w and self.f_state[j & self.d.mask] == F_LIVE:
            j += 1
        if j == self.f_r or j == self.f_w:
            return False                 # nothing to skip, or nothing done behind it
        while self.f_r != j:
            i = self.f_r & self.d.mask
            head = self.f_head[i]
            self.h_skipped[head] = 1
            self.x_head[self.n_skipped] = head
            self.x_lo[self.n_skipped] = self.f_start[i] % self.win_size
            self.x_hi[self.n_skipped] = self.x_lo[self.n_skipped] + (self.f_end[i] - self.f_start[i])
            self.skipped_bytes += self.f_end[i] - self.f_start[i]
            self.n_skipped += 1
            self.pos_tail = self.f_end[i]
            self.f_r += 1
        self._pop()
        return True

    # --- reclaim and placement ------------------------------------------------------
    cdef inline void _pop(self) noexcept nogil:
        # advance the tail over finished allocations
        cdef uint32_t i
        cdef uint16_t head
        while self.f_r != self.f_w:
            i = self.f_r & self.d.mask
            if self.f_state[i] == F_LIVE:
                break
            if self.f_state[i] == F_CANCELLED:
                head = self.f_head[i]
                self.d.link[head] = <uint16_t>self.d.free_head
                self.d.free_head = head
                self.d.num_free += 1
            self.pos_tail = self.f_end[i]
            self.f_r += 1
        if self.f_r == self.f_w:
            self.pos_head = self.pos_tail = 0      # empty: restart at the window start
            if self.trim_due or self.chunks_unknown:
                self._trim()

    cdef inline int _reclaim(self) noexcept nogil:
        """Take back what the consumer completed; advance the allocation tail.
        <0 if the consumer broke the used ring."""
        cdef uint16_t head
        cdef uint32_t ln
        cdef uint64_t tok
        cdef int rc
        while True:
            rc = vrd_get_buf(&self.d, &head, &ln, &tok)
            if rc <= 0:
                break
            if self.h_skipped[head]:
                self._unskip(head)
            else:
                self.f_state[self.h_fifo[head] & self.d.mask] = F_DONE
        self._pop()
        return rc

    cdef void _trim(self) noexcept nogil:
        """Nothing in the fifo: give back the chunks past the retained ones
        that no skipped allocation lies in."""
        cdef uint64_t c, run = 0, lo, hi
        cdef uint64_t limit = ((self.win_off + self.win_size) & ~(<uint64_t>4095)) - self.win_off
        cdef uint64_t end = self.nchunks if self.chunks_unknown else self.hi_chunk
        cdef bint rm
        self.trim_due = False
        if self.n_reserved <= CH_RETAIN_CHUNKS and not self.chunks_unknown:
            return
        for c in range(CH_RETAIN_CHUNKS, end + 1):
            rm = False
            if c < end:
                lo = c << CH_CHUNK_SHIFT
                rm = ((self.chunks_unknown or (self.chunk_map[c >> 6] >> (c & 63)) & 1)
                      and not self._pinned_at(lo, lo + (1ULL << CH_CHUNK_SHIFT)))
                if rm and (self.chunk_map[c >> 6] >> (c & 63)) & 1:
                    self.chunk_map[c >> 6] &= ~(1ULL << (c & 63))
                    self.n_reserved -= 1
            if rm:
                if not run:
                    run = c + 1                      # run start + 1
            elif run:
                lo = (run - 1) << CH_CHUNK_SHIFT
                hi = c << CH_CHUNK_SHIFT
                if hi > limit:
                    hi = limit                        # the consumer state page follows
                if hi > lo:
                    _ch_madvise(self.d.base + self.win_off + lo, hi - lo, CH_MADV_REMOVE)
                run = 0
        self.chunks_unknown = False

    cdef int _commit_chunks(self, uint64_t o, uint64_t n) noexcept nogil:
        """Reserve the chunks under window offsets [o, o + n): 0 or -errno."""
        cdef uint64_t c = o >> CH_CHUNK_SHIFT
        cdef uint64_t last = (o + n - 1) >> CH_CHUNK_SHIFT
        cdef uint64_t start, ln
        cdef int rc
        while c <= last:
            if not (self.chunk_map[c >> 6] >> (c & 63)) & 1:
                if self.fail_reserve:
                    return -self.fail_reserve
                start = c << CH_CHUNK_SHIFT
                ln = self.win_size - start
                if ln > (1ULL << CH_CHUNK_SHIFT):
                    ln = 1ULL << CH_CHUNK_SHIFT
                rc = _ch_populate(self.d.base + self.win_off + start, ln)
                if rc < 0:
                    return rc
                self.chunk_map[c >> 6] |= 1ULL << (c & 63)
                self.n_reserved += 1
                self.trim_due = True
                if c >= self.hi_chunk:
                    self.hi_chunk = c + 1
            c += 1
        return 0

    cdef inline int _place(self, uint64_t asz, uint64_t *pp, uint64_t *po) noexcept nogil:
        """Where `asz` bytes go now (position in *pp, window offset in *po):
        0 or -ENOSPC.  No side effects.  Skips the window's end and skipped
        extents; prefers low offsets (wraps early when little is in flight)."""
        cdef uint64_t p = self.pos_head
        cdef uint64_t o = p % self.win_size if p else 0     # (a division costs ~10 ns)
        cdef uint64_t soft, e
        if o and self.f_r != self.f_w:
            soft = 2 * (p - self.pos_tail + asz)
            if soft < (CH_RETAIN_CHUNKS << CH_CHUNK_SHIFT):
                soft = CH_RETAIN_CHUNKS << CH_CHUNK_SHIFT
            if o + asz > soft and p + (self.win_size - o) + asz - self.pos_tail <= self.win_size:
                p += self.win_size - o           # wrap early: stay in the low chunks
                o = 0
        while True:
            if o + asz > self.win_size:
                p += self.win_size - o           # skip the window's tail end
                o = 0
            if p + asz - self.pos_tail > self.win_size:
                return -ENOSPC
            if self.n_skipped == 0:
                break
            e = self._pinned_at(o, o + asz)
            if e == 0:
                break
            p += e - o                           # step over a pinned extent
            o = e
        pp[0] = p
        po[0] = o
        return 0

    cdef inline int _alloc(self, uint64_t size, uint64_t *off, uint16_t *head) noexcept nogil:
        """Reserve `size` contiguous arena bytes and a descriptor.
        0 = done, -ENOSPC = no room now, -EINVAL = used ring broken, other
        -errno = no memory to commit the bytes."""
        cdef uint64_t asz = _align_up(size if size else 1, ALLOC_ALIGN)
        cdef uint64_t p, o, c
        cdef uint32_t i
        cdef int rc
        if self._reclaim() < 0:
            return -EINVAL
        if self.d.num_free == 0:
            return -ENOSPC
        if self._place(asz, &p, &o) < 0:
            if not self._skip_pinned() or self._place(asz, &p, &o) < 0:
                return -ENOSPC
        c = o >> CH_CHUNK_SHIFT
        if c != (o + asz - 1) >> CH_CHUNK_SHIFT or not (self.chunk_map[c >> 6] >> (c & 63)) & 1:
            rc = self._commit_chunks(o, asz)     # (the common case, one committed chunk, skips it)
        else:
            rc = 0
        if rc < 0:
            return rc
        head[0] = vrd_take(&self.d)
        i = self.f_w & self.d.mask
        self.f_head[i] = head[0]
        self.f_start[i] = p
        self.f_end[i] = p + asz
        self.f_prev[i] = self.pos_head
        self.f_state[i] = F_LIVE
        self.h_fifo[head[0]] = self.f_w
        self.f_w += 1
        self.pos_head = p + asz
        off[0] = self.win_off + o
        return 0

    cdef inline void _expose(self, uint16_t head, uint64_t off, uint32_t ln) noexcept nogil:
        self.d.desc[head].addr = off
        self.d.desc[head].len = ln
        self.d.desc[head].flags = 0
        self.d.desc[head].next = 0
        self.d.ndesc[head] = 1
        vrd_expose(&self.d, head, 0, 0)

    cdef inline void _cancel(self, uint16_t head) noexcept nogil:
        cdef uint32_t i = self.h_fifo[head] & self.d.mask
        if self.h_skipped[head]:
            # skipped by the tail already: forget the extent, free the head
            self._unskip(head)
            self.d.link[head] = <uint16_t>self.d.free_head
            self.d.free_head = head
            self.d.num_free += 1
        elif self.h_fifo[head] + 1 == self.f_w:
            # the newest allocation: roll it back entirely
            self.pos_head = self.f_prev[i]
            self.f_w -= 1
            self.d.link[head] = <uint16_t>self.d.free_head
            self.d.free_head = head
            self.d.num_free += 1
            if self.f_r == self.f_w:
                self.pos_head = self.pos_tail = 0
        else:
            self.f_state[i] = F_CANCELLED

    cdef inline void _kick(self) noexcept nogil:
        vr_wait_note(self.wpol.mine, VR_WS_RUNNING)        # issue 10 hint
        if vrd_kick_prepare(&self.d):
            _signal_fd(self.kick_fd)

    # --- waiting for room -----------------------------------------------------------
    cdef bint _stalled(self, bint waiting=True) noexcept nogil:
        """Is the room taken by messages only the consumer can give back?  It
        has fetched every message published (it holds the rest as views) and
        (if `waiting`) waits for more: unless it releases a view, nothing moves."""
        cdef uint16_t fetched
        if self.fetch_rec == NULL or vr_load_acquire_u16(&self.d.used.idx) == self.d.published_idx:
            return False                 # (read, not reclaimed: that is the wait's wake-up)
        fetched = <uint16_t>(vr_load_acquire_u32(self.fetch_rec) & 0xffff)
        if fetched != self.d.published_idx:
            return False                 # it has messages left to read
        if not waiting:
            return True
        if self.d.event_idx:
            return vr_load_acquire_u16(self.d.avail_event) == self.d.published_idx
        return not (vr_load_acquire_u16(&self.d.used.flags) & VR_USED_F_NO_NOTIFY)

    def _held_message(self, uint64_t size):
        cdef uint32_t i, held
        cdef uint64_t nbytes
        self._reclaim()
        i = self.f_r
        held = self.n_skipped
        nbytes = self.skipped_bytes
        while i != self.f_w:
            if self.f_state[i & self.d.mask] == F_LIVE:
                held += 1
                nbytes += self.f_end[i & self.d.mask] - self.f_start[i & self.d.mask]
            i += 1
        loans = (f" ({self.n_loans} of them loans of this producer not yet committed)"
                 if self.n_loans else "")
        return (f"no room for a {size}-byte message: {held} message(s) of {nbytes} bytes"
                f"{loans} are held by the consumer (kept MessageViews) in a "
                f"{self.win_size}-byte channel, and the consumer has read everything else; "
                f"release views sooner or use a larger capacity")

    def _wait_check(self):
        """Run while waiting for room: the peer check, then the held-views
        stall (MemoryError once it has lasted stall_ns with nothing released)."""
        cdef int64_t now
        cdef uint16_t used
        if self.check is not None:
            self.check()
        if not self._stalled():
            self.stall_since = -1
            return
        now = <int64_t>vr_now_ns()
        used = vr_load_acquire_u16(&self.d.used.idx)
        if self.stall_since < 0 or self.stall_used != used:
            self.stall_since = now
            self.stall_used = used
        elif self.stall_ns >= 0 and now - self.stall_since >= self.stall_ns:
            self.stall_since = -1
            raise MemoryError(self._held_message(self._want))

    cdef int _wait_space(self, int64_t deadline) except -1:
        """1 = retry, 0 = timeout, 2 = consumer exited."""
        return _wait_ring(&self.d, _drv_pending, _drv_arm, _drv_disarm, self.call_fd,
                          self.peer_fd, deadline, self.spin_ns, self._wait_check, 0.1,
                          self.mapped, &self.wpol)

    cdef int _reserve(self, uint64_t size, bint block, object timeout, uint64_t *off,
                      uint16_t *head) except -1:
        """Allocate, waiting for room if asked.  The caller has entered the
        mapping (the wait releases the GIL)."""
        cdef int rc
        cdef int64_t deadline = -2
        if self.mapped.closing:
            raise ValueError("channel is closed")
        if size > self.win_size or size > 0xffffffffu:
            raise MessageTooLarge(f"message of {size} bytes can never fit: the channel holds "
                                  f"at most {self.win_size} bytes")
        while True:
            rc = self._alloc(size, off, head)
            if rc == 0:
                return 0
            if rc == -EINVAL:
                raise InvalidRing(EINVAL, _DRIVER_REASONS.get(self.d.err_reason, "ring broken")
                                  .format(a=self.d.err_a, b=self.d.err_b), None)
            if rc != -ENOSPC:
                raise MemoryError(f"cannot commit shared memory for a {size}-byte message "
                                  f"({__import__('os').strerror(-rc)}): the machine, its "
                                  f"memory cgroup or /dev/shm is out of memory")
            if not block:
                raise Full()
            if deadline == -2:
                deadline = _deadline(timeout)
                self.stall_since = -1
            self._want = size
            old_peer = self.peer_fd
            rc = self._wait_space(deadline)
            if rc == 0:
                if self._stalled(False):
                    raise Full(self._held_message(size))
                raise Full()
            if rc == 2:
                self._reclaim()
                if self.check is not None:
                    self.check()          # raises if the consumer is really gone
                if self.peer_fd == old_peer:
                    raise PeerDead("the consumer exited")

    def send(self, data, bint block=True, timeout=None):
        """Copy one message into the arena and publish it."""
        cdef Py_buffer b
        cdef uint64_t off
        cdef uint16_t head
        cdef _Mapped m = self.mapped
        m.enter()
        try:
            PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
            try:
                self._reserve(<uint64_t>b.len, block, timeout, &off, &head)
                if b.len > 65536:
                    with nogil:
                        memcpy(self.d.base + off, b.buf, b.len)
                    if m.closing:
                        # closed during the copy: Channel.close has already
                        # told the consumer; do not publish behind its back
                        self._cancel(head)
                        raise ValueError("channel was closed while sending")
                else:
                    memcpy(self.d.base + off, b.buf, b.len)
            finally:
                PyBuffer_Release(&b)
            self._expose(head, off, <uint32_t>b.len)
            vrd_publish(&self.d)
            self._kick()
        finally:
            m.leave()

    def send_many(self, messages, bint block=True, timeout=None):
        """Send each message; one index publish and at most one kick per run of
        messages that fit without waiting.  Returns the count sent."""
        cdef Py_buffer b
        cdef uint64_t off
        cdef uint16_t head
        cdef uint32_t n = 0
        cdef int rc
        cdef _Mapped mp = self.mapped
        mp.enter()
        try:
            for m in messages:
                # the iterator runs Python code: it may have closed us
                if mp.closing:
                    raise ValueError("channel is closed")
                PyObject_GetBuffer(m, &b, PyBUF_SIMPLE)
                try:
                    if <uint64_t>b.len > self.win_size:
                        raise MessageTooLarge(f"message of {b.len} bytes can never fit: the "
                                              f"channel holds at most {self.win_size} bytes")
                    rc = self._alloc(<uint64_t>b.len, &off, &head)
                    if rc != 0:
                        # full: make what we have visible, then wait like send()
                        vrd_publish(&self.d)
                        self._kick()
                        self._reserve(<uint64_t>b.len, block, timeout, &off, &head)
                    memcpy(self.d.base + off, b.buf, b.len)
                finally:
                    PyBuffer_Release(&b)
                self._expose(head, off, <uint32_t>b.len)
                n += 1
        finally:
            # whatever happened, the messages already written are delivered
            # (a close can only have come during a wait or from the iterator:
            # everything before that was published already)
            if not mp.closing:
                vrd_publish(&self.d)
                self._kick()
            mp.leave()
        return n

    def loan(self, Py_ssize_t size, bint block=True, timeout=None):
        """Reserve `size` bytes of shared memory to write into; see Loan."""
        cdef uint64_t off
        cdef uint16_t head
        cdef Loan ln
        if size < 0:
            raise ValueError("size must be >= 0")
        ln = Loan.__new__(Loan)          # allocated before the reservation: no leak on MemoryError
        self.mapped.enter()
        try:
            self._reserve(<uint64_t>size, block, timeout, &off, &head)
        finally:
            self.mapped.leave()
        ln.tx = self
        ln.head = head
        ln.off = off
        ln.size = size
        ln.pid = vr_getpid()
        self.n_loans += 1
        self.mapped.pins += 1
        return ln

    cdef _commit(self, Loan ln, uint64_t nbytes):
        self._expose(ln.head, ln.off, <uint32_t>nbytes)
        vrd_publish(&self.d)
        self._kick()

    def reclaim(self):
        """Take back completed messages now (normally done on demand), and
        give back committed memory if nothing is in flight any more.  Returns
        the messages still in flight."""
        if not self.mapped.closing and self._reclaim() < 0:
            raise InvalidRing(EINVAL, _DRIVER_REASONS.get(self.d.err_reason, "ring broken")
                              .format(a=self.d.err_a, b=self.d.err_b), None)
        return self.f_w - self.f_r + self.n_skipped

    cdef inline bint _fits(self, uint64_t size) noexcept nogil:
        """Would _alloc(size) find room now?  (Call after _reclaim; may move
        pinned allocations to the skipped table, which changes nothing else.)"""
        cdef uint64_t asz = _align_up(size if size else 1, ALLOC_ALIGN)
        cdef uint64_t p, o
        if self.d.num_free == 0:
            return False
        if self._place(asz, &p, &o) == 0:
            return True
        return self._skip_pinned() and self._place(asz, &p, &o) == 0

    def arm(self, Py_ssize_t size=0):
        """For event loops, after send(block=False) raised Full: True = still
        no room for `size` bytes, wait for call_fd; False = room now (and
        disarmed).  Drains call_fd first."""
        if self.mapped.closing:
            raise ValueError("channel is closed")
        _drain_fd(self.call_fd)
        if self._reclaim() < 0:
            raise InvalidRing(EINVAL, _DRIVER_REASONS.get(self.d.err_reason, "ring broken")
                              .format(a=self.d.err_a, b=self.d.err_b), None)
        if self._fits(<uint64_t>size):
            return False
        # barrier D inside vrd_enable_cb pairs with the fence in vrh_need_notify
        if vrd_enable_cb(&self.d):
            return True
        vrd_disable_cb(&self.d)
        return False

    def disarm(self):
        """Stop asking for calls (we are polling again)."""
        if not self.mapped.closing:
            vrd_disable_cb(&self.d)

    def flush_kick(self):
        """Signal the consumer unconditionally (used on close so a sleeping
        consumer wakes up to notice)."""
        if not self.mapped.closing:
            vrd_publish(&self.d)
            _signal_fd(self.kick_fd)


cdef class Loan:
    """Writable shared memory reserved by ChannelSender.loan().

    Write into it (buffer protocol, or the memoryview `with` hands you), then
    commit(n) publishes the first n bytes (default: all).  Leaving a `with`
    block commits, or cancels if the block raised.  Committing while a buffer
    export of the loan is alive raises BufferError: the bytes belong to the
    consumer from that moment on.

    After Channel.close() a new export, commit() and cancel()'s publishing are
    refused (ValueError); exports made before stay valid until released.  In a
    forked child the loan is the parent's: commit() raises ValueError, and
    cancel() / dropping it only forget it (shared memory is not touched)."""
    cdef ChannelSender tx
    cdef uint16_t head
    cdef uint64_t off
    cdef uint64_t size
    cdef int exports
    cdef bint done
    cdef object _mv
    cdef uint32_t pid              # the process that took the loan

    cdef int _check_usable(self) except -1:
        if self.done:
            raise ValueError("loan already committed or cancelled")
        if self.tx.mapped.closing:
            raise ValueError("channel is closed")
        if self.pid != vr_getpid():
            raise ValueError(f"loan belongs to process {self.pid} (inherited by fork)")
        return 0

    def __getbuffer__(self, Py_buffer *buf, int flags):
        self._check_usable()
        PyBuffer_FillInfo(buf, self, self.tx.d.base + self.off, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self.exports -= 1

    def __len__(self):
        return self.size

    @property
    def offset(self):
        """Segment offset of the loaned bytes."""
        return self.off

    cdef void _finish(self) noexcept:
        self.done = True
        self.tx.n_loans -= 1
        self.tx.mapped.unpin()

    def commit(self, nbytes=None):
        """Publish the first nbytes (default all) to the consumer."""
        self._check_usable()
        if self._mv is not None:
            self._mv.release()          # BufferError if someone still holds a view
            self._mv = None
        if self.exports:
            raise BufferError(f"{self.exports} buffer export(s) of the loan are still alive; "
                              "release them before committing")
        cdef uint64_t n = self.size if nbytes is None else nbytes
        if n > self.size:
            raise ValueError(f"cannot commit {n} bytes of a {self.size}-byte loan")
        self.tx._commit(self, n)
        self._finish()

    def cancel(self):
        """Give the reservation back without publishing anything."""
        if self.done:
            return
        if self._mv is not None:
            self._mv.release()
            self._mv = None
        if self.exports:
            raise BufferError("buffer exports of the loan are still alive")
        self._drop()

    cdef void _drop(self) noexcept:
        # Cancel: the reservation goes back to our allocator (private memory:
        # nothing shared is written).  Skipped once closed (nothing will be
        # allocated again) and in a forked child (the allocator is a copy).
        if not self.tx.mapped.closing and self.pid == vr_getpid():
            self.tx._cancel(self.head)
        self._finish()

    def __enter__(self):
        self._mv = memoryview(self)
        return self._mv

    def __exit__(self, et, ev, tb):
        if self.done:
            return False
        if et is not None:
            self.cancel()
        else:
            self.commit()
        return False

    def __dealloc__(self):
        # A loan dropped without commit/cancel: cancel it (exports hold a
        # reference to us, so there are none left here).
        if not self.done and self.tx is not None:
            self._drop()


cdef class ChannelReceiver:
    """Consumer end of a Channel (hot path): a vringh host over the ring."""
    cdef vrh_t h
    cdef _Mapped mapped
    cdef object __weakref__
    cdef vr_iov riov
    cdef public int kick_fd
    cdef public int call_fd
    cdef public int peer_fd        # pidfd of the producer, -1 if unknown
    cdef public int64_t spin_ns
    cdef public object check       # callable run while waiting (peer liveness); may raise
    cdef public object on_empty    # callable when a wait ends because the peer is gone
    cdef uint32_t n_views          # MessageViews not yet released
    cdef vr_used_elem *batch       # [num] scratch completions
    # Consumer state in shared memory, so that a new consumer can take over
    # from a killed one (see recover()); NULL when there is no state area.
    cdef uint32_t *fetch_rec       # last avail idx fetched | head << 16 (the fetch commit)
    cdef uint32_t *journal         # completion in progress: first used idx | count << 16
    cdef uint8_t *taken            # [num] 1 while a head is fetched and not completed
    cdef vr_wait_t wpol            # issue 10: wait policy (_wait.pxi)

    def __cinit__(self, buffer, uint32_t num, uint64_t desc_off, uint64_t avail_off,
                  uint64_t used_off, uint64_t win_off, uint64_t win_size, *,
                  uint64_t features=0, uint64_t max_msg=0xffffffff, uint32_t max_iov=1024,
                  int kick_fd=-1, int call_fd=-1, spin_ns=DEFAULT_SPIN_NS,
                  uint64_t state_off=0):
        self.mapped = _Mapped(buffer, "channel")
        _vrh_setup(&self.h, self.mapped, num, desc_off, avail_off, used_off, win_off, win_size,
                   features, max_msg, max_iov, False)
        self.batch = <vr_used_elem *>PyMem_RawCalloc(num, sizeof(vr_used_elem))
        if self.batch == NULL:
            raise MemoryError()
        if state_off:
            if state_off % 64 or state_off + CONSUMER_STATE_HDR + num > <uint64_t>self.mapped.size \
                    or (state_off < win_off + win_size and win_off < state_off + CONSUMER_STATE_HDR + num):
                raise ValueError("bad consumer state area")
            self.fetch_rec = <uint32_t *>(self.mapped.base + state_off)
            self.journal = <uint32_t *>(self.mapped.base + state_off + 4)
            self.taken = self.mapped.base + state_off + CONSUMER_STATE_HDR
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.peer_fd = -1
        self.spin_ns = spin_ns
        _wait_setup(&self.wpol, self.mapped, WS_CHAN_DEVICE_OFF, WS_CHAN_DRIVER_OFF, 1)  # issue 10

    def __dealloc__(self):
        _vrh_free(&self.h)
        PyMem_RawFree(self.batch)
        PyMem_RawFree(self.riov.seg)

    def close(self, finalizer=None):
        """Stop using the ring (idempotent): later calls raise ValueError, a
        call blocked in another thread wakes up with ValueError.  The mapping
        stays until the last call has returned and the last MessageView is
        released (views never dangle); then `finalizer` runs."""
        self.mapped.close(finalizer, (self.kick_fd,))

    @property
    def closed(self): return self.mapped.closing
    @property
    def views_outstanding(self): return self.n_views
    @property
    def broken(self): return bool(self.h.broken)
    @property
    def last_avail_idx(self): return self.h.last_avail_idx

    def pending(self):
        """True if a message is waiting (non-blocking, no side effects)."""
        return not self.mapped.closing and vrh_avail_pending(&self.h)

    def arm(self):
        """Ask to be kicked on the next message (for select/poll/asyncio on
        kick_fd).  True = still empty (safe to wait on the fd); False = a
        message is already there."""
        if self.mapped.closing:
            raise ValueError("channel is closed")
        _drain_fd(self.kick_fd)
        return vrh_notify_enable(&self.h)

    # --- shared consumer state: each step has one commit store --------------------
    cdef inline void _fetched(self, uint16_t head) noexcept nogil:
        # taken first, then the fetch record (the commit): a consumer killed
        # between the two left a taken head at the next unfetched position,
        # which recover() recognises as not fetched.
        if self.taken != NULL:
            self.taken[head] = 1
            vr_store_release_u32(self.fetch_rec, <uint32_t>self.h.last_avail_idx | (<uint32_t>head << 16))

    cdef inline void _unfetched(self, uint16_t head) noexcept nogil:
        if self.taken != NULL:
            vr_store_release_u32(self.fetch_rec, <uint32_t>self.h.last_avail_idx | 0xffff0000u)
            self.taken[head] = 0

    cdef inline int _complete(self, const vr_used_elem *elems, uint32_t n) noexcept nogil:
        # Journal the batch (first used idx and count), publish it (the commit:
        # one used->idx store), then clear the taken flags and the journal.  A
        # consumer killed anywhere in between is resolved by recover().
        cdef uint32_t k
        cdef int rc
        vr_wait_note(self.wpol.mine, VR_WS_RUNNING)        # issue 10 hint
        if self.taken != NULL:
            vr_store_release_u32(self.journal, <uint32_t>(<uint16_t>(self.h.last_used_idx +
                                 self.h.completed)) | (n << 16))
        rc = vrh_complete_multi(&self.h, elems, n)
        if self.taken != NULL:
            if rc == 0:
                for k in range(n):
                    self.taken[elems[k].id] = 0
            vr_store_release_u32(self.journal, 0)
        return rc

    cdef inline void _done(self, uint16_t head) noexcept nogil:
        cdef vr_used_elem e
        e.id = head
        e.len = 0
        self._complete(&e, 1)
        if vrh_need_notify(&self.h) == 1:
            _signal_fd(self.call_fd)

    def recover(self):
        """Take over from a consumer that died: finish or undo what it was doing,
        resume after the last message it fetched, and give back (as lost: at
        most once) every message it still held.  Returns how many were lost."""
        cdef uint32_t j, rec, k, n = 0
        cdef uint16_t start, cnt, u, a, nxt, fidx
        cdef uint32_t hd
        if self.mapped.closing:
            raise ValueError("channel is closed")
        if self.taken == NULL:
            return 0
        u = vr_load_acquire_u16(&self.h.used.idx)
        # 1. a completion in progress: published (all or nothing) or not?
        j = vr_load_acquire_u32(self.journal)
        start = <uint16_t>(j & 0xffff)
        cnt = <uint16_t>(j >> 16)
        if cnt and <uint16_t>(u - start) >= cnt and cnt <= self.h.num:
            for k in range(cnt):
                hd = vr_load_relaxed_u32(&self.h.used.ring[(start + k) & self.h.mask].id)
                if hd < self.h.num:
                    self.taken[hd] = 0
        vr_store_release_u32(self.journal, 0)
        # 2. resume after the last committed fetch; an uncommitted one is undone
        rec = vr_load_acquire_u32(self.fetch_rec)
        fidx = <uint16_t>(rec & 0xffff)
        self.h.last_avail_idx = self.h.shadow_avail_idx = fidx
        self.h.last_used_idx = u
        self.h.completed = 0
        self.h.broken = False
        a = vr_load_acquire_u16(&self.h.avail.idx)
        if a != fidx:
            nxt = vr_load_relaxed_u16(&self.h.avail.ring[fidx & self.h.mask])
            if nxt < self.h.num and self.taken[nxt]:
                self.taken[nxt] = 0
        # 3. what it still held is lost: complete it so the producer gets it back
        memset(self.h.inflight, 0, self.h.num)
        self.h.n_inflight = 0
        for k in range(self.h.num):
            if self.taken[k]:
                self.h.inflight[k] = 1
                self.h.n_inflight += 1
                self.batch[n].id = k
                self.batch[n].len = 0
                n += 1
        if n:
            self._complete(self.batch, n)
            if vrh_need_notify(&self.h) == 1:
                _signal_fd(self.call_fd)
        return n

    cdef int _next(self, bint block, object timeout, uint16_t *head) except -1:
        """Fetch the next chain into self.riov.  1 = got it, 0 = empty (only
        when not blocking).  The caller has entered the mapping.

        self.riov is scratch shared by every thread using this end: the caller
        reads it before it next releases the GIL or runs Python code (GC-tracked
        allocations included: a collection may run __del__ and switch threads)."""
        cdef int rc, watched
        cdef int64_t deadline = -2
        if self.mapped.closing:
            raise ValueError("channel is closed")
        while True:
            rc = vrh_getdesc(&self.h, &self.riov, NULL, head)
            if rc == 1:
                self._fetched(head[0])
                return 1
            if rc < 0:
                if not self.h.err_ring:
                    self._fetched(head[0])
                    self._done(head[0])       # hand the bad chain back, keep going
                raise _host_error(&self.h, rc, head[0])
            if not block:
                # Drain and re-arm before reporting empty, so that select() on
                # kick_fd sleeps until the next message (and never spins).
                _drain_fd(self.kick_fd)
                if not vrh_notify_enable(&self.h):
                    continue
                if self.on_empty is not None:
                    self.on_empty()          # raises ChannelClosed after a clean close
                return 0
            if deadline == -2:
                deadline = _deadline(timeout)
            watched = self.peer_fd           # the pidfd this wait watches
            rc = _wait_ring(&self.h, _host_pending, _host_arm, _host_disarm, self.kick_fd,
                            watched, deadline, self.spin_ns, self.check, 0.1, self.mapped,
                            &self.wpol)
            if rc == 0:
                return 0
            if rc == 2 and not vrh_avail_pending(&self.h):
                self._peer_exited(watched)

    def wait(self, timeout=None):
        """Wait until a message is there (True) or timeout (False) without
        taking it.  Raises PeerDead / ChannelClosed like recv."""
        cdef int rc
        cdef int watched
        cdef int64_t deadline = _deadline(timeout)
        self.mapped.enter()
        try:
            if vrh_avail_pending(&self.h):
                return True
            while True:
                watched = self.peer_fd
                rc = _wait_ring(&self.h, _host_pending, _host_arm, _host_disarm, self.kick_fd,
                                watched, deadline, self.spin_ns, self.check, 0.1, self.mapped,
                                &self.wpol)
                if rc == 2 and not vrh_avail_pending(&self.h):
                    self._peer_exited(watched)
                    continue
                return rc != 0
        finally:
            self.mapped.leave()

    cdef _peer_exited(self, int old):
        # The pidfd `old` we watched became readable.  Ask the channel (it
        # knows who the producer is now: another process may have taken over);
        # it raises ChannelClosed / PeerDead, or re-points peer_fd and we go on.
        if vrh_avail_pending(&self.h):
            return                       # a message arrived meanwhile: take it first
        if self.on_empty is not None:
            self.on_empty()
        if self.check is not None:
            self.check()
        if self.peer_fd == old:
            raise PeerDead("the producer exited")

    cdef void _unfetch(self, uint16_t head) noexcept nogil:
        # Put back the fetch _next just made (it must still be the most recent:
        # no Python code and no GIL release since).
        vrh_abandon(&self.h, 1)
        self._unfetched(head)

    cdef inline int _copy_out(self, uint8_t *dst, uint64_t total) except -1:
        """Copy the message _next put in self.riov to dst.  A big single
        segment is copied without the GIL, from a pointer taken before: the
        shared riov may be refilled by another thread meanwhile."""
        cdef const uint8_t *src
        if self.riov.used == 1:
            src = self.h.base + self.riov.seg[0].off
            if total > 65536:
                with nogil:
                    memcpy(dst, src, total)
            else:
                memcpy(dst, src, total)
        else:
            vrh_iov_pull(&self.riov, self.h.base, dst, total)
        return 0

    def recv(self, bint block=True, timeout=None):
        """The next message as bytes (copied out; its buffer returns to the
        producer at once).  Raises Empty when there is none in time."""
        cdef uint16_t head
        cdef uint64_t total
        self.mapped.enter()
        try:
            if not self._next(block, timeout, &head):
                raise Empty()
            total = self.riov.total
            try:
                out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>total)   # not GC-tracked
            except BaseException:
                self._unfetch(head)
                raise
            self._copy_out(<uint8_t *>PyBytes_AS_STRING(out), total)
            self._done(head)
            return out
        finally:
            self.mapped.leave()

    def recv_into(self, buffer, bint block=True, timeout=None):
        """Copy the next message into a writable buffer; returns its size.
        A message larger than the buffer raises ValueError and stays queued."""
        cdef uint16_t head
        cdef uint64_t total
        cdef Py_buffer b
        PyObject_GetBuffer(buffer, &b, PyBUF_WRITABLE)   # before taking a message
        try:
            self.mapped.enter()
            try:
                if not self._next(block, timeout, &head):
                    raise Empty()
                total = self.riov.total
                if <uint64_t>b.len < total:
                    self._unfetch(head)
                    raise ValueError(f"message of {total} bytes does not fit a "
                                     f"{b.len}-byte buffer")
                self._copy_out(<uint8_t *>b.buf, total)
                self._done(head)
            finally:
                self.mapped.leave()
        finally:
            PyBuffer_Release(&b)
        return total

    def recv_view(self, bint block=True, timeout=None):
        """The next message as a MessageView over shared memory (no copy)."""
        cdef uint16_t head
        # allocated first: a GC-tracked allocation may run a collection
        cdef MessageView v = MessageView.__new__(MessageView)
        self.mapped.enter()
        try:
            if not self._next(block, timeout, &head):
                raise Empty()
            if self.riov.used == 1:
                v.ptr = self.h.base + self.riov.seg[0].off
                v.length = self.riov.seg[0].len
                v.offset = self.riov.seg[0].off
            elif self.riov.used == 0:
                v.ptr = self.h.base
                v.length = 0
                v.offset = 0
            else:
                # Not one of ours (our producer always sends one segment): gather
                # into private memory so the view is still contiguous.
                try:
                    v.copy = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>self.riov.total)
                except BaseException:
                    self._unfetch(head)
                    raise
                vrh_iov_pull(&self.riov, self.h.base, <uint8_t *>PyBytes_AS_STRING(v.copy),
                             self.riov.total)
                v.ptr = <uint8_t *>PyBytes_AS_STRING(v.copy)
                v.length = self.riov.total
                v.offset = 0
            v.head = head
            v.pid = vr_getpid()
            v.rx = self                     # from here on the view owns the message
            self.n_views += 1
            self.mapped.pins += 1
            return v
        finally:
            self.mapped.leave()

    def recv_many(self, Py_ssize_t max_messages=1 << 30, bint block=True, timeout=None):
        """Wait for at least one message, then take up to max_messages that are
        already there: one used-index update and one notification for all."""
        cdef uint16_t head
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        out = []                            # GC-tracked: allocated before fetching
        self.mapped.enter()
        try:
            if not self._next(block, timeout, &head):
                raise Empty()
            return self._take_many(out, head, max_messages)
        finally:
            self.mapped.leave()

    cdef list _take_many(self, list out, uint16_t head, Py_ssize_t max_messages):
        # From the first fetch to the completion no Python code runs and the
        # GIL is kept (bytes objects and list growth do not start a collection):
        # self.riov and self.batch are scratch shared by every thread.
        cdef uint32_t n = 0, cap
        cdef int rc
        cap = self.h.num if <uint64_t>max_messages > self.h.num else <uint32_t>max_messages
        while True:
            try:
                data = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>self.riov.total)
                out.append(data)
            except BaseException:
                self._unfetch(head)
                if n:
                    break                   # deliver what we have; the error comes back next call
                raise
            vrh_iov_pull(&self.riov, self.h.base, <uint8_t *>PyBytes_AS_STRING(data), self.riov.total)
            self.batch[n].id = head
            self.batch[n].len = 0
            n += 1
            if n >= cap:
                break
            rc = vrh_getdesc(&self.h, &self.riov, NULL, &head)
            if rc != 1:
                if rc < 0 and not self.h.err_ring:
                    vrh_abandon(&self.h, 1)     # leave it for the next call to report
                elif rc < 0:
                    self.h.broken = False       # report on the next call, after delivering these
                break
            self._fetched(head)
        self._complete(self.batch, n)
        if vrh_need_notify(&self.h) == 1:
            _signal_fd(self.call_fd)
        return out

    cdef _release_view(self, MessageView v):
        # Completing is the only shared-memory write: never after close (a new
        # consumer may have recovered the head) nor in a forked child (the view
        # is the parent's, and the parent may still be reading it).
        self.n_views -= 1
        if not self.mapped.closing and v.pid == vr_getpid():
            self._done(v.head)
        self.mapped.unpin()


cdef class MessageView:
    """A received message in shared memory, read-only, no copy.

    Supports the buffer protocol (memoryview(v), bytes(v), numpy.frombuffer(v)).
    Its buffer goes back to the producer when you call release() (or leave a
    `with` block) AND no memoryview / array made from it is alive any more; if
    you simply drop every reference, that happens when it is garbage-collected.
    Until then later traffic can never overwrite it.

    It stays readable after Channel.close() (it keeps the mapping) until it is
    released; then nothing goes back (the channel is closed).  A view inherited
    by a forked child is the parent's: releasing or dropping it in the child
    gives nothing back, so the parent's bytes stay put."""
    cdef ChannelReceiver rx
    cdef uint16_t head
    cdef uint8_t *ptr
    cdef uint64_t length
    cdef uint64_t offset
    cdef int exports
    cdef bint release_requested
    cdef bint released
    cdef object copy
    cdef uint32_t pid              # the process that received it

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self.released:
            raise ValueError("message view already released")
        if flags & PyBUF_WRITABLE:
            raise BufferError("a received message is read-only")
        PyBuffer_FillInfo(buf, self, self.ptr, self.length, 1, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self.exports -= 1
        if self.release_requested and self.exports == 0 and not self.released:
            self._give_back()

    cdef _give_back(self):
        self.released = True
        if self.rx is not None:
            self.rx._release_view(self)

    def release(self):
        """Give the buffer back now, or as soon as the last export of it goes."""
        self.release_requested = True
        if self.exports == 0 and not self.released:
            self._give_back()

    @property
    def released(self):
        return self.released

    @property
    def exports(self):
        """Live buffer exports (memoryviews, arrays) of this message."""
        return self.exports

    @property
    def offset(self):
        """Segment offset of the message (0 if it had to be gathered)."""
        return self.offset

    def __len__(self):
        return self.length

    def tobytes(self):
        if self.released:
            raise ValueError("message view already released")
        return PyBytes_FromStringAndSize(<char *>self.ptr, <Py_ssize_t>self.length)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def __dealloc__(self):
        if not self.released:
            self._give_back()

    def __repr__(self):
        state = "released" if self.released else f"{self.exports} exports"
        return f"<MessageView {self.length} bytes at {self.offset:#x}, {state}>"
