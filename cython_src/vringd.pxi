# vringd.pxi - the driver (producer) side of a split ring, modelled on Linux
# drivers/virtio/virtio_ring.c (virtqueue_add_split, detach_buf_split,
# virtqueue_kick_prepare_split, virtqueue_get_buf_ctx_split, *_cb_* ).
# Included by _ring.pyx.
#
# The driver's own bookkeeping (free list, chain links, per-head state) is kept
# in private memory, never in the shared descriptor table, so a hostile device
# writing over the ring cannot corrupt it.  The used ring is validated like
# Linux does (id >= num, id not an in-flight head, used idx jumping) and a
# violation marks the ring broken.

from libc.errno cimport ENOSPC

cdef enum:
    U_NONE = 0
    U_USED_JUMP         # used->idx moved by more than num
    U_USED_ID           # used element id >= num
    U_USED_NOT_HEAD     # used element id is not an in-flight head
    U_USED_LEN          # used length above the chain's writable bytes
    U_BROKEN            # already broken


cdef struct vrd_t:
    uint8_t *base           # this process's mapping of the segment
    uint32_t num
    uint32_t mask
    vr_desc *desc
    vr_avail *avail
    vr_used *used
    uint16_t *used_event    # avail->ring[num], written by us
    uint16_t *avail_event   # used->ring[num], written by the device
    uint64_t arena_lo       # addressable window [arena_lo, arena_hi)
    uint64_t arena_hi
    bint event_idx
    bint indirect           # negotiated and an indirect pool is configured
    bint broken
    uint16_t avail_idx      # shadow of avail->idx: next index to publish
    uint16_t published_idx  # avail->idx as last stored
    uint16_t kicked_idx     # avail idx at the last kick_prepare
    uint32_t num_added      # adds since the last kick_prepare
    uint16_t last_used_idx  # next used entry to reclaim
    uint16_t shadow_used_idx   # last used->idx observed with acquire
    uint16_t avail_flags    # shadow of avail->flags (NO_INTERRUPT = callbacks off)
    uint32_t free_head
    uint32_t num_free
    uint16_t *link          # [num] private: free-list link, or next desc of a chain
    uint16_t *ndesc         # [num] descriptors of the chain at this head (0 = not a head)
    uint32_t *wcap          # [num] writable bytes of the chain at this head
    uint64_t *token         # [num] caller's token for the chain at this head
    uint64_t ind_off        # indirect pool: table of head h at ind_off + h*ind_entries*16
    uint32_t ind_entries    # entries per table (0 = no pool)
    uint64_t slot_size      # slot mode: head h's buffer at arena_lo + h*slot_size
    int err_reason
    uint64_t err_a
    uint64_t err_b


cdef inline int vrd_fail(vrd_t *d, int reason, uint64_t a, uint64_t b) noexcept nogil:
    d.broken = True
    d.err_reason = reason
    d.err_a = a
    d.err_b = b
    return -EINVAL


cdef inline bint vrd_range_ok(vrd_t *d, uint64_t addr, uint64_t ln) noexcept nogil:
    return addr >= d.arena_lo and addr <= d.arena_hi and ln <= d.arena_hi - addr


cdef inline uint16_t vrd_take(vrd_t *d) noexcept nogil:
    cdef uint16_t hd = <uint16_t>d.free_head
    d.free_head = d.link[hd]
    d.num_free -= 1
    return hd


cdef inline void vrd_expose(vrd_t *d, uint16_t head, uint32_t wbytes, uint64_t tok) noexcept nogil:
    # Put head in the next avail slot.  Not yet visible: vrd_publish does that.
    d.wcap[head] = wbytes
    d.token[head] = tok
    vr_store_relaxed_u16(&d.avail.ring[d.avail_idx & d.mask], head)
    d.avail_idx += 1
    d.num_added += 1


cdef inline void vrd_publish(vrd_t *d) noexcept nogil:
    # Barrier A (release): descriptors, indirect tables, payload and avail ring
    # entries are visible before the new avail->idx; pairs with the device's
    # acquire load of avail->idx in vrh_get_head.
    if d.published_idx != d.avail_idx:
        vr_store_release_u16(&d.avail.idx, d.avail_idx)
        d.published_idx = d.avail_idx


