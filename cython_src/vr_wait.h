/*
 * vr_wait.h - the spin part of a wait: spin only where spinning can pay
 * (issue 10: "never slower than a pipe").
 *
 * A waiter used to busy-poll for its whole budget (50 us by default) before
 * sleeping.  That is right when the process it waits for runs on another CPU,
 * and exactly wrong when both share one: the peer cannot run until we stop,
 * so every hand-off cost a whole spin (105 us ping-pong on one CPU, against
 * 4.6 us for a pipe).  The policy here:
 *
 *  1. Each side of a queue/channel publishes a hint word, alone on its own
 *     64-byte line in the segment header: the CPU it last ran on
 *     (sched_getcpu(): a load from the rseq area, no syscall) and whether it
 *     is RUNNING or ASLEEP (blocked in the kernel).  It is written only when
 *     the value changes, so in a steady ping-pong on two CPUs nothing is
 *     written and the peer's reads stay cache hits.
 *  2. A waiter busy-polls ("pause" phase) only while the peer was last seen
 *     RUNNING on ANOTHER CPU, and for at most an adaptive budget: halved
 *     after a wait that spun its whole budget in vain, grown after a wait
 *     that was served while spinning (adaptive mutexes; Go's scheduler).
 *  3. The rest of the spin budget is a "yield" phase: check, sched_yield(),
 *     check...  On a CPU nobody else wants, sched_yield returns at once and
 *     this is a slower spin; on a shared CPU it hands the CPU to whoever is
 *     runnable there -- in a ping-pong on one CPU, the peer we wait for, so
 *     a round trip costs two context switches and no wake-up.  A peer on our
 *     own CPU skips the pause phase entirely.
 *  4. Then the caller sleeps as before (eventfd; woken only when it
 *     announced itself asleep: sleeper counts / virtio suppression flags).
 *
 * Memory ordering: the hint words are HINTS.  Nothing is published through
 * them and no wake-up depends on them (those keep their own pairings: the
 * sleeper counts and the SC fences of barriers C/D in vr_atomics.h, and the
 * acquire loads of the ring indices after a spin).  A stale or torn-by-a-
 * hostile-peer hint can only make us spin when we should not, or the
 * reverse, for one bounded budget.  So relaxed loads and stores suffice, and
 * every value read is range-checked by its use only (a CPU number compared
 * for equality).
 */
#ifndef VRINGIPC_WAIT_H
#define VRINGIPC_WAIT_H

#include <sched.h>
#include <stdint.h>
#include "vr_atomics.h"

/* Hint word: (cpu + 1) << 2 | state; 0 = nobody has written it yet. */
#define VR_WS_RUNNING 1u
#define VR_WS_ASLEEP  2u
#define VR_WS_WORD(cpu, st) ((((uint32_t)(cpu) + 1u) << 2) | (st))
#define VR_WS_CPU(w)   ((int)((w) >> 2) - 1)      /* -1 = unknown */
#define VR_WS_STATE(w) ((w) & 3u)

/* Pause-phase budget bounds (ns): grown by half plus VR_SPIN_GROW_NS after a
 * win, halved after a loss; never above the caller's whole spin budget. */
#define VR_SPIN_GROW_NS 2000

typedef struct {
    volatile uint32_t *mine;   /* this side's hint word (NULL = no hints) */
    volatile uint32_t *peer;   /* the other side's (NULL = no hints) */
    int64_t pause_ns;          /* adaptive pause-phase budget; -1 = not set yet */
    uint64_t wins, losses, yields, pauses_skipped;   /* diagnostics */
} vr_wait_t;

/* One wait's spin: filled by vr_spin_begin, read by vr_spin_run/_end. */
typedef struct {
    int64_t pause_until;       /* busy-poll until then, then yield */
    int64_t total_ns;
    int paused;                /* the pause phase was allowed */
} vr_spin_t;

typedef int (*vr_pending_fn)(void *ctx);

/* "the u16 at idx is no longer val" (the Queue's spin condition) */
typedef struct { const volatile uint16_t *idx; uint16_t val; } vr_idx_wait_t;
static int vr_idx_moved(void *ctx)
{
    vr_idx_wait_t *c = (vr_idx_wait_t *)ctx;
    return vr_load_relaxed_u16(c->idx) != c->val;
}

