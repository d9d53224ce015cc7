/*
 * vr_atomics.h - the only way vringipc touches shared ring indices and flags.
 *
 * Every index/flag in the shared segment has exactly one writer (the virtio
 * split-ring rule), so no read-modify-write is ever needed: loads, stores and
 * fences suffice.  All accesses are naturally aligned single loads/stores via
 * the GCC/Clang __atomic builtins, which implement the C11 memory model.
 *
 * The pairings (names follow VRING_NOTES.md section 2.1):
 *   A  driver publishes avail->idx with RELEASE  <->  device loads it with ACQUIRE
 *   B  device publishes used->idx  with RELEASE  <->  driver loads it with ACQUIRE
 *   C  driver kick_prepare   store avail->idx; SC fence; load avail_event/used->flags
 *      device notify_enable  store avail_event/used->flags; SC fence; load avail->idx
 *   D  device need_notify    store used->idx; SC fence; load used_event/avail->flags
 *      driver enable_cb      store used_event/avail->flags; SC fence; load used->idx
 * C and D are Dekker pairs: with a seq_cst fence on both sides at least one side
 * sees the other's store, so a wake-up can never be lost.  A release store
 * followed by a relaxed load is NOT ordered (not in C11, not on x86), which is
 * why the fence is explicit and must never be dropped.
 */
#ifndef VRINGIPC_ATOMICS_H
#define VRINGIPC_ATOMICS_H

#include <stdint.h>
#include <time.h>

#if !defined(__GNUC__) && !defined(__clang__)
#error "vringipc needs the GCC/Clang __atomic builtins"
#endif
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtio 1.x rings are little-endian; big-endian hosts are not supported"
#endif

/* Acquire loads: the index read happens-before every read of the entries it exposes. */
static inline uint16_t vr_load_acquire_u16(const volatile uint16_t *p)
{ return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t vr_load_acquire_u32(const volatile uint32_t *p)
{ return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t vr_load_acquire_u64(const volatile uint64_t *p)
{ return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

/* Relaxed loads: single, untorn reads of fields whose ordering is given by a
 * surrounding acquire load or SC fence (ring entries, event indices, flags). */
static inline uint16_t vr_load_relaxed_u16(const volatile uint16_t *p)
{ return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline uint32_t vr_load_relaxed_u32(const volatile uint32_t *p)
{ return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline uint64_t vr_load_relaxed_u64(const volatile uint64_t *p)
{ return __atomic_load_n(p, __ATOMIC_RELAXED); }

/* Release stores: every earlier write (descriptors, payload, ring entries)
 * becomes visible before the new index. */
static inline void vr_store_release_u16(volatile uint16_t *p, uint16_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void vr_store_release_u32(volatile uint32_t *p, uint32_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void vr_store_release_u64(volatile uint64_t *p, uint64_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static inline void vr_store_relaxed_u16(volatile uint16_t *p, uint16_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void vr_store_relaxed_u32(volatile uint32_t *p, uint32_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline void vr_store_relaxed_u64(volatile uint64_t *p, uint64_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELAXED); }

/* The StoreLoad barrier of pairs C and D (virtio_mb).  Both sides use it. */
static inline void vr_fence_sc(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* Compare-and-swap for the few multi-writer words outside the rings
 * (cross-process locks and liveness in the segment header). */
static inline int vr_cas_u16(volatile uint16_t *p, uint16_t expected, uint16_t desired)
{
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline int vr_cas_u32(volatile uint32_t *p, uint32_t expected, uint32_t desired)
{
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline int vr_cas_u64(volatile uint64_t *p, uint64_t expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline uint32_t vr_fetch_add_u32(volatile uint32_t *p, uint32_t v)
{ return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }
static inline uint64_t vr_fetch_add_u64(volatile uint64_t *p, uint64_t v)
{ return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }

/* Polite busy-wait hint for spin loops (frees the sibling hyperthread). */
static inline void vr_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

static inline uint64_t vr_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The same clock at tick resolution (1-4 ms) for a few ns: for caches that
 * only ask "was this checked within the last N ms". */
static inline uint64_t vr_now_coarse_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#endif /* VRINGIPC_ATOMICS_H */
