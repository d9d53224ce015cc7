# _wait.pxi - the wait policy of issue 10 (cython_src/vr_wait.h): spin only
# while the peer runs on another CPU, yield the CPU when it shares ours,
# adaptive spin budgets.  Included by _ring.pyx before the ring classes.

from libc.string cimport memcmp

cdef extern from "vr_wait.h" nogil:
    ctypedef struct vr_wait_t:
        uint32_t *mine
        uint32_t *peer
        int64_t pause_ns
        uint64_t wins, losses, yields, pauses_skipped
    ctypedef struct vr_spin_t:
        int64_t pause_until
        int64_t total_ns
        int paused
    ctypedef int (*vr_pending_fn)(void *ctx) noexcept nogil
    ctypedef struct vr_idx_wait_t:
        uint16_t *idx
        uint16_t val
    int vr_idx_moved(void *ctx)
    ctypedef struct vr_u64_wait_t:
        uint64_t *word
        uint64_t val
    int vr_u64_moved(void *ctx)
    void vr_wait_init(vr_wait_t *w, void *mine, void *peer)
    void vr_wait_note(uint32_t *w, uint32_t state)
    void vr_spin_begin(vr_wait_t *w, vr_spin_t *s, int64_t total_ns)
    int vr_spin_run(vr_wait_t *w, vr_spin_t *s, vr_pending_fn pending, void *ctx, int64_t end)
    void vr_spin_end(vr_wait_t *w, vr_spin_t *s, int won)
    void vr_wait_sleeping(vr_wait_t *w)
    int vr_cpu()
    enum:
        VR_WS_RUNNING
        VR_WS_ASLEEP

# Hint words in the segment header (documented in vringipc/layout.py).
# Channel: the reserved block 0x300..0x400; Queue: free application lines.
cdef enum:
    WS_CHAN_DRIVER_OFF = 0x300     # u32 producer (driver) side: (cpu + 1) << 2 | state
    WS_CHAN_DEVICE_OFF = 0x340     # u32 consumer (device) side
    WS_QUEUE_PROD_OFF = 0x580      # u32 last producer: (cpu + 1) << 2 | state
    WS_QUEUE_CONS_OFF = 0x5C0      # u32 last consumer

WAIT_OFFSETS = {"channel_driver": WS_CHAN_DRIVER_OFF, "channel_device": WS_CHAN_DEVICE_OFF,
                "queue_producer": WS_QUEUE_PROD_OFF, "queue_consumer": WS_QUEUE_CONS_OFF}
WAIT_RUNNING = VR_WS_RUNNING
WAIT_ASLEEP = VR_WS_ASLEEP


cdef void _wait_setup(vr_wait_t *w, _Mapped m, Py_ssize_t mine_off, Py_ssize_t peer_off,
                      uint32_t app_kind) noexcept:
    """Point w at the hint words if m is a vringipc segment of app_kind (a
    bare buffer has no header to put them in: no hints, plain spin)."""
    cdef bint ok = (m.has_view and m.size >= 4096 and memcmp(m.base, b"VRINGIPC", 8) == 0 and
                    (<uint32_t *>(m.base + 0x2C))[0] == app_kind)
    if ok:
        vr_wait_init(w, m.base + mine_off, m.base + peer_off)
    else:
        vr_wait_init(w, NULL, NULL)


cdef dict _wait_stats(vr_wait_t *w):
    return {"pause_ns": w.pause_ns, "wins": w.wins, "losses": w.losses, "yields": w.yields,
            "pauses_skipped": w.pauses_skipped}


def wait_hint(buffer, Py_ssize_t off):
    """Decode a hint word (tests, tools): (cpu or -1, state) of the side whose
    word is at `off` of the segment `buffer`."""
    cdef const uint8_t[::1] mv = memoryview(buffer).cast("B")
    if off < 0 or off % 4 or off + 4 > mv.shape[0]:
        raise ValueError("bad hint offset")
    cdef uint32_t v = vr_load_relaxed_u32(<uint32_t *>&mv[off])
    return ((<int>(v >> 2)) - 1, v & 3)