/* "the u64 counter at word is no longer val" (the Queue's puts/takes counters) */
typedef struct { const volatile uint64_t *word; uint64_t val; } vr_u64_wait_t;
static int vr_u64_moved(void *ctx)
{
    vr_u64_wait_t *c = (vr_u64_wait_t *)ctx;
    return vr_load_relaxed_u64(c->word) != c->val;
}

static inline void vr_wait_init(vr_wait_t *w, void *mine, void *peer)
{
    w->mine = (volatile uint32_t *)mine;
    w->peer = (volatile uint32_t *)peer;
    w->pause_ns = -1;
    w->wins = w->losses = w->yields = w->pauses_skipped = 0;
}

static inline int vr_cpu(void)
{
    int c = sched_getcpu();
    return c < 0 ? -1 : c;
}

/* Publish this side's state (and CPU) if it changed: one relaxed load of our
 * own line, a store only on a change.  Cheap enough for every put/get. */
static inline void vr_wait_note(volatile uint32_t *w, uint32_t state)
{
    uint32_t v;
    if (w == NULL)
        return;
    v = VR_WS_WORD(vr_cpu(), state);
    if (vr_load_relaxed_u32(w) != v)
        vr_store_relaxed_u32(w, v);
}

/* Start the spin of one wait of at most total_ns. */
static inline void vr_spin_begin(vr_wait_t *w, vr_spin_t *s, int64_t total_ns)
{
    int64_t now = (int64_t)vr_now_ns();
    int64_t pause = total_ns;
    s->total_ns = total_ns;
    s->paused = 1;
    if (w != NULL && w->peer != NULL) {
        uint32_t me, p;
        int cpu = vr_cpu();
        if (w->mine != NULL) {
            me = VR_WS_WORD(cpu, VR_WS_RUNNING);
            if (vr_load_relaxed_u32(w->mine) != me)
                vr_store_relaxed_u32(w->mine, me);
        }
        if (w->pause_ns < 0 || w->pause_ns > total_ns)
            w->pause_ns = total_ns;
        pause = w->pause_ns;
        p = vr_load_relaxed_u32(w->peer);
        /* Busy-polling pays only for a peer RUNNING on another CPU.  One on
         * our CPU cannot run while we poll; one ASLEEP must be woken first
         * (maybe by us, just now), which takes longer than a pause phase
         * should last: both go straight to the yield phase. */
        if (p != 0 && (VR_WS_CPU(p) == cpu || VR_WS_STATE(p) != VR_WS_RUNNING)) {
            pause = 0;
            s->paused = 0;
            w->pauses_skipped++;
        }
    }
    s->pause_until = now + pause;
}

/* Spin until pending(ctx) (1) or vr_now_ns() >= end (0). */
static inline int vr_spin_run(vr_wait_t *w, vr_spin_t *s, vr_pending_fn pending, void *ctx,
                              int64_t end)
{
    int64_t now;
    for (;;) {
        if (pending(ctx))
            return 1;
        now = (int64_t)vr_now_ns();
        if (now >= end)
            return 0;
        if (now < s->pause_until) {
            vr_cpu_relax();
        } else {
            sched_yield();
            if (w != NULL)
                w->yields++;
        }
    }
}

/* End of the spin: adapt the pause budget.  won = the wait was served while
 * spinning (the caller then does not sleep). */
static inline void vr_spin_end(vr_wait_t *w, vr_spin_t *s, int won)
{
    if (w == NULL || w->peer == NULL)
        return;
    if (won) {
        w->wins++;
        if (s->paused) {
            int64_t g = w->pause_ns + w->pause_ns / 2 + VR_SPIN_GROW_NS;
            w->pause_ns = g < s->total_ns ? g : s->total_ns;
        }
    } else {
        w->losses++;
        if (s->paused)
            w->pause_ns /= 2;
    }
}

/* Going to sleep in the kernel: say so (the peer then skips its pause). */
static inline void vr_wait_sleeping(vr_wait_t *w)
{
    if (w != NULL)
        vr_wait_note(w->mine, VR_WS_ASLEEP);
}

#endif /* VRINGIPC_WAIT_H */
