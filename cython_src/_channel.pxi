# _channel.pxi - the hot path of the zero-copy Channel (one producer, one
# consumer), over the same vrd_t / vrh_t verbs as VringDriver / VringHost.
# Included by _ring.pyx; the public API is vringipc/channel.py.
#
# Producer: every message is one contiguous arena allocation and one
# descriptor.  Allocation is a byte ring over the arena window (FIFO order)
# that tolerates out-of-order release: a message's bytes return to the pool
# once it and every older allocation are done, so a long-held view delays
# reuse but never lets later traffic overwrite it.
# Consumer: recv copies out and completes at once; recv_view hands out a
# MessageView over shared memory and completes when the view is released and
# no buffer export of it remains.
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
    cdef uint64_t win_off          # arena window [win_off, win_off + win_size)
    cdef uint64_t win_size
    cdef uint64_t pos_head         # next allocation position (bytes, relative)
    cdef uint64_t pos_tail         # start of the oldest live allocation
    cdef uint16_t *f_head          # [num] fifo: head of each allocation, in order
    cdef uint64_t *f_end           # [num] fifo: end position of each allocation
    cdef uint64_t *f_prev          # [num] fifo: pos_head before it (to roll back a cancel)
    cdef uint8_t *f_state          # [num] fifo: F_LIVE / F_DONE / F_CANCELLED
    cdef uint32_t *h_fifo          # [num] fifo counter of each head's allocation
    cdef uint32_t f_r, f_w         # fifo read / write counters
    cdef uint32_t n_loans          # loans handed out and not yet committed/cancelled

    def __cinit__(self, buffer, uint32_t num, uint64_t desc_off, uint64_t avail_off,
                  uint64_t used_off, uint64_t win_off, uint64_t win_size, *,
                  uint64_t features=0, int kick_fd=-1, int call_fd=-1, spin_ns=DEFAULT_SPIN_NS):
        self.mapped = _Mapped(buffer, "channel")
        _vrd_setup(&self.d, self.mapped, num, desc_off, avail_off, used_off, win_off, win_size,
                   features)
        self.win_off = win_off
        self.win_size = win_size
        self.f_head = <uint16_t *>PyMem_RawCalloc(num, sizeof(uint16_t))
        self.f_end = <uint64_t *>PyMem_RawCalloc(num, sizeof(uint64_t))
        self.f_prev = <uint64_t *>PyMem_RawCalloc(num, sizeof(uint64_t))
        self.f_state = <uint8_t *>PyMem_RawCalloc(num, 1)
        self.h_fifo = <uint32_t *>PyMem_RawCalloc(num, sizeof(uint32_t))
        if not (self.f_head and self.f_end and self.f_prev and self.f_state and self.h_fifo):
            raise MemoryError()
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.peer_fd = -1
        self.spin_ns = spin_ns

    def __dealloc__(self):
        _vrd_free(&self.d)
        PyMem_RawFree(self.f_head)
        PyMem_RawFree(self.f_end)
        PyMem_RawFree(self.f_prev)
        PyMem_RawFree(self.f_state)
        PyMem_RawFree(self.h_fifo)

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
    def in_flight(self): return self.f_w - self.f_r
    @property
    def bytes_in_flight(self): return self.pos_head - self.pos_tail
    @property
    def broken(self): return bool(self.d.broken)
    @property
    def avail_idx(self): return self.d.avail_idx
    @property
    def last_used_idx(self): return self.d.last_used_idx

    cdef inline int _reclaim(self) noexcept nogil:
        """Take back what the consumer completed; advance the allocation tail.
        <0 if the consumer broke the used ring."""
        cdef uint16_t head
        cdef uint32_t ln, i
        cdef uint64_t tok
        cdef int rc
        while True:
            rc = vrd_get_buf(&self.d, &head, &ln, &tok)
            if rc <= 0:
                break
            self.f_state[self.h_fifo[head] & self.d.mask] = F_DONE
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
        return rc

    cdef inline int _alloc(self, uint64_t size, uint64_t *off, uint16_t *head) noexcept nogil:
        """Reserve `size` contiguous arena bytes and a descriptor.
        0 = done, -ENOSPC = no room now, -EINVAL = used ring broken."""
        cdef uint64_t asz = _align_up(size if size else 1, ALLOC_ALIGN)
        cdef uint64_t p, o
        cdef uint32_t i
        if self._reclaim() < 0:
            return -EINVAL
        if self.d.num_free == 0:
            return -ENOSPC
        p = self.pos_head
        o = p % self.win_size
        if o + asz > self.win_size:
            p += self.win_size - o                 # skip the window's tail end
            o = 0
        if p + asz - self.pos_tail > self.win_size:
            return -ENOSPC
        head[0] = vrd_take(&self.d)
        i = self.f_w & self.d.mask
        self.f_head[i] = head[0]
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
        if self.h_fifo[head] + 1 == self.f_w:
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
        if vrd_kick_prepare(&self.d):
            _signal_fd(self.kick_fd)

    cdef int _wait_space(self, int64_t deadline) except -1:
        """1 = retry, 0 = timeout, 2 = consumer exited."""
        return _wait_ring(&self.d, _drv_pending, _drv_arm, _drv_disarm, self.call_fd,
                          self.peer_fd, deadline, self.spin_ns, self.check, 0.1, self.mapped)

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
            if not block:
                raise Full()
            if deadline == -2:
                deadline = _deadline(timeout)
            old_peer = self.peer_fd
            rc = self._wait_space(deadline)
            if rc == 0:
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
        """Take back completed messages now (normally done on demand)."""
        if not self.mapped.closing and self._reclaim() < 0:
            raise InvalidRing(EINVAL, _DRIVER_REASONS.get(self.d.err_reason, "ring broken")
                              .format(a=self.d.err_a, b=self.d.err_b), None)
        return self.f_w - self.f_r

    cdef inline bint _fits(self, uint64_t size) noexcept nogil:
        """Would _alloc(size) succeed now?  No side effects (call after _reclaim)."""
        cdef uint64_t asz = _align_up(size if size else 1, ALLOC_ALIGN)
        cdef uint64_t p = self.pos_head
        cdef uint64_t o
        if self.d.num_free == 0:
            return False
        o = p % self.win_size
        if o + asz > self.win_size:
            p += self.win_size - o
        return p + asz - self.pos_tail <= self.win_size

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
                            watched, deadline, self.spin_ns, self.check, 0.1, self.mapped)
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
                                watched, deadline, self.spin_ns, self.check, 0.1, self.mapped)
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

    cdef int _copy_out(self, uint8_t *dst, uint64_t total) except -1:
        """Copy the message _next put in self.riov to dst.  A big single
        segment is copied without the GIL, from a pointer taken before: the
        shared riov may be refilled by another thread meanwhile."""
        cdef const uint8_t *src
        if self.riov.used == 1 and total > 65536:
            src = self.h.base + self.riov.seg[0].off
            with nogil:
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
