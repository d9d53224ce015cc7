# vringh.pxi - the device (consumer, "host") side of a split ring, modelled on
# Linux drivers/vhost/vringh.c.  Included by _ring.pyx.
#
# Every function here is a small nogil verb over a vrh_t.  The ring lives in
# shared memory written by a producer we do not trust: every index, length,
# address and chain read from it is validated, every descriptor is copied once
# into private memory before it is looked at (no double fetch), and every walk
# is bounded.  Return convention (as vringh): 1 = got one, 0 = empty,
# <0 = -errno.  On error vrh_t.err_ring tells an invalid ring (nothing consumed,
# ring unusable until reset) from an invalid descriptor (entry consumed; the
# caller may complete it with length 0 and carry on); err_reason/err_a/err_b
# say what was wrong.

from libc.errno cimport EINVAL, ELOOP, EPROTO, EMSGSIZE, E2BIG, ENOMEM
from libc.string cimport memcpy, memmove, memset
from cpython.mem cimport PyMem_RawMalloc, PyMem_RawRealloc, PyMem_RawFree

# Why a ring or descriptor was rejected; messages are in _ring.pyx REASONS.
cdef enum:
    R_NONE = 0
    R_HEAD_RANGE        # avail ring names a head >= num                  (ring)
    R_AVAIL_JUMP        # avail idx moved by more than num                (ring)
    R_HEAD_BUSY         # head offered again while still in flight        (ring)
    R_BROKEN            # ring already marked broken                      (ring)
    D_NEXT_RANGE        # next >= size of its table
    D_LOOP              # more descriptors visited than the table holds
    D_ADDR              # buffer outside the arena or wrapping
    D_R_AFTER_W         # readable descriptor after a writable one
    D_NO_RIOV           # readable descriptor, caller gave no riov
    D_NO_WIOV           # writable descriptor, caller gave no wiov
    D_MSGSIZE           # chain total above max_msg
    D_IND_NOFEAT        # INDIRECT without VIRTIO_RING_F_INDIRECT_DESC
    D_IND_LEN           # indirect table length 0 or not a multiple of 16
    D_IND_BIG           # indirect table of more than num entries
    D_IND_ADDR          # indirect table outside the arena or misaligned
    D_IND_NESTED        # INDIRECT inside an indirect table
    D_IOV_MAX           # more than max_iov segments
    D_NOMEM             # could not grow the iovec


cdef struct vr_seg:
    uint64_t off        # segment offset of the bytes (validated)
    uint32_t len


cdef struct vr_iov:
    vr_seg *seg         # segments, grown by doubling up to the host's max_iov
    uint32_t used       # segments filled by getdesc
    uint32_t cap        # segments allocated
    uint32_t i          # pull/push cursor: current segment
    uint32_t consumed   # pull/push cursor: bytes consumed of seg[i]
    uint64_t total      # sum of seg[].len


cdef struct vrh_t:
    uint8_t *base           # this process's mapping of the segment
    uint32_t num            # ring size, power of two, 1..32768
    uint32_t mask           # num - 1
    vr_desc *desc
    vr_avail *avail
    vr_used *used
    uint16_t *used_event    # avail->ring[num], written by the driver
    uint16_t *avail_event   # used->ring[num], written by us
    uint64_t arena_lo       # addressable window [arena_lo, arena_hi)
    uint64_t arena_hi
    bint event_idx          # VIRTIO_RING_F_EVENT_IDX negotiated
    bint indirect           # VIRTIO_RING_F_INDIRECT_DESC negotiated
    bint trusted            # skip address range checks (the vringh _kern form)
    bint broken             # an invalid-ring error was seen: refuse until reset
    uint16_t last_avail_idx # next avail entry to consume
    uint16_t shadow_avail_idx  # last avail->idx observed with acquire
    uint16_t last_used_idx  # used idx at the last need_notify
    uint32_t completed      # completions since the last need_notify
    uint64_t max_msg        # max total bytes of one chain
    uint32_t max_iov        # max segments of one chain (each direction)
    uint8_t *inflight       # [num] 1 while a head is fetched and not completed
    uint32_t *wcap          # [num] writable capacity of each in-flight head
    uint16_t *fetched       # [num] head fetched from avail slot (idx & mask)
    uint16_t *fetch_pos     # [num] avail index at which each in-flight head was fetched
    uint32_t n_inflight
    int err_ring            # last error was an invalid ring
    int err_reason          # R_* / D_* of the last error
    uint64_t err_a          # details for the message
    uint64_t err_b