cdef inline int vrd_add(vrd_t *d, const vr_seg *segs, uint32_t n_out, uint32_t n_in,
                        uint64_t tok) noexcept nogil:
    """virtqueue_add_split: expose n_out readable then n_in writable segments as
    one chain (an indirect table when negotiated and the chain has >1 segment).
    Returns the head, -ENOSPC when there are not enough free descriptors,
    -EINVAL for a segment outside the arena or an empty chain."""
    cdef uint32_t total = n_out + n_in
    cdef uint32_t k, i
    cdef uint64_t wbytes = 0
    cdef uint16_t head
    cdef vr_desc *table
    cdef uint16_t flags
    if d.broken:
        return -EINVAL
    if total == 0:
        return -EINVAL
    for k in range(total):
        if not vrd_range_ok(d, segs[k].off, segs[k].len):
            return -EINVAL
        if k >= n_out:
            wbytes += segs[k].len
    if wbytes > 0xffffffffu:
        return -EINVAL
    if d.indirect and total > 1 and total <= d.ind_entries:
        if d.num_free < 1:
            return -ENOSPC
        head = vrd_take(d)
        table = <vr_desc *>(d.base + d.ind_off + <uint64_t>head * d.ind_entries * sizeof(vr_desc))
        for k in range(total):
            flags = VR_DESC_F_WRITE if k >= n_out else 0
            if k + 1 < total:
                flags |= VR_DESC_F_NEXT
            table[k].addr = segs[k].off
            table[k].len = segs[k].len
            table[k].flags = flags
            table[k].next = <uint16_t>(k + 1) if k + 1 < total else 0
        d.desc[head].addr = d.ind_off + <uint64_t>head * d.ind_entries * sizeof(vr_desc)
        d.desc[head].len = total * sizeof(vr_desc)
        d.desc[head].flags = VR_DESC_F_INDIRECT
        d.desc[head].next = 0
        d.ndesc[head] = 1
    else:
        if d.num_free < total:
            return -ENOSPC
        head = <uint16_t>d.free_head
        i = head
        for k in range(total):
            flags = VR_DESC_F_WRITE if k >= n_out else 0
            d.desc[i].addr = segs[k].off
            d.desc[i].len = segs[k].len
            if k + 1 < total:
                d.desc[i].flags = flags | VR_DESC_F_NEXT
                d.desc[i].next = d.link[i]
            else:
                d.desc[i].flags = flags
                d.desc[i].next = 0
            i = d.link[i]
        d.free_head = i
        d.num_free -= total
        d.ndesc[head] = <uint16_t>total
    vrd_expose(d, head, <uint32_t>wbytes, tok)
    return head


cdef inline int vrd_add_slot(vrd_t *d, const uint8_t *src, uint32_t ln, bint writable,
                             uint64_t tok) noexcept nogil:
    """Slot mode: one descriptor whose buffer is the head's own arena slot
    (the virtio-net RX / rpmsg model).  Copies ln bytes of src in (if src).
    Returns the head or -ENOSPC / -EINVAL."""
    cdef uint16_t head
    cdef uint64_t off
    if d.broken or d.slot_size == 0 or ln > d.slot_size:
        return -EINVAL
    if d.num_free < 1:
        return -ENOSPC
    head = vrd_take(d)
    off = d.arena_lo + <uint64_t>head * d.slot_size
    if src != NULL:
        memcpy(d.base + off, src, ln)
    d.desc[head].addr = off
    d.desc[head].len = ln
    d.desc[head].flags = VR_DESC_F_WRITE if writable else 0
    d.desc[head].next = 0
    d.ndesc[head] = 1
    vrd_expose(d, head, ln if writable else 0, tok)
    return head


cdef inline bint vrd_kick_prepare(vrd_t *d) noexcept nogil:
    """virtqueue_kick_prepare_split: publish, then decide whether the device
    asked to be kicked for the entries added since the last call."""
    cdef uint16_t old, new
    cdef bint needs
    vrd_publish(d)
    # Barrier C (SC fence): our avail->idx store is visible before we read
    # avail_event / used->flags; pairs with the device's fence in
    # vrh_notify_enable between its avail_event store and avail->idx re-read.
    vr_fence_sc()
    old = d.kicked_idx
    new = d.avail_idx
    if d.event_idx:
        # vring_need_event sees a 16-bit window: after 65535 un-kicked adds
        # the window could alias, so kick unconditionally (as Linux does).
        needs = d.num_added >= 0xffff or vr_need_event(vr_load_relaxed_u16(d.avail_event), new, old)
    else:
        needs = not (vr_load_relaxed_u16(&d.used.flags) & VR_USED_F_NO_NOTIFY)
    d.kicked_idx = new
    d.num_added = 0
    return needs


