# C declarations of the split-ring ABI (vr_abi.h) and of the atomics (vr_atomics.h).
# Nothing else lives here: the verbs are in vringh.pxi (device/host side) and
# vringd.pxi (driver/producer side).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "vr_abi.h" nogil:
    enum:
        VR_DESC_F_NEXT
        VR_DESC_F_WRITE
        VR_DESC_F_INDIRECT
        VR_USED_F_NO_NOTIFY
        VR_AVAIL_F_NO_INTERRUPT
        VR_F_INDIRECT_DESC
        VR_F_EVENT_IDX
        VR_F_VERSION_1
        VR_MAX_NUM

    struct vr_desc:
        uint64_t addr
        uint32_t len
        uint16_t flags
        uint16_t next

    struct vr_avail:
        uint16_t flags
        uint16_t idx
        uint16_t ring[1]

    struct vr_used_elem:
        uint32_t id
        uint32_t len

    struct vr_used:
        uint16_t flags
        uint16_t idx
        vr_used_elem ring[1]

    int vr_need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old)
    uint16_t *vr_used_event(vr_avail *avail, uint32_t num)
    uint16_t *vr_avail_event(vr_used *used, uint32_t num)
    size_t vr_abi_sizeof_desc()
    size_t vr_abi_sizeof_used_elem()

cdef extern from "vr_atomics.h" nogil:
    uint16_t vr_load_acquire_u16(const uint16_t *p)
    uint32_t vr_load_acquire_u32(const uint32_t *p)
    uint64_t vr_load_acquire_u64(const uint64_t *p)
    uint16_t vr_load_relaxed_u16(const uint16_t *p)
    uint32_t vr_load_relaxed_u32(const uint32_t *p)
    uint64_t vr_load_relaxed_u64(const uint64_t *p)
    void vr_store_release_u16(uint16_t *p, uint16_t v)
    void vr_store_release_u32(uint32_t *p, uint32_t v)
    void vr_store_release_u64(uint64_t *p, uint64_t v)
    void vr_store_relaxed_u16(uint16_t *p, uint16_t v)
    void vr_store_relaxed_u32(uint32_t *p, uint32_t v)
    void vr_store_relaxed_u64(uint64_t *p, uint64_t v)
    void vr_fence_sc()
    int vr_cas_u16(uint16_t *p, uint16_t expected, uint16_t desired)
    int vr_cas_u32(uint32_t *p, uint32_t expected, uint32_t desired)
    int vr_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired)
    uint32_t vr_fetch_add_u32(uint32_t *p, uint32_t v)
    uint64_t vr_fetch_add_u64(uint64_t *p, uint64_t v)
    void vr_cpu_relax()
    uint64_t vr_now_ns()
    uint64_t vr_now_coarse_ns()