cdef inline void vrh_iov_rewind(vr_iov *iov) noexcept nogil:
    iov.used = 0
    iov.i = 0
    iov.consumed = 0
    iov.total = 0


cdef inline int vrh_fail(vrh_t *h, int err, int reason, uint64_t a, uint64_t b, bint ring) noexcept nogil:
    h.err_ring = ring
    h.err_reason = reason
    h.err_a = a
    h.err_b = b
    if ring:
        h.broken = True
    return -err


cdef inline int vrh_iov_append(vrh_t *h, vr_iov *iov, uint64_t off, uint32_t ln) noexcept nogil:
    cdef uint32_t ncap
    cdef vr_seg *p
    if iov.used >= h.max_iov:
        # checked against the host's cap, not the array size: an iov reused
        # from a host with a larger cap may already be bigger
        return vrh_fail(h, E2BIG, D_IOV_MAX, h.max_iov, 0, False)
    if iov.used == iov.cap:
        ncap = iov.cap * 2 if iov.cap else 8
        if ncap > h.max_iov:
            ncap = h.max_iov
        p = <vr_seg *>PyMem_RawRealloc(iov.seg, ncap * sizeof(vr_seg))
        if p == NULL:
            return vrh_fail(h, ENOMEM, D_NOMEM, ncap, 0, False)
        iov.seg = p
        iov.cap = ncap
    iov.seg[iov.used].off = off
    iov.seg[iov.used].len = ln
    iov.used += 1
    iov.total += ln
    return 0


cdef inline bint vrh_range_ok(vrh_t *h, uint64_t addr, uint64_t ln) noexcept nogil:
    # The getrange idea with one range, the arena: [addr, addr+len) must lie in
    # [arena_lo, arena_hi).  Written without addr+len so it cannot wrap.  A
    # zero-length buffer is an empty segment; its addr must still be in range
    # and it is never "expanded" (vringh's addr 0 / len 0 quirk).
    if h.trusted:
        return True
    return addr >= h.arena_lo and addr <= h.arena_hi and ln <= h.arena_hi - addr


cdef inline int vrh_get_head(vrh_t *h, uint16_t *head) noexcept nogil:
    """Take the next head from the avail ring.  1 = got it, 0 = empty,
    <0 = invalid ring (nothing consumed)."""
    cdef uint16_t avail_idx, hd
    if h.broken:
        return vrh_fail(h, EINVAL, R_BROKEN, 0, 0, True)
    if h.last_avail_idx == h.shadow_avail_idx:
        # Barrier A (acquire): pairs with the driver's release store of
        # avail->idx in vrd_publish; the ring entries, descriptors and payload
        # it exposes are read only after this load.
        avail_idx = vr_load_acquire_u16(&h.avail.idx)
        if avail_idx == h.last_avail_idx:
            return 0
        # vhost's check that vringh lacks: the driver may never expose more
        # than num entries nor move the index backwards.
        if <uint16_t>(avail_idx - h.last_avail_idx) > h.num:
            return vrh_fail(h, EINVAL, R_AVAIL_JUMP, h.last_avail_idx, avail_idx, True)
        h.shadow_avail_idx = avail_idx
    hd = vr_load_relaxed_u16(&h.avail.ring[h.last_avail_idx & h.mask])
    if hd >= h.num:
        return vrh_fail(h, EINVAL, R_HEAD_RANGE, hd, h.num, True)
    if h.inflight[hd]:
        return vrh_fail(h, EINVAL, R_HEAD_BUSY, hd, 0, True)
    h.fetched[h.last_avail_idx & h.mask] = hd
    h.fetch_pos[hd] = h.last_avail_idx
    h.last_avail_idx += 1
    h.inflight[hd] = 1
    h.wcap[hd] = 0
    h.n_inflight += 1
    head[0] = hd
    return 1


