/*
 * vr_lock.h - the robust cross-process lock of a Queue side.
 *
 * One 64-bit word in shared memory (8-byte aligned):
 *
 *     bits  0-29  owner thread id (0 = free)
 *     bit   31    WAITERS: someone may sleep on the futex, unlock must wake
 *     bits 32-63  owner thread's start time (clock ticks since boot, low 32
 *                 bits of /proc/<tid>/stat field 22; 0 = unknown)
 *
 * Identity is (tid, start time), set and cleared by one CAS, so a thread id
 * that the kernel hands out again is never mistaken for the dead owner: the
 * new thread's start time differs.  Waiters sleep with FUTEX_WAIT on the low
 * half (shared futex: no FUTEX_PRIVATE_FLAG, the word is in a MAP_SHARED
 * mapping), in slices bounded by the caller so that it can check signals, its
 * deadline and close() between them, and so that a dead owner -- which wakes
 * nobody -- is noticed within one slice.  Every change of the word is a CAS
 * or an exchange: a repair can never overwrite an owner it did not see.
 *
 * Thread ids are only meaningful inside one PID namespace; the queue records
 * the creator's namespace and refuses peers from another one (queue core).
 *
 * Memory ordering: acquiring is a CAS with acquire semantics (vr_cas_u64 is
 * ACQ_REL), releasing an exchange with release semantics: everything written
 * in the critical section happens-before the next owner's reads.
 */
#ifndef VRINGIPC_LOCK_H
#define VRINGIPC_LOCK_H

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vr_atomics.h"

#define VR_LOCK_TID_MASK 0x3fffffffull
#define VR_LOCK_WAITERS  0x80000000ull

/* How often a waiter looks at the owner's liveness while it sleeps. */
#define VR_LOCK_LIVENESS_NS 10000000ll

/* -- the owner identity of the calling thread, cached per thread ---------- */

static __thread uint64_t vr_lock_me_cache;

/* Parse /proc/<tid>/stat: state letter and start time (field 22). */
static int vr_proc_stat(uint32_t tid, char *state, uint64_t *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%u/stat", tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')');            /* comm may contain spaces and parens */
    if (!p || p[1] != ' ')
        return -1;
    *state = p[2];
    /* fields after comm: 3 state ... 22 starttime -> 19 more spaces after state */
    p += 2;
    for (int field = 3; field < 22; field++) {
        p = strchr(p, ' ');
        if (!p)
            return -1;
        p++;
    }
    *start = strtoull(p, NULL, 10);
    return 0;
}

static void vr_lock_forget(void) { vr_lock_me_cache = 0; }   /* atfork child */

static inline uint64_t vr_lock_me(void)
{
    if (!vr_lock_me_cache) {
        uint32_t tid = (uint32_t)syscall(SYS_gettid);
        char st;
        uint64_t start = 0;
        if (vr_proc_stat(tid, &st, &start) != 0)
            start = 0;                      /* no /proc: identity is the tid alone */
        vr_lock_me_cache = ((start & 0xffffffffull) << 32) | (tid & VR_LOCK_TID_MASK);
    }
    return vr_lock_me_cache;
}

static int vr_lock_init(void) { return pthread_atfork(NULL, NULL, vr_lock_forget); }

/* 1 if the owner recorded in `word` is gone: no such task, a zombie, or a
 * task whose start time is not the recorded one (its tid was reused). */
static int vr_lock_owner_dead(uint64_t word)
{
    uint32_t tid = (uint32_t)(word & VR_LOCK_TID_MASK);
    uint32_t start = (uint32_t)(word >> 32);
    char st;
    uint64_t actual;
    if (tid == 0)
        return 0;
    if (kill((pid_t)tid, 0) != 0)
        return errno == ESRCH;
    if (vr_proc_stat(tid, &st, &actual) != 0)
        return 0;                           /* cannot tell: assume alive */
    if (st == 'Z' || st == 'X')
        return 1;
    return start != 0 && (uint32_t)actual != start;
}

/* -- acquire / release ------------------------------------------------------ */

/* The uncontended case: one CAS.  1 = taken. */
static inline int vr_lock_try(uint64_t *w, uint64_t me)
{
    return vr_cas_u64(w, 0, me);
}

/* The contended case, for at most slice_ns (no GIL).  0 = taken, 1 = taken
 * over from a dead owner, -ETIMEDOUT = slice over (check signals, deadline,
 * close, and call again), -EDEADLK = the calling thread already owns it. */
static int vr_lock_wait(uint64_t *w, uint64_t me, int64_t slice_ns)
{
    int64_t end = (int64_t)vr_now_ns() + slice_ns;
    int64_t next_liveness = 0;
    unsigned spins = 0;
    for (;;) {
        uint64_t cur = vr_load_relaxed_u64(w);
        if (cur == 0) {
            /* Taken after contention: keep WAITERS set, others may sleep. */
            if (vr_cas_u64(w, 0, me | (spins >= 64 ? VR_LOCK_WAITERS : 0)))
                return 0;
            continue;
        }
        if ((cur & ~VR_LOCK_WAITERS) == me)
            return -EDEADLK;
        if (spins < 64) {                   /* a critical section is a memcpy: */
            spins++;                        /* a short spin usually wins */
            vr_cpu_relax();
            continue;
        }
        int64_t now = (int64_t)vr_now_ns();
        if (now >= next_liveness) {
            if (vr_lock_owner_dead(cur)) {
                if (vr_cas_u64(w, cur, me | VR_LOCK_WAITERS))
                    return 1;
                continue;                   /* somebody else repaired it first */
            }
            next_liveness = now + VR_LOCK_LIVENESS_NS;
        }
        if (now >= end)
            return -ETIMEDOUT;
        if (!(cur & VR_LOCK_WAITERS) && !vr_cas_u64(w, cur, cur | VR_LOCK_WAITERS))
            continue;
        int64_t nap = end - now;
        if (nap > next_liveness - now)
            nap = next_liveness - now;
        struct timespec ts = { nap / 1000000000ll, nap % 1000000000ll };
        /* Sleeps only while the low half still reads owner|WAITERS. */
        syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT,
                (uint32_t)((cur | VR_LOCK_WAITERS) & 0xffffffffull), &ts, NULL, 0);
    }
}

static inline void vr_lock_release(uint64_t *w)
{
    uint64_t old = __atomic_exchange_n(w, 0, __ATOMIC_RELEASE);
    if (old & VR_LOCK_WAITERS)
        syscall(SYS_futex, (uint32_t *)w, FUTEX_WAKE, 1, NULL, NULL, 0);
}

#endif /* VRINGIPC_LOCK_H */
