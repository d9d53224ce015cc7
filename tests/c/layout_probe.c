/*
 * layout_probe.c - print the split-ring ABI as <linux/virtio_ring.h> defines it,
 * for tests/test_layout.py to compare with vringipc.layout and vringipc._ring.
 *
 * Output, one fact per line ("key value..."):
 *   sizeof_desc N, sizeof_used_elem N, sizeof_avail N, sizeof_used N
 *   off_desc_addr N, off_desc_len N, off_desc_flags N, off_desc_next N
 *   off_used_elem_id N, off_used_elem_len N
 *   flag NAME VALUE            (descriptor / ring flag and feature-bit values)
 *   ring NUM SIZE DESC AVAIL USED USED_EVENT AVAIL_EVENT   for align 4096,
 *        all offsets relative to the ring start as placed by vring_init
 * then, for every "event new old" triple read from stdin, "ne E N O R" with
 * R = vring_need_event(E, N, O).
 */
#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <linux/virtio_ring.h>

#define ALIGN 4096

int main(void)
{
    static const unsigned nums[] = {1, 2, 8, 256, 32768};
    printf("sizeof_desc %zu\n", sizeof(struct vring_desc));
    printf("sizeof_used_elem %zu\n", sizeof(struct vring_used_elem));
    printf("sizeof_avail %zu\n", sizeof(struct vring_avail));
    printf("sizeof_used %zu\n", sizeof(struct vring_used));
    printf("off_desc_addr %zu\n", offsetof(struct vring_desc, addr));
    printf("off_desc_len %zu\n", offsetof(struct vring_desc, len));
    printf("off_desc_flags %zu\n", offsetof(struct vring_desc, flags));
    printf("off_desc_next %zu\n", offsetof(struct vring_desc, next));
    printf("off_used_elem_id %zu\n", offsetof(struct vring_used_elem, id));
    printf("off_used_elem_len %zu\n", offsetof(struct vring_used_elem, len));
    printf("off_avail_idx %zu\n", offsetof(struct vring_avail, idx));
    printf("off_avail_ring %zu\n", offsetof(struct vring_avail, ring));
    printf("off_used_idx %zu\n", offsetof(struct vring_used, idx));
    printf("off_used_ring %zu\n", offsetof(struct vring_used, ring));
    printf("flag VRING_DESC_F_NEXT %u\n", (unsigned)VRING_DESC_F_NEXT);
    printf("flag VRING_DESC_F_WRITE %u\n", (unsigned)VRING_DESC_F_WRITE);
    printf("flag VRING_DESC_F_INDIRECT %u\n", (unsigned)VRING_DESC_F_INDIRECT);
    printf("flag VRING_USED_F_NO_NOTIFY %u\n", (unsigned)VRING_USED_F_NO_NOTIFY);
    printf("flag VRING_AVAIL_F_NO_INTERRUPT %u\n", (unsigned)VRING_AVAIL_F_NO_INTERRUPT);
    printf("flag VIRTIO_RING_F_INDIRECT_DESC %u\n", (unsigned)VIRTIO_RING_F_INDIRECT_DESC);
    printf("flag VIRTIO_RING_F_EVENT_IDX %u\n", (unsigned)VIRTIO_RING_F_EVENT_IDX);

    for (size_t k = 0; k < sizeof(nums) / sizeof(nums[0]); k++) {
        unsigned num = nums[k];
        size_t size = vring_size(num, ALIGN);
        /* Page-aligned like a segment's ring (vring_init assumes p is aligned). */
        void *p = aligned_alloc(ALIGN, (size + ALIGN - 1) / ALIGN * ALIGN);
        if (!p)
            return 2;
        struct vring vr;
        vring_init(&vr, num, p, ALIGN);
        uintptr_t b = (uintptr_t)p;
        printf("ring %u %zu %zu %zu %zu %zu %zu\n", num, size,
               (size_t)((uintptr_t)vr.desc - b), (size_t)((uintptr_t)vr.avail - b),
               (size_t)((uintptr_t)vr.used - b),
               (size_t)((uintptr_t)&vring_used_event(&vr) - b),
               (size_t)((uintptr_t)&vring_avail_event(&vr) - b));
        free(p);
    }

    unsigned e, n, o;
    while (scanf("%u %u %u", &e, &n, &o) == 3)
        printf("ne %u %u %u %d\n", e, n, o,
               vring_need_event((uint16_t)e, (uint16_t)n, (uint16_t)o) ? 1 : 0);
    return 0;
}
