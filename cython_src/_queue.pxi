# _queue.pxi - the hot path of vringipc.Queue: many producers and many
# consumers on ONE split ring.  Included by _ring.pyx; the public API
# (pickling, multiprocessing compatibility) is vringipc/queue.py.
#
# A split ring has one driver and one device.  Here every producer process
# can be "the driver" and every consumer "the device", one at a time: each
# side has a short cross-process lock, and the side's state lives in shared
# memory instead of process-private memory.  Robustness to SIGKILL comes from
# giving each side exactly ONE commit point, a single atomic store:
#
#   producer: the message is written, then PROD_STATE (avail idx | arena head
#             position, one u64) is stored; avail->idx is then set from it.  A
#             producer killed before the commit leaves nothing behind; one
#             killed after it leaves avail->idx behind, and the next lock
#             holder repairs avail->idx from PROD_STATE.
#   consumer: the message is copied out (or marked held by a view), then
#             used->idx is stored.  Killed before: the message is still there
#             for another consumer.  Killed after: that process had it.
#
# A lock whose owner thread is gone is taken over.  Critical sections hold no
# Python code, only memcpy.  Slot i of the ring is message i (desc, avail and
# used entries of index i all live in slot i & mask), so no free list is
# shared; arena bytes are a FIFO byte ring reclaimed in order, skipping
# nothing: a message held by a zero-copy view (HELD[i] = holder pid) stops
# reclamation until released or until its holder dies.

from libc.errno cimport ESRCH, EPERM
import copyreg as _copyreg
import io as _io
import pickle as _pickle
from collections import ChainMap as _ChainMap
from multiprocessing.reduction import ForkingPickler as _ForkingPickler
_pickle_dumps = _pickle.dumps
_pickle_loads = _pickle.loads


class _QueuePickler(_pickle.Pickler):
    """pickle protocol 5 with multiprocessing's extra reducers (sockets,
    Connections, ...), as multiprocessing.Queue pickles with ForkingPickler."""
    dispatch_table = _ChainMap(_ForkingPickler._extra_reducers, _copyreg.dispatch_table)


# Types that cannot contain anything multiprocessing reduces specially: the
# plain (faster) pickler gives the same bytes for them.
_LEAF_TYPES = frozenset([bytes, bytearray, str, int, float, bool, complex, type(None)])
_tls = __import__("threading").local()


def _mp_dumps(obj, buffer_callback):
    """Pickle obj (protocol 5, out-of-band buffers to buffer_callback) the way
    multiprocessing.Queue would: with ForkingPickler's extra reducers."""
    if type(obj) in _LEAF_TYPES or not _ForkingPickler._extra_reducers:
        return _pickle_dumps(obj, 5, buffer_callback=buffer_callback)
    st = getattr(_tls, "st", None)
    if st is None or st[3]:
        # one reusable pickler per thread (a fresh one if re-entered)
        f = _io.BytesIO()
        bufs = []
        st = [f, bufs, _QueuePickler(f, 5, buffer_callback=bufs.append), False]
        if getattr(_tls, "st", None) is None:
            _tls.st = st
    f, bufs, p = st[0], st[1], st[2]
    st[3] = True
    try:
        f.seek(0)
        f.truncate()
        p.clear_memo()
        p.dump(obj)
        for pb in bufs:
            buffer_callback(pb)
        return f.getvalue()
    finally:
        bufs.clear()
        st[3] = False

cdef extern from "<sys/syscall.h>" nogil:
    enum:
        SYS_gettid
cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)
cdef extern from "<signal.h>" nogil:
    int kill(int pid, int sig)

cdef extern from *:
    """
    #include <time.h>
    #include <pthread.h>
    #include <unistd.h>
    #include <sys/syscall.h>
    static inline void vr_sleep_ns(long ns) {
        struct timespec ts = { ns / 1000000000L, ns % 1000000000L };
        nanosleep(&ts, NULL);
    }
    /* The calling thread's id, cached per thread (gettid is a syscall); the
     * cache is dropped in a forked child, whose thread has a new id. */
    static __thread uint32_t vr_tid_cache;
    static uint32_t vr_pid_cache;
    static void vr_tid_forget(void) { vr_tid_cache = 0; vr_pid_cache = 0; }
    static inline uint32_t vr_gettid(void) {
        if (!vr_tid_cache) vr_tid_cache = (uint32_t)syscall(SYS_gettid);
        return vr_tid_cache;
    }
    static inline uint32_t vr_getpid(void) {
        if (!vr_pid_cache) vr_pid_cache = (uint32_t)getpid();
        return vr_pid_cache;
    }
    static int vr_tid_init(void) { return pthread_atfork(NULL, NULL, vr_tid_forget); }
    #include <fcntl.h>
    #include <stdio.h>
    #include <string.h>
    /* 1 if /proc/<id>/stat says the task is a zombie or dead. */
    static int vr_proc_zombie(uint32_t id) {
        char path[48], buf[512];
        snprintf(path, sizeof path, "/proc/%u/stat", id);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return 0;            /* cannot tell: assume alive */
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n <= 0) return 0;
        buf[n] = 0;
        char *p = strrchr(buf, ')');     /* comm may contain spaces and parens */
        if (!p || p[1] != ' ') return 0;
        return p[2] == 'Z' || p[2] == 'X';
    }
    """
    void vr_sleep_ns(long ns) nogil
    uint32_t vr_gettid() nogil
    uint32_t vr_getpid() nogil
    int vr_tid_init()
    bint vr_proc_zombie(uint32_t id) nogil