cdef inline int vrd_get_buf(vrd_t *d, uint16_t *head, uint32_t *ln, uint64_t *tok) noexcept nogil:
    """virtqueue_get_buf: reclaim the next used chain.  1 = got one (head, len,
    token), 0 = none, <0 = the device broke the ring (see err_reason)."""
    cdef uint16_t u, hd, n, last
    cdef vr_used_elem e
    cdef uint32_t k
    if d.broken:
        d.err_reason = U_BROKEN
        return -EINVAL
    if d.last_used_idx == d.shadow_used_idx:
        # Barrier B (acquire): pairs with the device's release store of
        # used->idx in vrh_publish_used; used elements and data it wrote into
        # our writable buffers are read only after this.
        u = vr_load_acquire_u16(&d.used.idx)
        if u == d.last_used_idx:
            return 0
        # The device can only hand back chains we have exposed.
        if <uint16_t>(u - d.last_used_idx) > <uint16_t>(d.avail_idx - d.last_used_idx):
            return vrd_fail(d, U_USED_JUMP, d.last_used_idx, u)
        d.shadow_used_idx = u
    memcpy(&e, &d.used.ring[d.last_used_idx & d.mask], sizeof(vr_used_elem))
    if e.id >= d.num:
        return vrd_fail(d, U_USED_ID, e.id, d.num)
    hd = <uint16_t>e.id
    if d.ndesc[hd] == 0:
        return vrd_fail(d, U_USED_NOT_HEAD, e.id, 0)
    if e.len > d.wcap[hd]:
        return vrd_fail(d, U_USED_LEN, e.len, d.wcap[hd])
    head[0] = hd
    ln[0] = e.len
    tok[0] = d.token[hd]
    # detach_buf_split: return the chain's descriptors to the free list.
    n = d.ndesc[hd]
    last = hd
    for k in range(1, n):
        last = d.link[last]
    d.link[last] = <uint16_t>d.free_head
    d.free_head = hd
    d.num_free += n
    d.ndesc[hd] = 0
    d.last_used_idx += 1
    if d.event_idx and not (d.avail_flags & VR_AVAIL_F_NO_INTERRUPT):
        # Callbacks on: ask for an interrupt on the next entry.  Store then SC
        # fence (virtio_store_mb, barrier D) so the device's need_notify sees it
        # before we re-read used->idx.
        vr_store_relaxed_u16(d.used_event, d.last_used_idx)
        vr_fence_sc()
    return 1


cdef inline void vrd_disable_cb(vrd_t *d) noexcept nogil:
    """virtqueue_disable_cb: we are polling, the device need not call us."""
    d.avail_flags |= VR_AVAIL_F_NO_INTERRUPT
    if d.event_idx:
        # An event index just behind us is crossed only after 65535 more
        # completions (Linux writes 0 here and calls it a hack).
        vr_store_relaxed_u16(d.used_event, <uint16_t>(d.last_used_idx - 1))
    else:
        vr_store_relaxed_u16(&d.avail.flags, d.avail_flags)


cdef inline uint16_t vrd_enable_cb_prepare(vrd_t *d) noexcept nogil:
    d.avail_flags &= ~VR_AVAIL_F_NO_INTERRUPT
    if d.event_idx:
        vr_store_relaxed_u16(d.used_event, d.last_used_idx)
    else:
        vr_store_relaxed_u16(&d.avail.flags, d.avail_flags)
    return d.last_used_idx


cdef inline bint vrd_poll(vrd_t *d, uint16_t last) noexcept nogil:
    """virtqueue_poll: True if used entries arrived after `last`."""
    # Barrier D (SC fence): the used_event / avail->flags store of
    # enable_cb_prepare is visible before we re-read used->idx; pairs with the
    # device's fence in vrh_need_notify after its used->idx store.
    vr_fence_sc()
    return vr_load_acquire_u16(&d.used.idx) != last


cdef inline bint vrd_enable_cb(vrd_t *d) noexcept nogil:
    """virtqueue_enable_cb: True = nothing pending, safe to sleep on the call fd;
    False = used buffers arrived meanwhile."""
    return not vrd_poll(d, vrd_enable_cb_prepare(d))


cdef inline bint vrd_enable_cb_delayed(vrd_t *d) noexcept nogil:
    """virtqueue_enable_cb_delayed: ask for a call only after ~3/4 of the
    outstanding buffers are used.  Same return as vrd_enable_cb."""
    cdef uint16_t outstanding = <uint16_t>(d.avail_idx - d.last_used_idx)
    cdef uint16_t bufs = <uint16_t>((outstanding * 3) // 4)
    d.avail_flags &= ~VR_AVAIL_F_NO_INTERRUPT
    if d.event_idx:
        vr_store_relaxed_u16(d.used_event, <uint16_t>(d.last_used_idx + bufs))
    else:
        vr_store_relaxed_u16(&d.avail.flags, d.avail_flags)
    # Barrier D, as in vrd_poll.
    vr_fence_sc()
    if <uint16_t>(vr_load_acquire_u16(&d.used.idx) - d.last_used_idx) > bufs:
        return False
    return True


cdef inline bint vrd_used_pending(vrd_t *d) noexcept nogil:
    if d.last_used_idx != d.shadow_used_idx:
        return True
    return vr_load_relaxed_u16(&d.used.idx) != d.last_used_idx
