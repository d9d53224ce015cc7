/*
 * vr_abi.h - the split-ring structures, byte-identical to <linux/virtio_ring.h>.
 *
 * Defined here (not included from the kernel header) so the extension also
 * builds where that header is absent; tests/test_layout.py compiles a C program
 * against /usr/include/linux/virtio_ring.h and checks every size and offset
 * against these definitions and vringipc/layout.py.
 *
 * Ring layout for num entries, as vring_init(num, align):
 *   desc  : struct vr_desc[num]                          (16-byte aligned)
 *   avail : u16 flags, u16 idx, u16 ring[num], u16 used_event
 *   pad   : to `align`
 *   used  : u16 flags, u16 idx, struct vr_used_elem ring[num], u16 avail_event
 */
#ifndef VRINGIPC_ABI_H
#define VRINGIPC_ABI_H

#include <stdint.h>
#include <stddef.h>

#define VR_DESC_F_NEXT        1u
#define VR_DESC_F_WRITE       2u
#define VR_DESC_F_INDIRECT    4u
#define VR_USED_F_NO_NOTIFY   1u
#define VR_AVAIL_F_NO_INTERRUPT 1u

#define VR_F_INDIRECT_DESC    28
#define VR_F_EVENT_IDX        29
#define VR_F_VERSION_1        32

#define VR_MAX_NUM            32768u

struct vr_desc {
    uint64_t addr;   /* byte offset into the segment (only the arena is addressable) */
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vr_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];  /* [num], then u16 used_event */
};

struct vr_used_elem {
    uint32_t id;
    uint32_t len;
};

struct vr_used {
    uint16_t flags;
    uint16_t idx;
    struct vr_used_elem ring[];  /* [num], then u16 avail_event */
};

_Static_assert(sizeof(struct vr_desc) == 16, "vring_desc is 16 bytes");
_Static_assert(offsetof(struct vr_desc, len) == 8, "vring_desc.len at 8");
_Static_assert(offsetof(struct vr_desc, flags) == 12, "vring_desc.flags at 12");
_Static_assert(offsetof(struct vr_desc, next) == 14, "vring_desc.next at 14");
_Static_assert(sizeof(struct vr_avail) == 4, "vring_avail header is 4 bytes");
_Static_assert(sizeof(struct vr_used_elem) == 8, "vring_used_elem is 8 bytes");
_Static_assert(sizeof(struct vr_used) == 4, "vring_used header is 4 bytes");

/* vring_need_event: true iff event_idx lies in [old, new_idx) mod 2^16,
 * i.e. the index has just moved past the peer's requested event. */
static inline int vr_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old);
}

static inline uint16_t *vr_used_event(struct vr_avail *avail, uint32_t num)
{ return &avail->ring[num]; }
static inline uint16_t *vr_avail_event(struct vr_used *used, uint32_t num)
{ return (uint16_t *)&used->ring[num]; }

/* Sizes of the three parts, for the layout test. */
static inline size_t vr_abi_sizeof_desc(void) { return sizeof(struct vr_desc); }
static inline size_t vr_abi_sizeof_used_elem(void) { return sizeof(struct vr_used_elem); }

#endif /* VRINGIPC_ABI_H */