vr_tid_init()

# Queue control block, in the header's application area (documented in
# vringipc/layout.py, checked against QUEUE_OFFSETS by tests/test_layout.py).
# Producer and consumer words sit on separate 64-byte lines.
cdef enum:
    Q_MAGIC_OFF = 0x400            # u32 b"VRQ1"
    Q_MAXSIZE_OFF = 0x408          # u64 maxsize in items, 0 = no item limit
    Q_PLOCK_OFF = 0x440            # u32 producer lock owner tid, 0 = free
    Q_PSTATE_OFF = 0x448           # u64 avail idx (low 16 bits) | arena head pos << 16
    Q_RECLAIM_OFF = 0x450          # u32 oldest message that may still use arena bytes
    Q_CLOCK_OFF = 0x480            # u32 consumer lock owner tid
    # The sleeper counts are read by the other side on every call: each on a
    # line of its own that is written only when someone goes to sleep, so the
    # reads stay cache hits instead of bouncing the lock lines.
    Q_PUT_SLEEPERS_OFF = 0x4C0     # u32 producers asleep waiting for room
    Q_GET_SLEEPERS_OFF = 0x500     # u32 consumers asleep waiting for a message
    Q_UNFINISHED_OFF = 0x540       # u64 JoinableQueue unfinished tasks
    Q_JOIN_SLEEPERS_OFF = 0x548    # u32 processes asleep in join()
    Q_MAGIC = 0x31515256           # "VRQ1"

QUEUE_OFFSETS = {
    "magic": Q_MAGIC_OFF, "maxsize": Q_MAXSIZE_OFF, "prod_lock": Q_PLOCK_OFF,
    "prod_state": Q_PSTATE_OFF, "reclaim": Q_RECLAIM_OFF, "put_sleepers": Q_PUT_SLEEPERS_OFF,
    "cons_lock": Q_CLOCK_OFF, "get_sleepers": Q_GET_SLEEPERS_OFF,
    "unfinished": Q_UNFINISHED_OFF, "join_sleepers": Q_JOIN_SLEEPERS_OFF,
}

cdef enum:
    POS_BITS = 48
    # message kinds (header word 1)
    MSG_PICKLE = 0
    MSG_CUSTOM = 1
    MSG_RAW_BYTES = 2
cdef uint64_t POS_MASK = (1ULL << 48) - 1

cdef inline uint32_t _gettid() noexcept nogil:
    return vr_gettid()

cdef inline bint _tid_dead(uint32_t tid) noexcept nogil:
    # kill(tid, 0) addresses any thread or process id; ESRCH = gone.  A killed
    # process that its parent has not reaped yet is a zombie and still answers
    # kill(): look at its state in /proc too (Z zombie, X dead).
    if kill(<int>tid, 0) != 0:
        return errno == ESRCH
    return vr_proc_zombie(tid)


cdef int _robust_lock(uint32_t *word, uint32_t me, int64_t deadline) noexcept nogil:
    """Take a cross-process lock word (owner tid, 0 = free).  Spins, then
    yields, then sleeps; takes over a lock whose owner thread no longer exists.
    0 = taken, 1 = taken over from a dead owner, -ETIMEDOUT = deadline passed.
    Must be called without the GIL (the owner may be a thread of this process
    that needs the GIL to finish)."""
    cdef uint32_t owner
    cdef uint64_t spins = 0
    while True:
        if vr_load_relaxed_u32(word) == 0 and vr_cas_u32(word, 0, me):
            return 0
        spins += 1
        if spins < 2000:
            vr_cpu_relax()
            continue
        owner = vr_load_relaxed_u32(word)
        if owner != 0 and owner != me and _tid_dead(owner):
            if vr_cas_u32(word, owner, me):
                return 1
        if deadline >= 0 and <int64_t>vr_now_ns() >= deadline:
            return -110   # ETIMEDOUT
        if spins < 4000:
            sched_yield()
        else:
            vr_sleep_ns(20000)


cdef inline void _unlock(uint32_t *word) noexcept nogil:
    # Release: everything written in the critical section is visible to the
    # next owner, which acquires through its successful CAS.
    vr_store_release_u32(word, 0)