cdef inline int vrh_walk(vrh_t *h, uint16_t head, vr_iov *riov, vr_iov *wiov) noexcept nogil:
    """Walk the chain at `head` into riov (readable) and wiov (writable).

    Bounds: at most num descriptors of the main table are visited (every one,
    INDIRECT ones included, so an INDIRECT|NEXT cycle is a loop like any other),
    at most len/16 <= num per indirect table, and every table entry becomes a
    segment, capped by max_iov.  So any input finishes in O(num + max_iov)."""
    cdef vr_desc d
    cdef const vr_desc *table = h.desc
    cdef uint32_t table_size = h.num
    cdef uint32_t i = head
    cdef uint32_t count = 0         # main-table descriptors visited
    cdef uint32_t icount = 0        # entries visited in the current indirect table
    cdef bint in_indirect = False
    cdef bint resume = False        # INDIRECT|NEXT: continue in the main table after it
    cdef uint32_t resume_next = 0
    cdef uint64_t total = 0
    cdef vr_iov *target
    cdef int rc
    if riov != NULL:
        vrh_iov_rewind(riov)
    if wiov != NULL:
        vrh_iov_rewind(wiov)
    while True:
        if in_indirect:
            icount += 1
            if icount > table_size:
                return vrh_fail(h, ELOOP, D_LOOP, table_size, head, False)
        else:
            count += 1
            if count > h.num:
                return vrh_fail(h, ELOOP, D_LOOP, h.num, head, False)
        # One copy of the descriptor; everything below looks at the copy only.
        memcpy(&d, &table[i], sizeof(vr_desc))
        if d.flags & VR_DESC_F_INDIRECT:
            if in_indirect:
                return vrh_fail(h, EINVAL, D_IND_NESTED, i, head, False)
            if not h.indirect:
                return vrh_fail(h, EINVAL, D_IND_NOFEAT, i, head, False)
            if d.len == 0 or d.len % sizeof(vr_desc) != 0:
                return vrh_fail(h, EINVAL, D_IND_LEN, d.len, head, False)
            if d.len // sizeof(vr_desc) > h.num:
                return vrh_fail(h, E2BIG, D_IND_BIG, d.len // sizeof(vr_desc), h.num, False)
            if (d.addr % sizeof(vr_desc)) != 0 or not vrh_range_ok(h, d.addr, d.len):
                return vrh_fail(h, EINVAL, D_IND_ADDR, d.addr, d.len, False)
            # The WRITE flag of an indirect descriptor is ignored (spec: device MUST ignore).
            if d.flags & VR_DESC_F_NEXT:
                if d.next >= h.num:
                    return vrh_fail(h, EINVAL, D_NEXT_RANGE, d.next, h.num, False)
                resume = True
                resume_next = d.next
            table = <const vr_desc *>(h.base + d.addr)
            table_size = d.len // sizeof(vr_desc)
            in_indirect = True
            icount = 0
            i = 0
            continue
        if d.flags & VR_DESC_F_WRITE:
            if wiov == NULL:
                return vrh_fail(h, EPROTO, D_NO_WIOV, i, head, False)
            target = wiov
        else:
            if wiov != NULL and wiov.used:
                return vrh_fail(h, EINVAL, D_R_AFTER_W, i, head, False)
            if riov == NULL:
                return vrh_fail(h, EPROTO, D_NO_RIOV, i, head, False)
            target = riov
        if not vrh_range_ok(h, d.addr, d.len):
            return vrh_fail(h, EINVAL, D_ADDR, d.addr, d.len, False)
        total += d.len
        if total > h.max_msg:
            return vrh_fail(h, EMSGSIZE, D_MSGSIZE, total, h.max_msg, False)
        rc = vrh_iov_append(h, target, d.addr, d.len)
        if rc < 0:
            return rc
        if d.flags & VR_DESC_F_NEXT:
            if d.next >= table_size:
                return vrh_fail(h, EINVAL, D_NEXT_RANGE, d.next, table_size, False)
            i = d.next
        elif in_indirect and resume:
            in_indirect = False
            resume = False
            table = h.desc
            table_size = h.num
            i = resume_next
        else:
            break
    if wiov != NULL:
        h.wcap[head] = <uint32_t>wiov.total if wiov.total < 0xffffffffu else 0xffffffffu
    return 1


cdef inline int vrh_getdesc(vrh_t *h, vr_iov *riov, vr_iov *wiov, uint16_t *head) noexcept nogil:
    """vringh_getdesc: 1 = chain in riov/wiov and *head, 0 = empty, <0 = error.
    On an invalid ring *head == num; on an invalid descriptor *head is the
    consumed head (still in flight: complete it or abandon it)."""
    cdef int rc
    head[0] = <uint16_t>h.num if h.num < 0x10000 else 0
    rc = vrh_get_head(h, head)
    if rc <= 0:
        head[0] = <uint16_t>h.num if h.num < 0x10000 else 0
        return rc
    return vrh_walk(h, head[0], riov, wiov)


cdef inline int vrh_abandon(vrh_t *h, uint32_t n) noexcept nogil:
    """Give back the last n fetched chains; the next getdesc returns them again.
    -EINVAL if fewer than n of the most recent fetches are still in flight."""
    cdef uint32_t k
    cdef uint16_t hd
    if n > h.n_inflight:
        return -EINVAL
    for k in range(1, n + 1):
        hd = h.fetched[<uint16_t>(h.last_avail_idx - k) & h.mask]
        # the head must still be in flight from THIS fetch (a completed head
        # may have been reused and fetched again later)
        if not h.inflight[hd] or h.fetch_pos[hd] != <uint16_t>(h.last_avail_idx - k):
            return -EINVAL
    for k in range(1, n + 1):
        hd = h.fetched[<uint16_t>(h.last_avail_idx - k) & h.mask]
        h.inflight[hd] = 0
    h.n_inflight -= n
    h.last_avail_idx -= <uint16_t>n
    # avail_event is deliberately left alone (vringh: only updated when we
    # want to be notified).
    return 0


cdef inline void vrh_put_used(vrh_t *h, uint32_t idx, uint32_t head, uint32_t ln) noexcept nogil:
    cdef vr_used_elem *e = &h.used.ring[idx & h.mask]
    e.id = head
    e.len = ln


cdef inline int vrh_check_complete(vrh_t *h, uint32_t head, uint32_t ln) noexcept nogil:
    if head >= h.num or h.inflight[head] != 1:
        return -EINVAL
    if ln > h.wcap[head]:
        return -EMSGSIZE
    return 0


cdef inline void vrh_publish_used(vrh_t *h, uint32_t n) noexcept nogil:
    # Barrier B (release): the used elements and the bytes we pushed into
    # writable buffers are visible before the new used->idx; pairs with the
    # driver's acquire load of used->idx in vrd_get_buf.
    vr_store_release_u16(&h.used.idx, <uint16_t>(h.last_used_idx + h.completed + n))
    h.completed += n


cdef inline int vrh_complete(vrh_t *h, uint32_t head, uint32_t ln) noexcept nogil:
    """vringh_complete: hand one chain back with `ln` bytes written.
    -EINVAL if head is not in flight, -EMSGSIZE if ln exceeds its writable bytes."""
    cdef int rc = vrh_check_complete(h, head, ln)
    if rc < 0:
        return rc
    vrh_put_used(h, <uint16_t>(h.last_used_idx + h.completed), head, ln)
    h.inflight[head] = 0
    h.n_inflight -= 1
    vrh_publish_used(h, 1)
    return 0


cdef inline int vrh_complete_multi(vrh_t *h, const vr_used_elem *elems, uint32_t n) noexcept nogil:
    """vringh_complete_multi: n completions, one index update, wrapping the end
    of the used ring.  Everything is validated first (each head in flight,
    listed once, length within its writable bytes), so an error writes nothing."""
    cdef uint32_t k, j, hd
    cdef int rc = 0
    cdef uint16_t start
    if n > h.n_inflight:
        return -EINVAL
    for k in range(n):
        hd = elems[k].id
        if hd >= h.num or h.inflight[hd] != 1:   # 2 = already listed in this batch
            rc = -EINVAL
            break
        if elems[k].len > h.wcap[hd]:
            rc = -EMSGSIZE
            break
        h.inflight[hd] = 2
    if rc < 0:
        for j in range(k):
            h.inflight[elems[j].id] = 1
        return rc
    start = <uint16_t>(h.last_used_idx + h.completed)
    for k in range(n):
        vrh_put_used(h, <uint16_t>(start + k), elems[k].id, elems[k].len)
        h.inflight[elems[k].id] = 0
    h.n_inflight -= n
    vrh_publish_used(h, n)
    return 0


cdef inline int vrh_need_notify(vrh_t *h) noexcept nogil:
    """vringh_need_notify: 1 if the driver asked to be told about the
    completions since the last call, else 0."""
    cdef bint notify
    cdef uint16_t used_event, flags
    # Barrier D (SC fence): our used->idx store must be visible before we read
    # the driver's used_event / avail->flags; pairs with the fence the driver
    # executes in enable_cb after writing them (vrd_poll).
    vr_fence_sc()
    if not h.event_idx:
        flags = vr_load_relaxed_u16(&h.avail.flags)
        return 0 if (flags & VR_AVAIL_F_NO_INTERRUPT) else 1
    used_event = vr_load_relaxed_u16(h.used_event)
    if h.completed > 0xffff:
        # vring_need_event only sees a 16-bit window: so many completions that
        # the index may have lapped the event: notify to be safe.
        notify = True
    else:
        notify = vr_need_event(used_event, <uint16_t>(h.last_used_idx + h.completed),
                               h.last_used_idx)
    h.last_used_idx = <uint16_t>(h.last_used_idx + h.completed)
    h.completed = 0
    return 1 if notify else 0


cdef inline bint vrh_notify_enable(vrh_t *h) noexcept nogil:
    """vringh_notify_enable: ask for a kick on the next add.  True = the ring is
    still empty, safe to sleep; False = buffers arrived meanwhile, keep going."""
    cdef uint16_t avail_idx
    if not h.event_idx:
        vr_store_relaxed_u16(&h.used.flags, 0)
    else:
        vr_store_relaxed_u16(h.avail_event, h.last_avail_idx)
    # Barrier C (SC fence): the flag/avail_event store is visible before we
    # re-read avail->idx; pairs with the fence in the driver's kick_prepare
    # between its avail->idx store and its avail_event load.
    vr_fence_sc()
    avail_idx = vr_load_acquire_u16(&h.avail.idx)
    return avail_idx == h.last_avail_idx


cdef inline void vrh_notify_disable(vrh_t *h) noexcept nogil:
    """vringh_notify_disable: with EVENT_IDX a no-op (the stale avail_event
    costs at most one more kick); otherwise set VRING_USED_F_NO_NOTIFY."""
    if not h.event_idx:
        vr_store_relaxed_u16(&h.used.flags, VR_USED_F_NO_NOTIFY)


cdef inline bint vrh_avail_pending(vrh_t *h) noexcept nogil:
    """Cheap poll for the spin loop: has the driver published anything new?"""
    if h.last_avail_idx != h.shadow_avail_idx:
        return True
    return vr_load_relaxed_u16(&h.avail.idx) != h.last_avail_idx


cdef inline uint64_t vrh_iov_pull(vr_iov *iov, const uint8_t *base, uint8_t *dst, uint64_t n) noexcept nogil:
    """vringh_iov_pull: copy up to n bytes from the chain, advancing the cursor.
    Returns bytes copied (0 once exhausted)."""
    cdef uint64_t done = 0, part
    cdef vr_seg *s
    while done < n and iov.i < iov.used:
        s = &iov.seg[iov.i]
        part = s.len - iov.consumed
        if part > n - done:
            part = n - done
        if dst != NULL:
            # memmove: the destination may be a view of the same shared memory
            memmove(dst + done, base + s.off + iov.consumed, part)
        done += part
        iov.consumed += <uint32_t>part
        if iov.consumed == s.len:
            iov.i += 1
            iov.consumed = 0
    # Skip trailing empty segments so `i == used` means exhausted.
    while iov.i < iov.used and iov.seg[iov.i].len == 0:
        iov.i += 1
    return done


cdef inline uint64_t vrh_iov_push(vr_iov *iov, uint8_t *base, const uint8_t *src, uint64_t n) noexcept nogil:
    """vringh_iov_push: copy up to n bytes into the chain's writable space."""
    cdef uint64_t done = 0, part
    cdef vr_seg *s
    while done < n and iov.i < iov.used:
        s = &iov.seg[iov.i]
        part = s.len - iov.consumed
        if part > n - done:
            part = n - done
        memmove(base + s.off + iov.consumed, src + done, part)   # src may alias the segment
        done += part
        iov.consumed += <uint32_t>part
        if iov.consumed == s.len:
            iov.i += 1
            iov.consumed = 0
    while iov.i < iov.used and iov.seg[iov.i].len == 0:
        iov.i += 1
    return done