cdef class HeldMessage:
    """A queue message consumed without copying: read-only bytes in shared
    memory, pinned (the producers will not reuse them) until this object is
    garbage-collected, i.e. until every array/memoryview made from it is gone."""
    cdef QueueCore q
    cdef uint8_t *ptr
    cdef uint64_t length
    cdef uint32_t slot
    cdef uint32_t holder
    cdef bint released

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("zero-copy queue data is read-only")
        PyBuffer_FillInfo(buf, self, self.ptr, self.length, 1, flags)

    def __releasebuffer__(self, Py_buffer *buf):
        pass

    def __len__(self):
        return self.length

    def __dealloc__(self):
        if not self.released and self.q is not None:
            self.released = True
            self.q._unhold(self.slot, self.holder)


cdef class QueueCore:
    """Shared-state MPMC ring (see the top of _queue.pxi)."""
    cdef _Mapped mapped
    cdef object __weakref__
    cdef vrh_t h                 # private: validation walker over the ring (consumer side)
    cdef vr_iov riov
    cdef uint8_t *base
    cdef uint32_t num, mask
    cdef vr_desc *desc
    cdef vr_avail *avail
    cdef vr_used *used
    cdef uint64_t *slot_start    # [num] shared: arena position of message i
    cdef uint32_t *held          # [num] shared: pid holding message i's bytes (0 = none)
    cdef uint64_t data_off       # arena bytes for messages: [data_off, data_off + data_size)
    cdef uint64_t data_size
    cdef uint32_t *plock
    cdef uint64_t *pstate
    cdef uint32_t *reclaim
    cdef uint32_t *put_sleepers
    cdef uint32_t *clock_
    cdef uint32_t *get_sleepers
    cdef uint64_t *unfinished
    cdef uint32_t *join_sleepers
    cdef uint64_t maxsize
    cdef public int kick_fd      # "a message arrived"  (consumers sleep on it)
    cdef public int call_fd      # "room was freed"     (producers sleep on it)
    cdef public int join_fd      # "unfinished reached 0"
    cdef public int64_t spin_ns
    cdef public object check     # callable run while asleep (may raise)
    cdef public uint64_t stolen_locks   # locks taken over from dead owners (diagnostics)
    cdef public object first_use        # callable run once per process before its first put/get
    cdef public object deserialize      # callable for messages that are not a plain pickle
    cdef public int last_kind           # kind of the message get_raw returned as bytes
    cdef uint32_t registered_pid

    def __cinit__(self, buffer, uint32_t num, uint64_t desc_off, uint64_t avail_off,
                  uint64_t used_off, uint64_t win_off, uint64_t win_size, *,
                  uint64_t max_msg=0xffffffff, uint32_t max_iov=1024, bint init=False,
                  uint64_t maxsize=0, int kick_fd=-1, int call_fd=-1, int join_fd=-1,
                  spin_ns=DEFAULT_SPIN_NS):
        self.mapped = _Mapped(buffer)
        check_ring_geometry(self.mapped.size, num, desc_off, avail_off, used_off, win_off, win_size)
        cdef uint64_t side = _align_up(num * (sizeof(uint64_t) + sizeof(uint32_t)), ALLOC_ALIGN)
        if win_size <= side + ALLOC_ALIGN:
            raise ValueError("queue arena too small")
        self.base = self.mapped.base
        self.num = num
        self.mask = num - 1
        self.desc = <vr_desc *>(self.base + desc_off)
        self.avail = <vr_avail *>(self.base + avail_off)
        self.used = <vr_used *>(self.base + used_off)
        self.slot_start = <uint64_t *>(self.base + win_off)
        self.held = <uint32_t *>(self.base + win_off + num * sizeof(uint64_t))
        self.data_off = win_off + side
        self.data_size = (win_size - side) & ~(<uint64_t>ALLOC_ALIGN - 1)
        self.plock = <uint32_t *>(self.base + Q_PLOCK_OFF)
        self.pstate = <uint64_t *>(self.base + Q_PSTATE_OFF)
        self.reclaim = <uint32_t *>(self.base + Q_RECLAIM_OFF)
        self.put_sleepers = <uint32_t *>(self.base + Q_PUT_SLEEPERS_OFF)
        self.clock_ = <uint32_t *>(self.base + Q_CLOCK_OFF)
        self.get_sleepers = <uint32_t *>(self.base + Q_GET_SLEEPERS_OFF)
        self.unfinished = <uint64_t *>(self.base + Q_UNFINISHED_OFF)
        self.join_sleepers = <uint32_t *>(self.base + Q_JOIN_SLEEPERS_OFF)
        if init:
            vr_store_relaxed_u64(<uint64_t *>(self.base + Q_MAXSIZE_OFF), maxsize)
            vr_store_release_u32(<uint32_t *>(self.base + Q_MAGIC_OFF), Q_MAGIC)
        elif vr_load_acquire_u32(<uint32_t *>(self.base + Q_MAGIC_OFF)) != Q_MAGIC:
            raise ValueError("segment is not a vringipc queue")
        self.maxsize = vr_load_relaxed_u64(<uint64_t *>(self.base + Q_MAXSIZE_OFF))
        # The private walker validates every chain like VringHost does: a
        # message's bytes must lie in the data region.
        _vrh_setup(&self.h, self.mapped, num, desc_off, avail_off, used_off, self.data_off,
                   self.data_size, 0, max_msg, max_iov, False)
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.join_fd = join_fd
        self.spin_ns = spin_ns

    def __dealloc__(self):
        _vrh_free(&self.h)
        PyMem_RawFree(self.riov.seg)

    def close(self):
        self.base = NULL
        self.mapped.release()

    cdef inline _check_open(self):
        if self.base == NULL:
            raise ValueError("queue is closed")

    @property
    def max_message(self):
        """Largest message (header + pickle + buffers) the arena can hold."""
        return self.data_size

    @property
    def num(self):
        return self.num

    @property
    def maxsize(self):
        return self.maxsize

    # --- sizes (from the ring indices: work everywhere) -------------------------
    def qsize(self):
        """Messages published and not yet taken (approximate, like mp.Queue)."""
        self._check_open()
        # used first: a racing get between the two loads cannot make a < u
        cdef uint16_t u = vr_load_acquire_u16(&self.used.idx)
        cdef uint16_t a = vr_load_acquire_u16(&self.avail.idx)
        cdef uint16_t n = <uint16_t>(a - u)
        return n if n <= self.num else self.num

    def held_messages(self):
        """Taken messages whose bytes are still pinned by zero-copy views."""
        self._check_open()
        cdef uint32_t k, n = 0
        for k in range(self.num):
            if vr_load_relaxed_u32(&self.held[k]):
                n += 1
        return n

    # --- producer ------------------------------------------------------------------
    cdef inline void _repair_avail(self) noexcept nogil:
        # A producer killed between its commit and the avail->idx store left
        # avail->idx behind PROD_STATE: finish its publish.
        cdef uint16_t a = <uint16_t>(vr_load_relaxed_u64(self.pstate) & 0xffff)
        if vr_load_relaxed_u16(&self.avail.idx) != a:
            vr_store_release_u16(&self.avail.idx, a)

    cdef inline uint16_t _reclaim(self, uint16_t a) noexcept nogil:
        """Advance RECLAIM past messages that are consumed and not held."""
        cdef uint16_t r = <uint16_t>vr_load_relaxed_u32(self.reclaim)
        # Barrier B (acquire): pairs with a consumer's release store of
        # used->idx; HELD[] of the messages it took is visible after this.
        cdef uint16_t u = vr_load_acquire_u16(&self.used.idx)
        cdef uint32_t holder
        if <uint16_t>(u - r) > <uint16_t>(a - r):
            u = a        # a corrupt used idx cannot make us reclaim unpublished slots
        while r != u:
            holder = vr_load_relaxed_u32(&self.held[r & self.mask])
            if holder != 0:
                if not _tid_dead(holder):
                    break
                self.held[r & self.mask] = 0     # holder died: its pin goes with it
            r += 1
        vr_store_relaxed_u32(self.reclaim, r)
        return r

    cdef int _try_put(self, const uint8_t **srcs, const uint64_t *lens, uint32_t nparts,
                      uint64_t total) noexcept nogil:
        """Under the producer lock: place and publish one message (part 0 at
        offset 0, every later part at the next 64-byte boundary).
        0 = published, -ENOSPC = no room (ring, maxsize or arena)."""
        cdef uint64_t st = vr_load_relaxed_u64(self.pstate)
        cdef uint16_t a = <uint16_t>(st & 0xffff)
        cdef uint64_t head_pos = st >> 16
        cdef uint16_t r, u
        cdef uint64_t asz, p, o, tail_pos, pos, k
        cdef uint8_t *dst
        r = self._reclaim(a)
        if <uint16_t>(a - r) >= self.num:
            return -ENOSPC
        if self.maxsize:
            u = vr_load_relaxed_u16(&self.used.idx)
            if <uint16_t>(a - u) >= self.maxsize:
                return -ENOSPC
        asz = _align_up(total, ALLOC_ALIGN)
        p = head_pos
        o = p % self.data_size
        if o + asz > self.data_size:
            p = (p + self.data_size - o) & POS_MASK   # skip the region's tail end
            o = 0
        tail_pos = p if r == a else vr_load_relaxed_u64(&self.slot_start[r & self.mask])
        if ((p + asz - tail_pos) & POS_MASK) > self.data_size:
            return -ENOSPC
        # Write the message: parts back to back, each 64-byte aligned.
        dst = self.base + self.data_off + o
        pos = 0
        for k in range(nparts):
            if k:
                pos = _align_up(pos, ALLOC_ALIGN)
            memcpy(dst + pos, srcs[k], lens[k])
            pos += lens[k]
        self.desc[a & self.mask].addr = self.data_off + o
        self.desc[a & self.mask].len = <uint32_t>total
        self.desc[a & self.mask].flags = 0
        self.desc[a & self.mask].next = 0
        self.slot_start[a & self.mask] = p
        vr_store_relaxed_u16(&self.avail.ring[a & self.mask], <uint16_t>(a & self.mask))
        # The commit point (release): the message above is complete before it.
        vr_store_release_u64(self.pstate, (<uint64_t>(<uint16_t>(a + 1))) |
                             (((p + asz) & POS_MASK) << 16))
        # Barrier A (release): pairs with the consumer's acquire of avail->idx.
        vr_store_release_u16(&self.avail.idx, <uint16_t>(a + 1))
        return 0

    cdef inline void _wake(self, uint32_t *sleepers, int fd) noexcept nogil:
        # SC fence between our index store and the sleepers load: pairs with
        # the fence a sleeper runs between incrementing SLEEPERS and
        # re-checking the index (the Dekker pattern of barriers C/D).
        vr_fence_sc()
        if vr_load_relaxed_u32(sleepers) != 0:
            _signal_fd(fd)

    cdef int _spin(self, uint16_t *idx, uint16_t while_equal, int64_t deadline) except -1:
        """Busy-wait (GIL released) up to spin_ns for *idx to leave
        `while_equal`, in 20 ms slices with a signal check between them."""
        cdef int64_t left = self.spin_ns
        cdef int64_t end
        cdef bint moved = False
        while left > 0 and not moved:
            end = <int64_t>vr_now_ns() + (left if left < 20_000_000 else 20_000_000)
            if deadline >= 0 and end > deadline:
                end = deadline
            with nogil:
                while <int64_t>vr_now_ns() < end:
                    if vr_load_relaxed_u16(idx) != while_equal:
                        moved = True
                        break
                    vr_cpu_relax()
            left -= 20_000_000
            if deadline >= 0 and _remaining(deadline) == 0:
                break
            PyErr_CheckSignals()
        return 0

    cdef int _doze(self, int fd, int64_t deadline) except -1:
        """Sleep on fd until signalled or the deadline (in slices of 100 ms when
        a check() is set).  1 = woken or slice over, 0 = deadline passed."""
        cdef int rc
        cdef int64_t rem = _remaining(deadline)
        if rem == 0:
            return 0
        if self.check is not None and (rem < 0 or rem > 100_000_000):
            rem = 100_000_000
        if fd < 0:
            with nogil:
                vr_sleep_ns(50_000)
            return 1
        with nogil:
            rc = _wait_fds(fd, -1, -1, rem)
        if rc == -EINTR:
            PyErr_CheckSignals()
        elif rc < 0:
            raise OSError(-rc, "poll on eventfd failed")
        return 1

    cdef int _put_once(self, uint32_t me, const uint8_t **srcs, const uint64_t *lens,
                       uint32_t n, uint64_t total, int64_t lock_deadline) noexcept nogil:
        cdef int rc = _robust_lock(self.plock, me, lock_deadline)
        if rc < 0:
            return rc                      # the lock holder is stuck (alive but stopped)
        if rc == 1:
            self.stolen_locks += 1
        self._repair_avail()
        rc = self._try_put(srcs, lens, n, total)
        _unlock(self.plock)
        if rc == 0:
            self._wake(self.get_sleepers, self.kick_fd)
        return rc

    cdef int _put_c(self, const uint8_t **srcs, const uint64_t *lens, uint32_t n,
                    bint block, object timeout) except -1:
        """Publish one message made of n byte ranges (part 0 at offset 0, each
        later part at the next 64-byte boundary).  Blocks while full; Full on
        timeout / non-blocking; MessageTooLarge if it can never fit."""
        cdef uint64_t total = 0
        cdef uint32_t k
        cdef int rc
        cdef int64_t deadline = -2
        cdef int64_t spin_end
        cdef uint16_t seen
        cdef bint slept = False
        cdef uint32_t me = _gettid()
        # With a timeout, waiting for the lock counts against it too.
        cdef int64_t lock_deadline = _deadline(timeout) if (block and timeout is not None) else -1
        for k in range(n):
            total = (_align_up(total, ALLOC_ALIGN) if k else 0) + lens[k]
        if total > self.data_size or total > self.h.max_msg:
            raise MessageTooLarge(f"message of {total} bytes can never fit: the queue "
                                  f"holds at most {min(self.data_size, self.h.max_msg)} bytes")
        while True:
            with nogil:
                rc = self._put_once(me, srcs, lens, n, total, lock_deadline)
            if rc == 0:
                return 0
            if not block or rc == -110:
                raise Full()
            if deadline == -2:
                # brief spin: room usually appears within microseconds
                deadline = _deadline(timeout)
                self._spin(&self.used.idx, vr_load_relaxed_u16(&self.used.idx), deadline)
                continue
            # Announce ourselves, then try once more: a consumer that freed
            # room before seeing the announcement is caught by this retry,
            # one after it writes call_fd (see _wake).
            vr_fetch_add_u32(self.put_sleepers, 1)
            try:
                vr_fence_sc()
                with nogil:
                    rc = self._put_once(me, srcs, lens, n, total, lock_deadline)
                if rc == 0:
                    return 0
                if rc == -110:
                    raise Full()
                if slept and self.check is not None and deadline < 0:
                    self.check()      # still no room after a wake-up: is anyone left?
                rc = self._doze(self.call_fd, deadline)
                slept = True
            finally:
                vr_fetch_add_u32(self.put_sleepers, <uint32_t>-1)
            if rc == 0:
                raise Full()

    def put_parts(self, parts, bint block=True, timeout=None):
        """Publish one message made of the buffers in `parts` (see _put_c)."""
        self._check_open()
        cdef uint32_t n = len(parts), k = 0, j
        cdef Py_buffer *views
        cdef const uint8_t **srcs
        cdef uint64_t *lens
        if n == 0 or n > 4096:
            raise ValueError("a message has 1..4096 parts")
        views = <Py_buffer *>PyMem_RawCalloc(n, sizeof(Py_buffer))
        srcs = <const uint8_t **>PyMem_RawCalloc(n, sizeof(uint8_t *))
        lens = <uint64_t *>PyMem_RawCalloc(n, sizeof(uint64_t))
        try:
            if views == NULL or srcs == NULL or lens == NULL:
                raise MemoryError()
            while k < n:
                PyObject_GetBuffer(parts[k], &views[k], PyBUF_SIMPLE)
                srcs[k] = <const uint8_t *>views[k].buf
                lens[k] = views[k].len
                k += 1
            self._put_c(srcs, lens, n, block, timeout)
        finally:
            for j in range(k):
                PyBuffer_Release(&views[j])
            PyMem_RawFree(views)
            PyMem_RawFree(srcs)
            PyMem_RawFree(lens)

    # --- the Queue's put/get fast path: pickling called from here -------------------
    def put(self, obj, bint block=True, timeout=None):
        """Queue.put for the default pickle serializer (see vringipc.queue)."""
        if self.base == NULL:
            raise ValueError("Queue is closed")
        if self.registered_pid != vr_getpid():
            self.first_use()
            self.registered_pid = vr_getpid()
        if type(obj) is bytes:
            # bytes travel as they are (kind 2): one copy in, one copy out
            self.put_obj(obj, None, MSG_RAW_BYTES, block, timeout)
            return
        bufs = []
        main = _mp_dumps(obj, bufs.append)
        if bufs:
            bufs = [b.raw() for b in bufs]
        self.put_obj(main, bufs, MSG_PICKLE, block, timeout)

    def get(self, bint block=True, timeout=None):
        """Queue.get for the default pickle serializer."""
        if self.base == NULL:
            raise ValueError("Queue is closed")
        if self.registered_pid != vr_getpid():
            self.first_use()
            self.registered_pid = vr_getpid()
        msg = self.get_raw(block, timeout)
        if type(msg) is bytes:
            return msg if self.last_kind == MSG_RAW_BYTES else _pickle_loads(msg)
        return self.deserialize(msg)

    def put_obj(self, main, list bufs, int kind=MSG_PICKLE, bint block=True, timeout=None):
        """put_parts for a serialized object: writes the message header
        (u32 nbufs, u32 kind, u64 len(main), u64 len(buf) each) itself.
        kind: MSG_PICKLE, MSG_CUSTOM (the queue's own dumps) or MSG_RAW_BYTES."""
        cdef bint custom = kind != 0
        cdef Py_ssize_t nb = len(bufs) if bufs is not None else 0
        cdef Py_ssize_t i
        cdef uint64_t hdr[2]
        cdef const uint8_t *srcs[2]
        cdef uint64_t lens[2]
        cdef Py_buffer mb
        if nb == 0:
            # Common case, no allocation: header on the stack, pickle in place.
            self._check_open()
            PyObject_GetBuffer(main, &mb, PyBUF_SIMPLE)
            try:
                hdr[0] = (<uint64_t>kind) << 32              # nbufs = 0, kind
                hdr[1] = <uint64_t>mb.len
                srcs[0] = <const uint8_t *>hdr
                lens[0] = 16
                srcs[1] = <const uint8_t *>mb.buf
                lens[1] = <uint64_t>mb.len
                self._put_c(srcs, lens, 2, block, timeout)
            finally:
                PyBuffer_Release(&mb)
            return
        meta = PyBytes_FromStringAndSize(NULL, 16 + 8 * nb)
        cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(meta)
        (<uint32_t *>p)[0] = <uint32_t>nb
        (<uint32_t *>p)[1] = <uint32_t>kind
        (<uint64_t *>(p + 8))[0] = len(main)
        for i in range(nb):
            (<uint64_t *>(p + 16))[i] = bufs[i].nbytes
        if nb:
            return self.put_parts([meta, main] + bufs, block, timeout)
        return self.put_parts([meta, main], block, timeout)

    # --- consumer ------------------------------------------------------------------
    cdef int _get_begin(self, uint32_t me, int64_t lock_deadline) noexcept nogil:
        """Take the consumer lock and look at the next message (walk it into
        self.riov).  1 = there is one (lock held), 0 = empty (lock released),
        <0 = ring corrupt (lock released)."""
        cdef uint16_t u, a, head
        cdef int rc = _robust_lock(self.clock_, me, lock_deadline)
        if rc < 0:
            return -110                    # lock holder stuck: report as a timeout
        if rc == 1:
            self.stolen_locks += 1
        u = vr_load_relaxed_u16(&self.used.idx)
        # Barrier A (acquire): pairs with the producer's release of avail->idx.
        a = vr_load_acquire_u16(&self.avail.idx)
        if a == u:
            # A producer killed between its commit and its avail->idx store
            # leaves a complete message that only PROD_STATE shows: publish it
            # (idempotent: a live producer stores the same value).
            if <uint16_t>(vr_load_acquire_u64(self.pstate) & 0xffff) == <uint16_t>(u + 1):
                vr_store_release_u16(&self.avail.idx, <uint16_t>(u + 1))
                a = <uint16_t>(u + 1)
            else:
                _unlock(self.clock_)
                return 0
        if <uint16_t>(a - u) > self.num:
            _unlock(self.clock_)
            return vrh_fail(&self.h, EINVAL, R_AVAIL_JUMP, u, a, True)
        head = vr_load_relaxed_u16(&self.avail.ring[u & self.mask])
        if head >= self.num:
            _unlock(self.clock_)
            return vrh_fail(&self.h, EINVAL, R_HEAD_RANGE, head, self.num, True)
        rc = vrh_walk(&self.h, head, &self.riov, NULL)
        self.h.broken = False
        if rc < 0:
            # A malformed message is consumed (reported to the caller) so
            # that it cannot wedge the queue.
            self._get_commit(0, head)
            return rc
        self.h.err_a = head
        return 1

    cdef void _get_commit(self, uint32_t holder, uint16_t head) noexcept nogil:
        """Record the holder, commit (used->idx), release the lock, wake producers."""
        cdef uint16_t u = vr_load_relaxed_u16(&self.used.idx)
        if self.held[u & self.mask] != holder:     # avoid dirtying a line producers read
            self.held[u & self.mask] = holder
        vr_store_relaxed_u32(&self.used.ring[u & self.mask].id, head)
        vr_store_relaxed_u32(&self.used.ring[u & self.mask].len, 0)
        # The commit point (release): our reads of the message and HELD[] are
        # ordered before producers may reuse its bytes (they acquire used->idx).
        vr_store_release_u16(&self.used.idx, <uint16_t>(u + 1))
        _unlock(self.clock_)
        self._wake(self.put_sleepers, self.call_fd)

    def get_raw(self, bint block=True, timeout=None, bint hold=False):
        """Take the next message.  Returns a bytearray copy, or with hold=True a
        HeldMessage pinning its bytes in shared memory (zero copy).  Raises Empty
        on timeout / non-blocking, InvalidDescriptor for a malformed message
        (it is consumed), InvalidRing if the ring itself is corrupt."""
        self._check_open()
        cdef uint32_t me = _gettid()
        cdef int rc
        cdef int64_t deadline = -2
        cdef int64_t spin_end
        cdef uint64_t n
        cdef uint16_t head
        cdef uint32_t slot
        cdef bytearray out
        cdef uint8_t *dst
        cdef const uint8_t *src
        cdef uint64_t mlen
        cdef HeldMessage hm
        cdef bint slept = False
        cdef int64_t lock_deadline = _deadline(timeout) if (block and timeout is not None) else -1
        while True:
            with nogil:
                rc = self._get_begin(me, lock_deadline)
            if rc == -110:
                raise Empty()
            if rc == 1:
                # We hold the consumer lock and the message is not committed:
                # if we die now it stays for another consumer.
                head = <uint16_t>self.h.err_a
                n = self.riov.total
                if hold:
                    slot = vr_load_relaxed_u16(&self.used.idx) & self.mask
                    hm = HeldMessage.__new__(HeldMessage)
                    hm.q = self
                    hm.slot = slot
                    # Pinned by the PROCESS (a view may outlive the thread
                    # that took it); reclaimed when that process is gone.
                    hm.holder = vr_getpid()
                    hm.ptr = self.base + self.riov.seg[0].off if self.riov.used == 1 else self.base
                    hm.length = self.riov.seg[0].len if self.riov.used == 1 else 0
                    self.mapped.pins += 1
                    with nogil:
                        self._get_commit(hm.holder, head)
                    return hm
                # Fast path: a plain pickle with no out-of-band buffers comes
                # back as the pickle bytes alone (one copy, no header parsing).
                if self.riov.used == 1 and n >= 64 + 16:
                    src = self.base + self.riov.seg[0].off
                    mlen = (<uint64_t *>(src + 8))[0]
                    if ((<uint32_t *>src)[0] == 0 and mlen <= n - 64 and
                            ((<uint32_t *>src)[1] == MSG_PICKLE or (<uint32_t *>src)[1] == MSG_RAW_BYTES)):
                        self.last_kind = (<uint32_t *>src)[1]
                        try:
                            fast = PyBytes_FromStringAndSize(<char *>(src + 64), <Py_ssize_t>mlen)
                        finally:
                            with nogil:
                                self._get_commit(0, head)
                        return fast
                try:
                    out = bytearray(n)
                except BaseException:
                    with nogil:
                        _unlock(self.clock_)
                    raise
                dst = <uint8_t *>(<char *>out)
                with nogil:
                    vrh_iov_pull(&self.riov, self.base, dst, n)
                    self._get_commit(0, head)
                return out
            if rc < 0:
                raise _host_error(&self.h, rc, <uint16_t>self.h.err_b)
            if not block:
                raise Empty()
            if deadline == -2:
                deadline = _deadline(timeout)
                self._spin(&self.avail.idx, vr_load_relaxed_u16(&self.used.idx), deadline)
                continue
            vr_fetch_add_u32(self.get_sleepers, 1)
            try:
                vr_fence_sc()
                # re-check after announcing (pairs with _wake in the producer)
                if vr_load_acquire_u16(&self.avail.idx) != vr_load_relaxed_u16(&self.used.idx):
                    continue
                if slept and self.check is not None and deadline < 0:
                    # Blocked for good and still nothing: is anyone left?  (With
                    # a timeout the caller gets Empty at the deadline, as with
                    # multiprocessing, so drain loops keep working.)
                    self.check()
                rc = self._doze(self.kick_fd, deadline)
                slept = True
            finally:
                vr_fetch_add_u32(self.get_sleepers, <uint32_t>-1)
            if rc == 0:
                raise Empty()

    cdef _unhold(self, uint32_t slot, uint32_t holder):
        if self.base != NULL:
            if vr_load_relaxed_u32(&self.held[slot]) == holder:
                vr_store_release_u32(&self.held[slot], 0)
            self._wake(self.put_sleepers, self.call_fd)
        self.mapped.unpin()

    # --- event-loop integration ---------------------------------------------------------
    cdef uint32_t *_sleepers_word(self, int which) except NULL:
        if which == 0:
            return self.get_sleepers
        if which == 1:
            return self.put_sleepers
        if which == 2:
            return self.join_sleepers
        raise ValueError("which must be 0 (get), 1 (put) or 2 (join)")

    def sleep_begin(self, int which):
        """Announce a sleeper (0 = get on kick_fd, 1 = put on call_fd, 2 = join
        on join_fd), SC fence (pairs with _wake), re-check.  True = still worth
        waiting (get: empty, join: unfinished > 0, put: always - retry the put
        once).  Match every call with sleep_end (in a finally)."""
        self._check_open()
        cdef uint32_t *w = self._sleepers_word(which)
        vr_fetch_add_u32(w, 1)
        vr_fence_sc()
        if which == 0:
            return vr_load_acquire_u16(&self.avail.idx) == vr_load_relaxed_u16(&self.used.idx)
        if which == 2:
            return vr_load_acquire_u64(self.unfinished) != 0
        return True

    def sleep_end(self, int which):
        if self.base == NULL:
            return
        vr_fetch_add_u32(self._sleepers_word(which), <uint32_t>-1)

    # --- JoinableQueue ---------------------------------------------------------------
    def task_add(self, int64_t n=1):
        """Add n (may be -1 to undo a failed put) to the unfinished tasks."""
        self._check_open()
        vr_fetch_add_u64(self.unfinished, <uint64_t>n)

    def task_done(self):
        """Decrement unfinished tasks; ValueError if already zero."""
        self._check_open()
        cdef uint64_t cur
        while True:
            cur = vr_load_acquire_u64(self.unfinished)
            if cur == 0:
                raise ValueError("task_done() called too many times")
            if vr_cas_u64(self.unfinished, cur, cur - 1):
                break
        if cur == 1:
            self._wake(self.join_sleepers, self.join_fd)

    def unfinished_tasks(self):
        self._check_open()
        return vr_load_acquire_u64(self.unfinished)

    def join(self, timeout=None):
        """Block until unfinished tasks reach zero.  False on timeout."""
        self._check_open()
        cdef int64_t deadline = _deadline(timeout)
        cdef int rc
        cdef int64_t rem
        while True:
            if vr_load_acquire_u64(self.unfinished) == 0:
                return True
            vr_fetch_add_u32(self.join_sleepers, 1)
            try:
                vr_fence_sc()
                if vr_load_acquire_u64(self.unfinished) == 0:
                    return True
                rem = _remaining(deadline)
                if rem == 0:
                    return False
                if rem < 0 or rem > 100_000_000:
                    rem = 100_000_000
                with nogil:
                    rc = _wait_fds(self.join_fd, -1, -1, rem)
                if rc == -EINTR:
                    PyErr_CheckSignals()
            finally:
                vr_fetch_add_u32(self.join_sleepers, <uint32_t>-1)
