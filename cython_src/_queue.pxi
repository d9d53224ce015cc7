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
# Each side's lock is vr_lock.h (robust: owner identity is thread id + start
# time; waiters sleep on a futex in slices that check signals, the deadline
# and close()); a lock whose owner is gone is taken over.  Critical sections
# run no Python code and allocate nothing: only memcpy.  Per-call state lives
# in C locals and return values, never on the shared QueueCore (two threads of
# one process may be inside it at once).  Slot i of the ring is message i (desc, avail and
# used entries of index i all live in slot i & mask), so no free list is
# shared; arena bytes are a FIFO byte ring reclaimed in order, skipping
# nothing.  A message held by a zero-copy view (HELD[i] = holder pid | the
# low 32 bits of its position << 32) is moved to the PINNED table when
# reclamation reaches it, so that reclamation goes on past it and only its
# own bytes stay out of use: the allocator places new messages around pinned
# extents.  A pin is released by the process that holds it, or when it dies.
#
# Arena positions count bytes modulo pos_mod, the largest multiple of the
# arena size that fits in 48 bits, so `pos % data_size` never jumps when a
# position wraps, whatever the capacity.

from libc.errno cimport ESRCH, EPERM, ETIMEDOUT, EXDEV
cdef extern from "<errno.h>":
    enum: EDEADLK
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

cdef extern from "<signal.h>" nogil:
    int kill(int pid, int sig)

cdef extern from "vr_lock.h" nogil:
    uint64_t vr_lock_me()
    int vr_lock_init()
    bint vr_lock_try(uint64_t *w, uint64_t me)
    int vr_lock_wait(uint64_t *w, uint64_t me, int64_t slice_ns)
    void vr_lock_release(uint64_t *w)
    bint vr_lock_owner_dead(uint64_t word)
    int vr_proc_stat(uint32_t tid, char *state, uint64_t *start)
    enum:
        VR_LOCK_TID_MASK

cdef extern from *:
    """
    #include <sys/stat.h>
    static inline void vr_sleep_ns(long ns) {
        struct timespec ts = { ns / 1000000000L, ns % 1000000000L };
        nanosleep(&ts, NULL);
    }
    /* The calling process's pid, cached (dropped in a forked child). */
    static uint32_t vr_pid_cache;
    static void vr_pid_forget(void) { vr_pid_cache = 0; }
    static inline uint32_t vr_getpid(void) {
        if (!vr_pid_cache) vr_pid_cache = (uint32_t)getpid();
        return vr_pid_cache;
    }
    static int vr_pid_init(void) { return pthread_atfork(NULL, NULL, vr_pid_forget); }
    /* Inode of this process's PID namespace (0 if /proc cannot tell). */
    static uint64_t vr_pidns_id(void) {
        struct stat st;
        if (stat("/proc/self/ns/pid", &st) != 0) return 0;
        return (uint64_t)st.st_ino;
    }
    """
    void vr_sleep_ns(long ns) nogil
    uint32_t vr_getpid() nogil
    int vr_pid_init()
    uint64_t vr_pidns_id() nogil

vr_lock_init()
vr_pid_init()

# Queue control block, in the header's application area (documented in
# vringipc/layout.py, checked against QUEUE_OFFSETS by tests/test_layout.py).
# Producer and consumer words sit on separate 64-byte lines.
cdef enum:
    Q_MAGIC_OFF = 0x400            # u32 b"VRQ2"
    Q_MAXSIZE_OFF = 0x408          # u64 maxsize in items, 0 = no item limit
    Q_PIDNS_OFF = 0x410            # u64 creator's PID namespace inode (lock owners are tids)
    Q_PLOCK_OFF = 0x440            # u64 producer lock (vr_lock.h), 0 = free
    Q_PSTATE_OFF = 0x448           # u64 avail idx (low 16 bits) | arena head pos << 16
    Q_RECLAIM_OFF = 0x450          # u32 oldest message that may still use arena bytes
    # The counters sit on their side's lock line: a put or get touches no
    # extra cache line for them, and a spinning peer watches one line.
    Q_PUTS_OFF = 0x458             # u64 messages published (approximate after a kill)
    Q_CHUNKS_OFF = 0x460           # u64 arena chunks committed now
    Q_CLOCK_OFF = 0x480            # u64 consumer lock (vr_lock.h)
    Q_TAKES_OFF = 0x488            # u64 messages taken
    Q_CURSOR_OFF = 0x490           # u64 batch cursor: used idx | position << 16
    # The sleeper counts are read by the other side on every call: each on a
    # line of its own that is written only when someone goes to sleep, so the
    # reads stay cache hits instead of bouncing the lock lines.
    Q_PUT_SLEEPERS_OFF = 0x4C0     # u32 producers asleep waiting for room
    Q_GET_SLEEPERS_OFF = 0x500     # u32 consumers asleep waiting for a message
    Q_UNFINISHED_OFF = 0x540       # u64 JoinableQueue unfinished tasks
    Q_JOIN_SLEEPERS_OFF = 0x548    # u32 processes asleep in join()
    Q_MAGIC = 0x32515256           # "VRQ2"

QUEUE_OFFSETS = {
    "magic": Q_MAGIC_OFF, "maxsize": Q_MAXSIZE_OFF, "pidns": Q_PIDNS_OFF,
    "prod_lock": Q_PLOCK_OFF, "prod_state": Q_PSTATE_OFF, "reclaim": Q_RECLAIM_OFF,
    "put_sleepers": Q_PUT_SLEEPERS_OFF, "cons_lock": Q_CLOCK_OFF,
    "get_sleepers": Q_GET_SLEEPERS_OFF, "unfinished": Q_UNFINISHED_OFF,
    "puts": Q_PUTS_OFF, "chunks": Q_CHUNKS_OFF, "takes": Q_TAKES_OFF, "cursor": Q_CURSOR_OFF,
    "join_sleepers": Q_JOIN_SLEEPERS_OFF,
}

cdef enum:
    POS_BITS = 48
    # message kinds (header word 1)
    MSG_PICKLE = 0
    MSG_CUSTOM = 1
    MSG_RAW_BYTES = 2
    MSG_HDR = 16                   # u32 nbufs, u32 kind, u64 len(main); then u64 len(buf) each
    LOCK_SLICE_NS = 20_000_000     # a lock waiter checks signals / deadline / close this often

LOCK_TID_MASK = VR_LOCK_TID_MASK   # owner thread id bits of a lock word (tests, tools)
_os_strerror = __import__("os").strerror
KINDS = {"pickle": MSG_PICKLE, "custom": MSG_CUSTOM, "raw_bytes": MSG_RAW_BYTES}

cdef extern from *:
    int __builtin_ctzll(unsigned long long x) nogil

cdef extern from "<sys/mman.h>" nogil:
    int madvise(void *addr, size_t length, int advice)
    enum:
        MADV_REMOVE
cdef extern from *:
    """
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    """
    enum:
        MADV_POPULATE_WRITE

# The arena is committed in chunks as data arrives (memory follows the data):
# a chunk is reserved (MADV_POPULATE_WRITE: "no memory" becomes an errno here
# instead of SIGBUS or the OOM killer at first touch) by the producer that
# first writes into it, and given back (MADV_REMOVE) when the queue is empty,
# except the first RETAIN bytes, which a queue in steady use keeps.  The
# allocator prefers low offsets: an empty queue restarts at the arena's start,
# and a queue with little in flight wraps early, so a steady stream stays in
# the retained chunks whatever the capacity.
cdef enum:
    CHUNK_SHIFT = 20                       # 1 MiB chunks
    RETAIN_CHUNKS = 4                      # kept when the queue drains
    BATCH_MARK = 0xFFFFFFFF                # header word 0 of a batch (never a buffer count)
    BATCH_KIND = 0x48435442                # "BTCH", header word 1
    REC_HDR = 64                           # batch record header: u64 message length
    PIN_N = 64                             # pinned extents table entries
    ALIVE_MS = 10                          # a holder seen alive is not asked again for this long
    # window side area, before the data region:
    W_PINNED = 0                           # u32 pinned extents in use (released lock-free)
    W_CTRL = 64
    W_PINS = W_CTRL                        # PIN_N x {u64 position, u32 bytes, u32 holder pid}

ctypedef struct q_pin:
    uint64_t pos
    uint32_t len
    uint32_t holder
cdef uint64_t REC_SKIP = 0xFFFFFFFFFFFFFFFFULL  # batch record: continue at the next lap


cdef inline uint64_t _side_bytes(uint64_t num, uint64_t win_size) noexcept nogil:
    """Bytes at the start of a queue window before its data region: control
    words, the pinned extents, slot_start[num] (u64), held[num] (u64), the
    chunk bitmap; page aligned so that chunks can be reserved and removed
    page-wise."""
    cdef uint64_t nchunks = (win_size >> CHUNK_SHIFT) + 1
    cdef uint64_t b = W_CTRL + PIN_N * sizeof(q_pin) + num * 2 * sizeof(uint64_t)
    b += ((nchunks + 63) // 64) * 8
    return _align_up(b, 4096)


def queue_window_overhead(uint64_t num, uint64_t capacity):
    """Window bytes a queue needs besides `capacity` bytes of data."""
    return _side_bytes(num, capacity + 4096 + num * 12 + (capacity >> 20)) + 4096


cdef inline bint _pid_dead(uint32_t pid) noexcept nogil:
    # kill(pid, 0) addresses any process; ESRCH = gone.  A killed process its
    # parent has not reaped yet is a zombie and still answers kill(): look at
    # its state in /proc too (Z zombie, X dead).
    cdef char st = 0
    cdef uint64_t start
    if kill(<int>pid, 0) != 0:
        return errno == ESRCH
    if vr_proc_stat(pid, &st, &start) != 0:
        return False
    return st == b'Z' or st == b'X'


cdef object _parse_message(object msg):
    """(kind, main, buffers) of a whole message (bytearray or HeldMessage),
    every length checked against the message: the bytes come from shared
    memory and are not trusted."""
    cdef const uint8_t[::1] mv = memoryview(msg)
    cdef Py_ssize_t n = mv.shape[0]
    cdef uint64_t nbufs, kind, main_len, ln, pos, meta_len, main_off
    cdef Py_ssize_t k
    if n < MSG_HDR:
        raise _pickle.UnpicklingError("corrupt queue message: short header")
    nbufs = (<const uint32_t *>&mv[0])[0]
    kind = (<const uint32_t *>&mv[0])[1]
    main_len = (<const uint64_t *>&mv[0])[1]
    meta_len = MSG_HDR + 8 * nbufs
    if nbufs > <uint64_t>n // 8 or meta_len > <uint64_t>n:
        raise _pickle.UnpicklingError("corrupt queue message: buffer count")
    main_off = _align_up(meta_len, ALLOC_ALIGN)
    if main_len > <uint64_t>n or main_off + main_len > <uint64_t>n:
        raise _pickle.UnpicklingError("corrupt queue message: main length")
    view = memoryview(msg)
    main = view[main_off:main_off + main_len]
    bufs = []
    pos = main_off + main_len
    for k in range(<Py_ssize_t>nbufs):
        ln = (<const uint64_t *>&mv[MSG_HDR])[k]
        pos = _align_up(pos, ALLOC_ALIGN)
        if ln > <uint64_t>n or pos + ln > <uint64_t>n:
            raise _pickle.UnpicklingError("corrupt queue message: buffer length")
        bufs.append(view[pos:pos + ln])
        pos += ln
    return (<int>kind, main, bufs)


cdef class HeldMessage:
    """A queue message consumed without copying: read-only bytes in shared
    memory, pinned (the producers will not reuse them) until this object is
    garbage-collected, i.e. until every array/memoryview made from it is gone.
    The pin belongs to the process that took the message: a forked child that
    inherits this object and drops it releases nothing."""
    cdef QueueCore q
    cdef uint8_t *ptr
    cdef uint64_t length
    cdef uint32_t slot
    cdef uint32_t holder
    cdef uint64_t pos
    cdef bint released

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("zero-copy queue data is read-only")
        if self.q is None or vr_getpid() != self.holder:
            raise BufferError("this zero-copy message belongs to another process")
        PyBuffer_FillInfo(buf, self, self.ptr, self.length, 1, flags)

    def __releasebuffer__(self, Py_buffer *buf):
        pass

    def __len__(self):
        return self.length

    def __dealloc__(self):
        if not self.released and self.q is not None:
            self.released = True
            if vr_getpid() == self.holder:
                self.q._unhold(self.slot, self.holder, self.pos)


cdef class QueueCore:
    """Shared-state MPMC ring (see the top of _queue.pxi).  Moves bytes plus a
    message kind; serialization is vringipc/queue.py's business (the `put` and
    `get` methods below are its fast path for the default pickle serializer
    and plain bytes, bound directly as Queue.put/get)."""
    cdef _Mapped mapped
    cdef object __weakref__
    cdef vrh_t h                 # private: validation walker over the ring (consumer side)
    cdef vr_iov riov             # written only under the consumer lock
    cdef uint8_t *base
    cdef uint32_t num, mask
    cdef vr_desc *desc
    cdef vr_avail *avail
    cdef vr_used *used
    cdef uint64_t *slot_start    # [num] shared: arena position of message i
    cdef uint64_t *held          # [num] shared: holder pid | pos << 32 of message i (0 = none)
    cdef q_pin *pins             # [PIN_N] shared: held messages that reclamation passed
    cdef uint32_t *pinned        # shared: entries of pins in use
    cdef uint64_t *chunk_map     # shared bitmap: arena chunks reserved now
    cdef uint64_t *puts          # shared: messages published (approximate after a kill)
    cdef uint64_t *takes         # shared: messages taken
    cdef uint64_t *chunks_held   # shared: chunks reserved now
    cdef uint64_t *cursor        # shared: consumers' place inside a batch
    cdef uint64_t nchunks
    cdef bint batching           # several messages may share one descriptor (see _put_batch)
    cdef uint64_t data_off       # arena bytes for messages: [data_off, data_off + data_size)
    cdef uint64_t data_size
    cdef uint64_t pos_mod        # positions count modulo this multiple of data_size
    cdef uint64_t *plock
    cdef uint64_t *pstate
    cdef uint32_t *reclaim
    cdef uint32_t *put_sleepers
    cdef uint64_t *clock_
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
    cdef public object first_use        # callable run once per (process, thread) before its first put/get
    cdef uint32_t registered_pid
    cdef uint64_t callers[8]            # lock identities of threads already through first_use
    cdef uint32_t ncallers
    cdef vr_wait_t wget, wput           # issue 10: wait policy of get / put (_wait.pxi)
    cdef uint64_t alive[4]              # pid | ms << 32 of holders seen alive lately (_dead)
    cdef object pending_error           # take_packed: a malformed message met after others
    cdef int64_t last_trim_ns           # when this process last gave chunks back (_trim)
    cdef public int64_t trim_every_ns   # and how often it may (1 s; a test hook)

    def __cinit__(self, buffer, uint32_t num, uint64_t desc_off, uint64_t avail_off,
                  uint64_t used_off, uint64_t win_off, uint64_t win_size, *,
                  uint64_t max_msg=0xffffffff, uint32_t max_iov=1024, bint init=False,
                  uint64_t maxsize=0, int kick_fd=-1, int call_fd=-1, int join_fd=-1,
                  spin_ns=DEFAULT_SPIN_NS):
        self.mapped = _Mapped(buffer, "queue")
        self.trim_every_ns = 1_000_000_000
        check_ring_geometry(self.mapped.size, num, desc_off, avail_off, used_off, win_off, win_size)
        cdef uint64_t side = _side_bytes(num, win_size)
        if win_off % 4096 or win_size <= side + 4096:
            raise ValueError("queue arena too small (or not page aligned)")
        self.base = self.mapped.base
        self.num = num
        self.mask = num - 1
        self.desc = <vr_desc *>(self.base + desc_off)
        self.avail = <vr_avail *>(self.base + avail_off)
        self.used = <vr_used *>(self.base + used_off)
        self.puts = <uint64_t *>(self.base + Q_PUTS_OFF)
        self.chunks_held = <uint64_t *>(self.base + Q_CHUNKS_OFF)
        self.takes = <uint64_t *>(self.base + Q_TAKES_OFF)
        self.cursor = <uint64_t *>(self.base + Q_CURSOR_OFF)
        self.pinned = <uint32_t *>(self.base + win_off + W_PINNED)
        self.pins = <q_pin *>(self.base + win_off + W_PINS)
        self.slot_start = <uint64_t *>(self.base + win_off + W_PINS + PIN_N * sizeof(q_pin))
        self.held = self.slot_start + num
        self.chunk_map = self.held + num
        self.data_off = win_off + side
        self.data_size = (win_size - side) & ~(<uint64_t>4095)
        self.nchunks = (self.data_size + (1ULL << CHUNK_SHIFT) - 1) >> CHUNK_SHIFT
        self.batching = maxsize == 0 or maxsize >= num
        self.pos_mod = ((1ULL << POS_BITS) // self.data_size) * self.data_size
        self.plock = <uint64_t *>(self.base + Q_PLOCK_OFF)
        self.pstate = <uint64_t *>(self.base + Q_PSTATE_OFF)
        self.reclaim = <uint32_t *>(self.base + Q_RECLAIM_OFF)
        self.put_sleepers = <uint32_t *>(self.base + Q_PUT_SLEEPERS_OFF)
        self.clock_ = <uint64_t *>(self.base + Q_CLOCK_OFF)
        self.get_sleepers = <uint32_t *>(self.base + Q_GET_SLEEPERS_OFF)
        self.unfinished = <uint64_t *>(self.base + Q_UNFINISHED_OFF)
        self.join_sleepers = <uint32_t *>(self.base + Q_JOIN_SLEEPERS_OFF)
        # issue 10: each side's hint word (cpu, running/asleep), see _wait.pxi
        _wait_setup(&self.wget, self.mapped, WS_QUEUE_CONS_OFF, WS_QUEUE_PROD_OFF, 2)
        _wait_setup(&self.wput, self.mapped, WS_QUEUE_PROD_OFF, WS_QUEUE_CONS_OFF, 2)
        cdef uint64_t ns = vr_pidns_id(), theirs
        if init:
            vr_store_relaxed_u64(<uint64_t *>(self.base + Q_MAXSIZE_OFF), maxsize)
            vr_store_relaxed_u64(<uint64_t *>(self.base + Q_PIDNS_OFF), ns)
            vr_store_release_u32(<uint32_t *>(self.base + Q_MAGIC_OFF), Q_MAGIC)
        elif vr_load_acquire_u32(<uint32_t *>(self.base + Q_MAGIC_OFF)) != Q_MAGIC:
            raise ValueError("segment is not a vringipc queue (or of another version)")
        else:
            theirs = vr_load_relaxed_u64(<uint64_t *>(self.base + Q_PIDNS_OFF))
            if theirs and ns and theirs != ns:
                raise OSError(EXDEV, "this queue was created in another PID namespace: its "
                              "lock owners (thread ids) cannot be told apart from here")
        self.maxsize = vr_load_relaxed_u64(<uint64_t *>(self.base + Q_MAXSIZE_OFF))
        self.batching = self.maxsize == 0 or self.maxsize >= num
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

    def close(self, finalizer=None):
        """Close (see _Mapped): put/get/join raise ValueError from now on,
        calls blocked in other threads wake up and raise ValueError, and
        `finalizer` runs once the last of them has returned.  qsize() keeps
        answering for as long as the caller keeps the segment mapped."""
        self.mapped.close(finalizer, (self.kick_fd, self.call_fd, self.join_fd))

    @property
    def closed(self):
        return self.mapped.closing

    cdef inline int _check_open(self) except -1:
        if self.mapped.closing:
            raise ValueError("queue is closed")
        return 0

    @property
    def max_message(self):
        """Largest message (header + pickle + buffers) the arena can hold."""
        return min(self.data_size - 2 * REC_HDR, self.h.max_msg)

    @property
    def arena_bytes(self):
        """Bytes of the data region (the capacity, rounded to pages)."""
        return self.data_size

    @property
    def num(self):
        return self.num

    @property
    def maxsize(self):
        return self.maxsize

    # --- sizes (from the ring indices: work everywhere, even after close) --------
    def qsize(self):
        """Messages published and not yet taken (approximate, like mp.Queue:
        a process killed inside a put or get can leave it off by one)."""
        return self._count()

    cdef inline uint64_t _count(self) noexcept nogil:
        # takes first: a racing get between the two loads cannot make it negative
        cdef uint64_t t = vr_load_acquire_u64(self.takes)
        cdef uint64_t p = vr_load_acquire_u64(self.puts)
        return p - t if p > t else 0

    @property
    def reserved_bytes(self):
        """Arena bytes committed now (chunks reserved by producers)."""
        return min(vr_load_relaxed_u64(self.chunks_held), self.nchunks) << CHUNK_SHIFT

    def held_messages(self):
        """Taken messages whose bytes are still pinned by zero-copy views of
        live processes."""
        self._check_open()
        cdef uint32_t k, n = 0, h
        for k in range(self.num):
            h = <uint32_t>vr_load_relaxed_u64(&self.held[k])
            if h and not _pid_dead(h):
                n += 1
        for k in range(PIN_N):
            h = vr_load_relaxed_u32(&self.pins[k].holder)
            if h and not _pid_dead(h):
                n += 1
        return n

    # --- test hooks -------------------------------------------------------------
    def _set_head_position(self, uint64_t pos):
        """Test hook: start the arena positions at `pos` (e.g. just below the
        wrap).  Only on an empty, quiet queue."""
        cdef uint64_t st = vr_load_relaxed_u64(self.pstate)
        cdef uint16_t a = <uint16_t>(st & 0xffff)
        if a != vr_load_relaxed_u16(&self.used.idx) or a != <uint16_t>vr_load_relaxed_u32(self.reclaim):
            raise ValueError("queue is not empty")
        pos = pos % self.pos_mod
        vr_store_release_u64(self.pstate, (<uint64_t>a) | (pos << 16))

    @property
    def position_modulus(self):
        return self.pos_mod

    def wait_stats(self):
        """Diagnostics of the wait policy (issue 10): {"get": {...}, "put": {...}}
        with this process's adaptive pause budget and win/loss/yield counts."""
        return {"get": _wait_stats(&self.wget), "put": _wait_stats(&self.wput)}

    # --- the lock (vr_lock.h) ------------------------------------------------------
    cdef int _lock(self, uint64_t *w, int64_t deadline) except -2:
        """Take a side's lock.  0 = taken, 1 = taken over from a dead owner,
        -1 = deadline passed.  Sleeps without the GIL (the owner may be a
        thread of this process) in slices: Ctrl-C, the deadline and close()
        are seen within LOCK_SLICE_NS even if the owner is stopped."""
        cdef uint64_t me = vr_lock_me()
        cdef int rc
        cdef int64_t slice_ns
        if vr_lock_try(w, me):
            return 0
        while True:
            slice_ns = LOCK_SLICE_NS
            if deadline >= 0:
                slice_ns = _remaining(deadline)
                if slice_ns > LOCK_SLICE_NS:
                    slice_ns = LOCK_SLICE_NS
            with nogil:
                rc = vr_lock_wait(w, me, slice_ns)
            if rc == 1:
                self.stolen_locks += 1
                return 1
            if rc == 0:
                return 0
            if rc == -EDEADLK:
                raise RuntimeError("re-entrant queue call: this thread already holds the "
                                   "queue's lock (from a signal handler or a finalizer?)")
            PyErr_CheckSignals()
            self.mapped.check()
            if deadline >= 0 and _remaining(deadline) == 0:
                return -1

    # --- positions ---------------------------------------------------------------
    cdef inline uint64_t _pos_add(self, uint64_t p, uint64_t n) noexcept nogil:
        p += n
        return p - self.pos_mod if p >= self.pos_mod else p

    cdef inline uint64_t _pos_diff(self, uint64_t a, uint64_t b) noexcept nogil:
        return a - b if a >= b else a + self.pos_mod - b

    # --- producer ------------------------------------------------------------------
    cdef inline void _repair_avail(self) noexcept nogil:
        # A producer killed between its commit and the avail->idx store left
        # avail->idx behind PROD_STATE: finish its publish.  CAS from the value
        # seen, so a consumer's concurrent repair is never undone.
        cdef uint16_t a = <uint16_t>(vr_load_relaxed_u64(self.pstate) & 0xffff)
        cdef uint16_t cur = vr_load_relaxed_u16(&self.avail.idx)
        if cur != a and <uint16_t>(a - cur) <= self.num:
            vr_cas_u16(&self.avail.idx, cur, a)

    cdef bint _pin(self, uint16_t r, uint64_t h) noexcept nogil:
        """Under the producer lock: move the hold `h` of message r into the
        PINNED table so that reclamation can go on.  False if the table is
        full.  The entry is complete (release store of its holder) before the
        CAS that clears HELD[]; a holder whose own CAS on HELD[] fails finds
        the entry (_unhold), and one whose CAS wins makes ours fail: then the
        entry is dropped again."""
        cdef uint32_t k
        cdef uint64_t pos = vr_load_relaxed_u64(&self.slot_start[r & self.mask])
        for k in range(PIN_N):
            if vr_load_relaxed_u32(&self.pins[k].holder) == 0:
                break
        else:
            # full: drop the entries of dead holders, then give up
            for k in range(PIN_N):
                if self._dead(vr_load_relaxed_u32(&self.pins[k].holder)):
                    if vr_cas_u32(&self.pins[k].holder, self.pins[k].holder, 0):
                        vr_fetch_add_u32(self.pinned, <uint32_t>-1)
            return False
        # a held message is a plain one: desc len bytes at its start position
        self.pins[k].pos = pos
        self.pins[k].len = vr_load_relaxed_u32(&self.desc[r & self.mask].len)
        vr_fetch_add_u32(self.pinned, 1)
        vr_store_release_u32(&self.pins[k].holder, <uint32_t>h)
        if not vr_cas_u64(&self.held[r & self.mask], h, 0):
            vr_store_release_u32(&self.pins[k].holder, 0)      # released meanwhile
            vr_fetch_add_u32(self.pinned, <uint32_t>-1)
        return True

    cdef bint _pinned_overlap(self, uint64_t o, uint64_t need, uint64_t *skip_to) noexcept nogil:
        """Does [o, o+need) (region offsets) overlap a pinned extent?  Then
        *skip_to = the region offset just past it."""
        cdef uint32_t k, holder
        cdef uint64_t eo, elen
        for k in range(PIN_N):
            holder = vr_load_acquire_u32(&self.pins[k].holder)
            if holder == 0:
                continue
            eo = self.pins[k].pos % self.data_size
            elen = _align_up(self.pins[k].len, ALLOC_ALIGN)
            if eo < o + need and o < eo + elen:
                if self._dead(holder):         # its holder died: the pin goes with it
                    if vr_cas_u32(&self.pins[k].holder, holder, 0):
                        vr_fetch_add_u32(self.pinned, <uint32_t>-1)
                    continue
                skip_to[0] = eo + elen
                return True
        return False

    cdef bint _dead(self, uint32_t pid) noexcept nogil:
        """_pid_dead(pid), answered from memory for a pid seen alive in the
        last ALIVE_MS: a put that finds the pins table full or a kept view
        in its way asks about the same few holders each time, and each exact
        answer costs a kill() and a /proc read.  A death is seen ALIVE_MS
        (plus one tick of the coarse clock) late at most.  Entries are one
        u64 each, so threads racing on the cache only ever see whole
        entries."""
        cdef uint32_t now = <uint32_t>(vr_now_coarse_ns() // 1000000)
        cdef uint64_t e
        cdef int i
        for i in range(4):
            e = vr_load_relaxed_u64(&self.alive[i])
            if <uint32_t>e == pid and <uint32_t>(now - <uint32_t>(e >> 32)) < ALIVE_MS:
                return False
        if _pid_dead(pid):
            return True
        vr_store_relaxed_u64(&self.alive[pid & 3], (<uint64_t>now << 32) | pid)
        return False

    cdef inline uint16_t _reclaim(self, uint16_t a) noexcept nogil:
        """Advance RECLAIM past messages that are consumed and not held."""
        cdef uint16_t r = <uint16_t>vr_load_relaxed_u32(self.reclaim)
        # Barrier B (acquire): pairs with a consumer's release store of
        # used->idx; HELD[] of the messages it took is visible after this.
        cdef uint16_t u = vr_load_acquire_u16(&self.used.idx)
        cdef uint64_t h
        if <uint16_t>(u - r) > <uint16_t>(a - r):
            u = a        # a corrupt used idx cannot make us reclaim unpublished slots
        while r != u:
            h = vr_load_acquire_u64(&self.held[r & self.mask])
            if h != 0:
                if self._dead(<uint32_t>h):
                    vr_cas_u64(&self.held[r & self.mask], h, 0)   # its pin goes with it
                elif not self._pin(r, h):
                    break                        # the table is full: wait for releases
            r += 1
        vr_store_relaxed_u32(self.reclaim, r)
        return r

    # --- arena chunks ------------------------------------------------------------------
    cdef inline bint _chunk_on(self, uint64_t c) noexcept nogil:
        return (self.chunk_map[c >> 6] >> (c & 63)) & 1

    cdef int _reserve(self, uint64_t o, uint64_t n) noexcept nogil:
        """Under the producer lock: commit the chunks under region offsets
        [o, o + n).  0, or -errno (ENOMEM, EFAULT: no memory to be had)."""
        cdef uint64_t c = o >> CHUNK_SHIFT
        cdef uint64_t last = (o + n - 1) >> CHUNK_SHIFT
        cdef uint64_t start, ln
        while c <= last:
            if not self._chunk_on(c):
                start = c << CHUNK_SHIFT
                ln = self.data_size - start
                if ln > (1ULL << CHUNK_SHIFT):
                    ln = 1ULL << CHUNK_SHIFT
                if madvise(self.base + self.data_off + start, ln, MADV_POPULATE_WRITE) != 0:
                    if errno != EINVAL:          # EINVAL: a kernel before 5.14 (pages
                        return -errno            # then come on first touch, unreserved)
                self.chunk_map[c >> 6] |= 1ULL << (c & 63)
                self.chunks_held[0] += 1
            c += 1
        return 0

    cdef void _trim(self) noexcept nogil:
        """Under the producer lock with nothing in flight: give back every
        chunk past the retained ones (but none under a pinned extent).  Walks
        the bitmap a word at a time: a 16 GiB arena is 256 words.

        At most every trim_every_ns (1 s) per process: a stream whose bursts
        pass the retained chunks drains thousands of times a second, and
        giving the chunks back each time made every burst commit (zero) them
        anew, a madvise pair per MiB that cost a bridge an eighth of its CPU
        (at 100 ms still a twentieth).  A trim skipped that way is done by a
        consumer that sleeps a slice on the drained queue, or the next put
        into it: a burst's memory comes back about a second after it drained."""
        cdef uint64_t w, c, start, ln, word, skip
        cdef int64_t now
        if self.chunks_held[0] <= RETAIN_CHUNKS:
            return
        now = <int64_t>vr_now_ns()
        if now - self.last_trim_ns < self.trim_every_ns:
            return
        self.last_trim_ns = now
        for w in range(RETAIN_CHUNKS >> 6, (self.nchunks + 63) >> 6):
            word = self.chunk_map[w]
            while word:
                c = (w << 6) + <uint64_t>__builtin_ctzll(word)
                word &= word - 1
                if c < RETAIN_CHUNKS or c >= self.nchunks:
                    continue
                start = c << CHUNK_SHIFT
                if self._pinned_overlap(start, 1ULL << CHUNK_SHIFT, &skip):
                    continue
                ln = self.data_size - start
                if ln > (1ULL << CHUNK_SHIFT):
                    ln = 1ULL << CHUNK_SHIFT
                madvise(self.base + self.data_off + start, ln, MADV_REMOVE)
                self.chunk_map[c >> 6] &= ~(1ULL << (c & 63))
                self.chunks_held[0] -= 1

    cdef void _drained(self) noexcept nogil:
        """Under the producer lock: if nothing is in flight, give back the
        chunks past the retained ones and restart at the arena's start."""
        cdef uint64_t st = vr_load_relaxed_u64(self.pstate)
        cdef uint16_t a = <uint16_t>(st & 0xffff)
        cdef uint64_t p = st >> 16
        if self._reclaim(a) != a or p >= self.pos_mod:
            return
        self._trim()
        if p % self.data_size:
            p = self._pos_add(p, self.data_size - p % self.data_size)
            vr_store_release_u64(self.pstate, (<uint64_t>a) | (p << 16))

    cdef void _trim_if_drained(self) noexcept nogil:
        """After a get that emptied a queue holding more than the retained
        chunks: trim now rather than at the next put, which may never come."""
        if vr_load_relaxed_u64(self.chunks_held) <= RETAIN_CHUNKS or self._count() != 0:
            return
        if vr_lock_try(self.plock, vr_lock_me()):
            self._drained()
            vr_lock_release(self.plock)

    cdef bint _fit(self, uint64_t *pp, uint64_t need, uint64_t tail_pos) noexcept nogil:
        """From position *pp on, the first place for `need` bytes: not across
        the region's end, not over a pinned extent, not past the tail.  True
        and *pp = that place, or False."""
        cdef uint64_t p = pp[0], o = pp[0] % self.data_size, skip = 0
        cdef uint32_t k
        for k in range(2 * PIN_N + 2):          # each round moves forward: bounded
            if o + need > self.data_size:
                p = self._pos_add(p, self.data_size - o)   # skip the region's tail end
                o = 0
                continue
            if vr_load_relaxed_u32(self.pinned) == 0 or not self._pinned_overlap(o, need, &skip):
                break
            p = self._pos_add(p, skip - o)                 # go around a pinned extent
            o = skip
        else:
            return False
        if self._pos_diff(self._pos_add(p, need), tail_pos) > self.data_size:
            return False
        pp[0] = p
        return True

    cdef int _place(self, uint64_t *pp, uint64_t need, uint64_t tail_pos, bint empty) noexcept nogil:
        """Choose where `need` bytes go, starting from position *pp (see _fit),
        preferring low offsets: restart at the arena's start when nothing is
        in flight, wrap early when little is.  Commits the chunks.  *pp = the
        position; 0, -ENOSPC or -errno."""
        cdef uint64_t p = pp[0], o, p2, soft
        if p >= self.pos_mod or tail_pos >= self.pos_mod:
            return -ENOSPC                       # corrupt state: never write astray
        o = p % self.data_size
        if empty:
            if o:
                p = self._pos_add(p, self.data_size - o)
            tail_pos = p
            self._trim()
        elif o:
            # Wrap early only with a wide margin: the bytes left behind stay
            # "in use" until the tail passes them, so the head must not catch
            # up with a lagging tail in the low region.
            soft = 2 * (self._pos_diff(p, tail_pos) + need)
            if soft < (RETAIN_CHUNKS << CHUNK_SHIFT):
                soft = RETAIN_CHUNKS << CHUNK_SHIFT
            if o + need > soft and tail_pos % self.data_size >= 2 * soft:
                p2 = self._pos_add(p, self.data_size - o)      # wrap early if it fits
                if self._fit(&p2, need, tail_pos):
                    pp[0] = p2
                    return self._reserve(p2 % self.data_size, need)
        if not self._fit(&p, need, tail_pos):
            return -ENOSPC
        pp[0] = p
        return self._reserve(p % self.data_size, need)

    cdef inline void _copy_parts(self, uint8_t *dst, const uint8_t **srcs, const uint64_t *lens,
                                 uint32_t nparts) noexcept nogil:
        # parts back to back, each 64-byte aligned
        cdef uint64_t pos = 0, k
        for k in range(nparts):
            if k:
                pos = _align_up(pos, ALLOC_ALIGN)
            memcpy(dst + pos, srcs[k], lens[k])
            pos += lens[k]

    cdef int _try_put(self, const uint8_t **srcs, const uint64_t *lens, uint32_t nparts,
                      uint64_t total) noexcept nogil:
        """Under the producer lock: place and publish one message (part 0 at
        offset 0, every later part at the next 64-byte boundary).
        0 = published, -ENOSPC = no room (ring, maxsize or arena), -errno =
        no memory for the arena chunk."""
        cdef uint64_t st = vr_load_relaxed_u64(self.pstate)
        cdef uint16_t a = <uint16_t>(st & 0xffff)
        cdef uint64_t p = st >> 16
        cdef uint16_t r
        cdef uint64_t asz, need, o, tail_pos
        cdef uint8_t *dst
        cdef bint batch
        cdef int rc
        r = self._reclaim(a)
        if self.maxsize:
            # Without batches a descriptor is a message: the ring indices
            # count exactly, and used->idx is on a line _reclaim just read.
            if self.batching:
                if self._count() >= self.maxsize:
                    return -ENOSPC
            elif <uint16_t>(a - vr_load_relaxed_u16(&self.used.idx)) >= self.maxsize:
                return -ENOSPC
        if <uint16_t>(a - r) >= self.num:
            if not self.batching:
                return -ENOSPC
            return self._put_batch(srcs, lens, nparts, total, a, r, p)
        # The last free slot starts a batch (see _put_batch) when batching:
        # the ring never limits how many messages a queue holds.
        batch = self.batching and <uint16_t>(a - r) == self.num - 1
        asz = _align_up(total, ALLOC_ALIGN)
        need = 2 * REC_HDR + asz if batch else asz
        tail_pos = p if r == a else vr_load_relaxed_u64(&self.slot_start[r & self.mask])
        rc = self._place(&p, need, tail_pos, r == a)
        if rc < 0:
            return rc
        o = p % self.data_size
        dst = self.base + self.data_off + o
        if batch:
            (<uint32_t *>dst)[0] = BATCH_MARK
            (<uint32_t *>dst)[1] = BATCH_KIND
            (<uint64_t *>(dst + REC_HDR))[0] = total
            self._copy_parts(dst + 2 * REC_HDR, srcs, lens, nparts)
        else:
            self._copy_parts(dst, srcs, lens, nparts)
        self.desc[a & self.mask].addr = self.data_off + o
        self.desc[a & self.mask].len = <uint32_t>(REC_HDR if batch else total)
        self.desc[a & self.mask].flags = 0
        self.desc[a & self.mask].next = 0
        self.slot_start[a & self.mask] = p
        vr_store_relaxed_u16(&self.avail.ring[a & self.mask], <uint16_t>(a & self.mask))
        # The commit point (release): the message above is complete before it.
        vr_store_release_u64(self.pstate, (<uint64_t>(<uint16_t>(a + 1))) |
                             (self._pos_add(p, need) << 16))
        # Barrier A (release): pairs with the consumer's acquire of avail->idx.
        vr_store_release_u16(&self.avail.idx, <uint16_t>(a + 1))
        vr_store_release_u64(self.puts, vr_load_relaxed_u64(self.puts) + 1)
        return 0

    cdef int _put_batch(self, const uint8_t **srcs, const uint64_t *lens, uint32_t nparts,
                        uint64_t total, uint16_t a, uint16_t r, uint64_t p) noexcept nogil:
        """The ring is full: append the message to the newest descriptor,
        a batch.  A batch is one descriptor whose bytes are a 64-byte header
        (BATCH_MARK, BATCH_KIND) followed by records, each a 64-byte header
        holding the message length (or REC_SKIP: go on at the next lap) and
        the message; its records run up to the producers' committed head
        position (or to the next descriptor's start).  The commit is the same
        single store as for any message: PROD_STATE's head position moves
        (avail idx unchanged), so a producer killed before it leaves nothing
        visible and nothing that the next one does not overwrite."""
        cdef uint16_t newest = <uint16_t>(a - 1) & self.mask
        cdef uint64_t bstart = vr_load_relaxed_u64(&self.slot_start[newest])
        cdef uint64_t tail_pos = vr_load_relaxed_u64(&self.slot_start[r & self.mask])
        cdef uint64_t need = REC_HDR + _align_up(total, ALLOC_ALIGN)
        cdef uint64_t o, p2
        cdef uint8_t *b
        cdef int rc
        if bstart >= self.pos_mod or p >= self.pos_mod or tail_pos >= self.pos_mod:
            return -ENOSPC
        b = self.base + self.data_off + bstart % self.data_size
        if (<uint32_t *>b)[0] != BATCH_MARK or (<uint32_t *>b)[1] != BATCH_KIND:
            return -ENOSPC                       # not a batch (cannot happen): wait
        o = p % self.data_size
        if o + need > self.data_size:
            # Continue at the next lap; a skip record tells the consumers.
            p2 = self._pos_add(p, self.data_size - o)
            if self._pos_diff(self._pos_add(p2, need), tail_pos) > self.data_size:
                return -ENOSPC
            rc = self._reserve(o, REC_HDR)
            if rc < 0:
                return rc
            (<uint64_t *>(self.base + self.data_off + o))[0] = REC_SKIP
            p = p2
            o = 0
        elif self._pos_diff(self._pos_add(p, need), tail_pos) > self.data_size:
            return -ENOSPC
        rc = self._reserve(o, need)
        if rc < 0:
            return rc
        (<uint64_t *>(self.base + self.data_off + o))[0] = total
        self._copy_parts(self.base + self.data_off + o + REC_HDR, srcs, lens, nparts)
        # The commit point (release), as in _try_put; consumers acquire it.
        vr_store_release_u64(self.pstate, (<uint64_t>a) | (self._pos_add(p, need) << 16))
        vr_store_release_u64(self.puts, vr_load_relaxed_u64(self.puts) + 1)
        return 0

    cdef inline void _wake(self, uint32_t *sleepers, int fd) noexcept nogil:
        # SC fence between our index store and the sleepers load: pairs with
        # the fence a sleeper runs between incrementing SLEEPERS and
        # re-checking the index (the Dekker pattern of barriers C/D).
        vr_fence_sc()
        if vr_load_relaxed_u32(sleepers) != 0:
            _signal_fd(fd)

    cdef int _spin(self, uint64_t *word, int64_t deadline, uint64_t seen) except -1:
        """Busy-wait (GIL released) up to spin_ns for the counter *word (puts
        or takes) to differ from `seen`, in 20 ms slices with a signal and
        close check between them.  How it spins (poll / yield, adaptive
        budget) is vr_wait.h's policy.

        `seen` is the counter as the caller loaded it (acquire) BEFORE the
        attempt that failed: a put or take landing between that attempt and
        this call has already moved it, so the spin ends at once.  (Loading it
        here instead missed exactly that one, and the waiter spun out its
        whole budget: 30 s stalls of a ping-pong with spin=30.)"""
        cdef int64_t left = self.spin_ns
        cdef int64_t end
        cdef bint moved = False
        # --- issue 10 hook: get waits for puts, put waits for takes ---
        cdef vr_wait_t *pol = &self.wget if word == self.puts else &self.wput
        cdef vr_spin_t sp
        cdef vr_u64_wait_t cond
        cond.word = word
        cond.val = seen
        if left > 0:
            vr_spin_begin(pol, &sp, left)
        while left > 0 and not moved:
            end = <int64_t>vr_now_ns() + (left if left < 20_000_000 else 20_000_000)
            if deadline >= 0 and end > deadline:
                end = deadline
            with nogil:
                moved = vr_spin_run(pol, &sp, vr_u64_moved, &cond, end)
            left -= 20_000_000
            if moved or left <= 0:
                vr_spin_end(pol, &sp, moved)
        # --- end of the issue 10 hook ---
            self.mapped.check()
            if deadline >= 0 and _remaining(deadline) == 0:
                break
            PyErr_CheckSignals()
        return 0

    cdef int _doze(self, int fd, int64_t deadline) except -1:
        """Sleep on fd until signalled, closed, or the deadline, in slices of
        at most 100 ms.  1 = woken or slice over, 0 = deadline passed."""
        cdef int rc
        cdef int64_t rem = _remaining(deadline)
        if rem == 0:
            return 0
        if rem < 0 or rem > SLEEP_SLICE_NS:
            rem = SLEEP_SLICE_NS
        if fd < 0:
            with nogil:
                vr_sleep_ns(50_000)
            return 1
        with nogil:
            rc = _wait_fds(fd, -1, rem)
        if rc == -EINTR:
            PyErr_CheckSignals()
        elif rc < 0:
            raise OSError(-rc, "poll on eventfd failed")
        self.mapped.check()
        return 1

    cdef int _put_once(self, const uint8_t **srcs, const uint64_t *lens, uint32_t n,
                       uint64_t total, int64_t lock_deadline) except -2:
        """Lock, place, unlock, wake.  0 = published, -ENOSPC = full,
        -ETIMEDOUT = the lock's deadline passed (its holder is stuck)."""
        cdef int rc = self._lock(self.plock, lock_deadline)
        if rc < 0:
            return -ETIMEDOUT
        with nogil:
            self._repair_avail()
            rc = self._try_put(srcs, lens, n, total)
            vr_lock_release(self.plock)
            if rc == 0:
                vr_wait_note(self.wput.mine, VR_WS_RUNNING)    # issue 10 hint
                self._wake(self.get_sleepers, self.kick_fd)
                # Several sleepers share one eventfd, and the first to wake
                # drains it: pass the wake-up on while there is room left.
                if vr_load_relaxed_u32(self.put_sleepers) != 0:
                    _signal_fd(self.call_fd)
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
        cdef bint slept = False
        # With a timeout, waiting for the lock counts against it too.
        cdef int64_t lock_deadline = _deadline(timeout) if (block and timeout is not None) else -1
        for k in range(n):
            total = (_align_up(total, ALLOC_ALIGN) if k else 0) + lens[k]
        if total + 2 * REC_HDR > self.data_size or total > self.h.max_msg:
            raise MessageTooLarge(f"message of {total} bytes can never fit: the queue "
                                  f"holds at most {self.max_message} bytes")
        cdef uint64_t takes_seen
        self.mapped.enter()
        try:
            while True:
                # before the attempt (acquire): see _spin
                takes_seen = vr_load_acquire_u64(self.takes)
                rc = self._put_once(srcs, lens, n, total, lock_deadline)
                if rc == 0:
                    return 0
                if rc != -ENOSPC and rc != -ETIMEDOUT:
                    raise MemoryError(f"cannot commit shared memory for a {total}-byte message "
                                      f"({_os_strerror(-rc)}): the machine, its memory cgroup "
                                      f"or /dev/shm is out of memory")
                if rc == -ENOSPC and self.maxsize == 0 and self._really_full(total):
                    # An unbounded queue never blocks and never raises Full:
                    # only its arena (capacity bytes in flight) can run out.
                    raise MemoryError(self._arena_full_message(total))
                if not block or rc == -ETIMEDOUT:
                    raise Full()
                if deadline == -2:
                    # brief spin: room usually appears within microseconds,
                    # when a take makes it; room held by zero-copy views
                    # comes back when their user drops them, moves no
                    # counter a spin could watch, and _unhold wakes the
                    # sleep below
                    deadline = _deadline(timeout)
                    if not self._room_held_by_views():
                        self._spin(self.takes, deadline, takes_seen)
                    continue
                # Announce ourselves, then try once more: a consumer that freed
                # room before seeing the announcement is caught by this retry,
                # one after it writes call_fd (see _wake).
                vr_fetch_add_u32(self.put_sleepers, 1)
                try:
                    vr_fence_sc()
                    rc = self._put_once(srcs, lens, n, total, lock_deadline)
                    if rc == 0:
                        return 0
                    if rc == -ETIMEDOUT:
                        raise Full()
                    if slept and self.check is not None and deadline < 0:
                        self.check()      # still no room after a wake-up: is anyone left?
                    vr_wait_sleeping(&self.wput)            # issue 10 hint
                    rc = self._doze(self.call_fd, deadline)
                    slept = True
                finally:
                    vr_fetch_add_u32(self.put_sleepers, <uint32_t>-1)
                if rc == 0:
                    raise Full()
        finally:
            self.mapped.leave()

    cdef inline bint _room_held_by_views(self) noexcept nogil:
        """After a put found no room: is it the ring or the arena held by
        zero-copy messages (get_nocopy) that reclamation cannot pass or had
        to pin, rather than maxsize?  A hint from relaxed loads (no barrier
        pairs with them): a wrong answer, in a race with a take or a release
        or from a hostile peer's words, costs a sleep instead of a spin or the
        reverse; the announce-fence-retry before the sleep keeps it correct."""
        if self.maxsize and self._count() >= self.maxsize:
            return False
        return vr_load_relaxed_u32(self.pinned) != 0 or \
            <uint16_t>vr_load_relaxed_u32(self.reclaim) != vr_load_relaxed_u16(&self.used.idx)

    cdef inline uint64_t _in_flight(self) noexcept nogil:
        """Arena bytes between the oldest unreclaimed message and the head
        (what the FIFO counts as in use; a snapshot, without the lock)."""
        cdef uint64_t st = vr_load_relaxed_u64(self.pstate)
        cdef uint16_t a = <uint16_t>(st & 0xffff)
        cdef uint16_t r = <uint16_t>vr_load_relaxed_u32(self.reclaim)
        cdef uint64_t tail = (st >> 16) if a == r else vr_load_relaxed_u64(&self.slot_start[r & self.mask])
        return self._pos_diff((st >> 16) % self.pos_mod, tail % self.pos_mod)

    cdef bint _really_full(self, uint64_t total):
        """ENOSPC on an unbounded queue: is at least half the arena in use,
        or are zero-copy results holding the space?  Else the head has met a
        lagging tail right after an early wrap (see _place): the consumers
        free room within moments, so wait for them like a bounded queue."""
        cdef uint64_t used = self._in_flight() + total
        cdef uint32_t k
        if vr_load_relaxed_u32(self.pinned) >= PIN_N:
            return True                          # pins hold the tail back
        for k in range(PIN_N):                   # bytes pinned aside count as used
            if vr_load_relaxed_u32(&self.pins[k].holder):
                used += _align_up(self.pins[k].len, ALLOC_ALIGN)
        return used >= self.data_size // 2

    def _arena_full_message(self, uint64_t total):
        held = self.held_messages()
        why = (f"; {held} message(s) are still held by zero-copy results (get_nocopy), "
               "which keeps their bytes and everything after them in use") if held else ""
        return (f"queue arena full: no room for a {total}-byte message among "
                f"{self.data_size} bytes of capacity ({self._in_flight()} in use){why}")

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

    cdef inline int _note_caller(self) except -1:
        # Once per (process, thread): the queue records who uses it (its
        # PeerDead check counts them).  The last 8 callers are remembered, so
        # threads taking turns on one queue stay off the Python path.
        cdef uint64_t me = vr_lock_me()
        cdef uint32_t k
        if self.registered_pid == vr_getpid():
            if self.callers[0] == me:
                return 0
            for k in range(1, self.ncallers):
                if self.callers[k] == me:
                    return 0
        else:
            self.ncallers = 0                 # a forked child: its own threads only
        self.first_use()
        self.registered_pid = vr_getpid()
        if self.ncallers < 8:
            self.ncallers += 1
        for k in range(self.ncallers - 1, 0, -1):     # newest first
            self.callers[k] = self.callers[k - 1]
        self.callers[0] = me
        return 0

    # --- the Queue's put/get fast path ---------------------------------------------
    def put(self, obj, bint block=True, timeout=None):
        """Queue.put for the default serializer (see vringipc.queue)."""
        self._check_open()
        self._note_caller()
        if type(obj) is bytes:
            # bytes travel as they are (kind 2): one copy in, one copy out
            self.put_msg(MSG_RAW_BYTES, obj, None, block, timeout)
            return
        bufs = []
        main = _mp_dumps(obj, bufs.append)
        if bufs:
            bufs = [b.raw() for b in bufs]
        self.put_msg(MSG_PICKLE, main, bufs, block, timeout)

    def get(self, bint block=True, timeout=None):
        """Queue.get for the default serializer."""
        cdef uint32_t kind = 0
        self._check_open()
        self._note_caller()
        msg = self._take(block, timeout, False, &kind)
        if type(msg) is bytes:           # the fast path: kind is in `kind`, no buffers
            if kind == MSG_RAW_BYTES:
                return msg
            if kind == MSG_PICKLE:
                return _pickle_loads(msg)
            raise _pickle.UnpicklingError(f"queue message of kind {kind}: not for the "
                                          "default serializer")
        k, main, bufs = _parse_message(msg)
        if k == MSG_RAW_BYTES:
            return bytes(main)
        if k != MSG_PICKLE:
            raise _pickle.UnpicklingError(f"queue message of kind {k}: not for the "
                                          "default serializer")
        return _pickle_loads(main, buffers=bufs)

    def put_msg(self, int kind, main, list bufs=None, bint block=True, timeout=None):
        """Put one message as it will lie in shared memory: its kind, the
        main bytes and out-of-band buffers (header: u32 nbufs, u32 kind,
        u64 len(main), u64 len(buf) each; then main and each buffer at the
        next 64-byte boundary)."""
        cdef Py_ssize_t nb = len(bufs) if bufs is not None else 0
        cdef Py_ssize_t i
        cdef uint64_t hdr[2]
        cdef const uint8_t *srcs[2]
        cdef uint64_t lens[2]
        cdef Py_buffer mb
        self._check_open()
        if kind < 0 or kind > MSG_RAW_BYTES:
            raise ValueError(f"unknown message kind {kind}")
        if nb == 0:
            # Common case, no allocation: header on the stack, payload in place.
            PyObject_GetBuffer(main, &mb, PyBUF_SIMPLE)
            try:
                hdr[0] = (<uint64_t>kind) << 32              # nbufs = 0, kind
                hdr[1] = <uint64_t>mb.len
                srcs[0] = <const uint8_t *>hdr
                lens[0] = MSG_HDR
                srcs[1] = <const uint8_t *>mb.buf
                lens[1] = <uint64_t>mb.len
                self._put_c(srcs, lens, 2, block, timeout)
            finally:
                PyBuffer_Release(&mb)
            return
        views = [memoryview(b) for b in bufs]
        meta = PyBytes_FromStringAndSize(NULL, MSG_HDR + 8 * nb)
        cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(meta)
        (<uint32_t *>p)[0] = <uint32_t>nb
        (<uint32_t *>p)[1] = <uint32_t>kind
        (<uint64_t *>(p + 8))[0] = memoryview(main).nbytes
        for i in range(nb):
            (<uint64_t *>(p + MSG_HDR))[i] = views[i].nbytes
        self.put_parts([meta, main] + views, block, timeout)

    def get_msg(self, bint block=True, timeout=None, bint hold=False):
        """Take the next message as it lies in shared memory: (kind, main,
        buffers).  Copies once (main is bytes when there are no buffers, else
        memoryviews of one private bytearray); with hold=True main and buffers
        are read-only views of shared memory pinned until they are collected.
        Raises Empty on timeout / non-blocking, InvalidDescriptor for a
        malformed message (it is consumed), InvalidRing if the ring is
        corrupt, UnpicklingError-class errors never (nothing is unpickled)."""
        cdef uint32_t kind = 0
        self._check_open()
        msg = self._take(block, timeout, hold, &kind)
        if type(msg) is bytes:
            return (<int>kind, msg, [])
        return _parse_message(msg)

    # --- many small messages per call (the bridge, vringipc/bridge.py) ----------------
    # A bridge moves messages as they lie in shared memory.  At 64 bytes the
    # Python around one get_msg()/put_msg() per message cost a bridge more
    # than the queue itself; these two move a run of plain messages (no
    # out-of-band buffers) per call, in the layout of a bridge DATA message:
    # `meta` = count x (u16 kind, u16 0) then count x u32 length, and the
    # payloads back to back in `blob`.

    def take_packed(self, uint32_t max_count, uint64_t max_bytes, uint64_t max_len):
        """Take, without waiting, up to max_count plain messages shorter than
        max_len bytes each and max_bytes together; stops before the first
        message that is not (it stays queued: get_msg() takes it).  Returns
        (count, meta, blob: a bytearray); count 0 when there is none.  A malformed message
        is consumed and raised, after the messages taken before it have been
        returned (on the next call)."""
        cdef uint32_t count = 0, kind
        cdef uint64_t used_b = 0, n, mlen, moff = 0, rlen = 0, next_pos = 0
        cdef uint16_t head = 0
        cdef int rc
        cdef const uint8_t *src
        cdef uint8_t *dst
        cdef uint32_t *m
        self._check_open()
        if self.pending_error is not None:
            err, self.pending_error = self.pending_error, None
            raise err
        if max_count == 0 or max_count > 65536 or max_bytes == 0:
            raise ValueError("take_packed: 1 <= max_count <= 65536, max_bytes > 0")
        # everything allocated before the consumer lock (no Python code under it)
        meta = PyBytes_FromStringAndSize(NULL, 8 * max_count)
        blob = PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>max_bytes)
        m = <uint32_t *>PyBytes_AS_STRING(meta)
        dst = <uint8_t *>PyByteArray_AS_STRING(blob)
        self.mapped.enter()
        try:
            while count < max_count:
                if self._lock(self.clock_, -1) < 0:
                    break
                with nogil:
                    rc = self._get_begin(&head, &moff, &rlen, &next_pos)
                if rc == 3:
                    continue
                if rc == 0:
                    break
                if rc < 0:
                    err = _host_error(&self.h, rc, head)
                    if count == 0:
                        raise err
                    self.pending_error = err
                    break
                # rc 1 or 2: the consumer lock is ours and nothing is committed
                if rc == 1:
                    n = self.riov.total
                    src = self.base + self.riov.seg[0].off
                else:
                    n = rlen
                    src = self.base + moff
                # each field read once: the bytes are shared and not trusted
                kind = vr_load_relaxed_u32(<uint32_t *>src + 1) if n >= 64 else 0
                if (rc == 1 and self.riov.used != 1) or n < 64 or (<uint32_t *>src)[0] != 0 \
                        or kind > MSG_RAW_BYTES:
                    vr_lock_release(self.clock_)       # not plain: leave it queued
                    break
                mlen = vr_load_relaxed_u64(<uint64_t *>(src + 8))
                if mlen > n - 64 or mlen >= max_len or used_b + mlen > max_bytes:
                    vr_lock_release(self.clock_)
                    break
                with nogil:
                    memcpy(dst + used_b, src + 64, mlen)
                    m[count] = kind                         # nbufs 0
                    m[max_count + count] = <uint32_t>mlen
                    self._commit_taken(rc, 0, head, next_pos)
                used_b += mlen
                count += 1
        finally:
            self.mapped.leave()
        if count == 0:
            return 0, b"", b""
        # meta as the DATA header wants it: the kinds, then the lengths
        memmove(m + count, m + max_count, 4 * count)          # may overlap
        PyByteArray_Resize(blob, <Py_ssize_t>used_b)       # shrinks in place
        return count, meta[:8 * count], blob

    def put_packed(self, meta, blob, uint32_t start, uint32_t count, bint block=True,
                   timeout=None, record=None, Py_ssize_t record_off=0, uint64_t seq=0):
        """Put plain messages start .. count-1 of a (meta, blob) pair as
        take_packed() returns it, each as put_msg() would.  Returns how many
        were put (fewer than asked when one timed out: Full is not raised
        then, the caller decides).  With `record` (a writable buffer), the
        u64 at record_off is set to seq + (messages put so far) after each
        put: a caller killed in the middle leaves an exact count behind."""
        cdef const uint8_t[::1] mv = meta
        cdef const uint8_t[::1] bv = blob
        cdef uint8_t[::1] rv
        cdef const uint32_t *m
        cdef uint64_t hdr[2]
        cdef const uint8_t *srcs[2]
        cdef uint64_t lens[2]
        cdef uint64_t pos = 0, k
        cdef uint32_t i, kind
        self._check_open()
        if <uint64_t>mv.shape[0] != 8 * <uint64_t>count or start > count:
            raise ValueError("put_packed: meta is not count x (u16 kind, u16 0, u32 length)")
        m = <const uint32_t *>&mv[0] if count else NULL
        for k in range(count):                  # checked whole before the first put
            kind = m[k]
            if (kind & 0xffff) > MSG_RAW_BYTES or (kind >> 16) != 0:
                raise ValueError(f"put_packed: message {k} has kind {kind & 0xffff}, "
                                 f"{kind >> 16} buffers")
            pos += m[count + k]
        if pos != <uint64_t>bv.shape[0]:
            raise ValueError(f"put_packed: the lengths add up to {pos}, the blob has "
                             f"{bv.shape[0]} bytes")
        if record is not None:
            rv = record
            if record_off < 0 or record_off + 8 > rv.shape[0] or record_off % 8:
                raise ValueError("put_packed: record_off outside the record buffer")
        pos = 0
        for k in range(start):
            pos += m[count + k]
        srcs[0] = <const uint8_t *>hdr
        lens[0] = MSG_HDR
        for i in range(start, count):
            hdr[0] = (<uint64_t>(m[i] & 0xffff)) << 32          # nbufs = 0, kind
            hdr[1] = m[count + i]
            srcs[1] = &bv[pos] if hdr[1] else <const uint8_t *>hdr
            lens[1] = hdr[1]
            try:
                self._put_c(srcs, lens, 2, block, timeout)
            except Full:
                return i - start
            pos += hdr[1]
            if record is not None:
                # one whole 8-byte store (the record outlives a SIGKILL of
                # this process; a torn count would repeat messages)
                vr_store_relaxed_u64(<uint64_t *>&rv[record_off], seq + i - start + 1)
        return count - start

    # --- consumer ------------------------------------------------------------------
    cdef int _get_begin(self, uint16_t *head, uint64_t *moff, uint64_t *mlen,
                        uint64_t *next_pos) noexcept nogil:
        """Under the consumer lock: look at the next message.  1 = a message
        of its own, walked into self.riov; 2 = a record of the batch at
        `head`: [moff, +mlen) in the segment, the batch cursor goes to
        next_pos (see _batch_commit); both keep the lock.  3 = an exhausted
        batch was completed (lock released, look again); 0 = empty; <0 = ring
        or message corrupt (*head: the offending index).  0, 3 and <0 release
        the lock."""
        cdef uint16_t u, a
        cdef int rc
        cdef const uint8_t *b
        u = vr_load_relaxed_u16(&self.used.idx)
        # Barrier A (acquire): pairs with the producer's release of avail->idx.
        a = vr_load_acquire_u16(&self.avail.idx)
        if a == u:
            # A producer killed between its commit and its avail->idx store
            # leaves a complete message that only PROD_STATE shows: publish it.
            # CAS from the value seen: if a live producer has moved avail->idx
            # on meanwhile, this repair must not move it back.
            if <uint16_t>(vr_load_acquire_u64(self.pstate) & 0xffff) == <uint16_t>(u + 1):
                vr_cas_u16(&self.avail.idx, u, <uint16_t>(u + 1))
                a = vr_load_acquire_u16(&self.avail.idx)
            if a == u:
                vr_lock_release(self.clock_)
                return 0
        if <uint16_t>(a - u) > self.num:
            vr_lock_release(self.clock_)
            head[0] = a
            return vrh_fail(&self.h, EINVAL, R_AVAIL_JUMP, u, a, True)
        head[0] = vr_load_relaxed_u16(&self.avail.ring[u & self.mask])
        if head[0] >= self.num:
            vr_lock_release(self.clock_)
            return vrh_fail(&self.h, EINVAL, R_HEAD_RANGE, head[0], self.num, True)
        rc = vrh_walk(&self.h, head[0], &self.riov, NULL)
        self.h.broken = False
        if rc < 0:
            # A malformed message is consumed (reported to the caller) so
            # that it cannot wedge the queue.
            self._get_commit(0, head[0], 1)
            return rc
        if self.riov.used == 1 and self.riov.seg[0].len >= 8:
            b = self.base + self.riov.seg[0].off
            if (<const uint32_t *>b)[0] == BATCH_MARK and (<const uint32_t *>b)[1] == BATCH_KIND:
                return self._batch_next(u, head[0], moff, mlen, next_pos)
        return 1

    cdef int _batch_next(self, uint16_t u, uint16_t head, uint64_t *moff, uint64_t *mlen,
                         uint64_t *next_pos) noexcept nogil:
        """The next record of the batch at used index u (see _put_batch).
        Everything read from shared memory is checked: positions inside the
        batch's span, records inside the data region."""
        # One acquire load of PROD_STATE gives both whether the batch is the
        # newest descriptor and, if so, where its records end (pairs with
        # the producers' release store of it).
        cdef uint64_t st = vr_load_acquire_u64(self.pstate)
        cdef bint newest = <uint16_t>(st & 0xffff) == <uint16_t>(u + 1)
        cdef uint64_t bstart = vr_load_relaxed_u64(&self.slot_start[u & self.mask])
        cdef uint64_t end = (st >> 16) if newest else \
            vr_load_relaxed_u64(&self.slot_start[<uint16_t>(u + 1) & self.mask])
        cdef uint64_t cur = vr_load_relaxed_u64(self.cursor)
        cdef uint64_t cpos, span, o, ln, k
        if bstart >= self.pos_mod or end >= self.pos_mod or \
                self.data_off + bstart % self.data_size != self.riov.seg[0].off:
            self._get_commit(0, head, 1)
            return vrh_fail(&self.h, EINVAL, D_ADDR, bstart, end, False)
        span = self._pos_diff(end, bstart)
        cpos = (cur >> 16) if <uint16_t>(cur & 0xffff) == u else self._pos_add(bstart, REC_HDR)
        for k in range(3):                     # at most one skip record in a row
            if cpos >= self.pos_mod or self._pos_diff(cpos, bstart) > span or span > self.data_size:
                break
            if cpos == end:
                if newest:
                    # All taken.  Producers append to this batch only while
                    # the ring is full; with their lock (tried, never waited
                    # for: we hold ours) it can be completed safely, which
                    # frees its slot and lets the drained arena be trimmed.
                    if vr_lock_try(self.plock, vr_lock_me()):
                        if vr_load_relaxed_u64(self.pstate) == st:
                            self._get_commit(0, head, 0)
                            self._drained()
                        else:
                            vr_lock_release(self.clock_)
                        vr_lock_release(self.plock)
                    else:
                        vr_lock_release(self.clock_)
                    return 0
                self._get_commit(0, head, 0)   # exhausted: the next descriptor follows
                return 3
            o = cpos % self.data_size
            if o + REC_HDR > self.data_size or self._pos_diff(end, cpos) < REC_HDR:
                break
            ln = (<const uint64_t *>(self.base + self.data_off + o))[0]
            if ln == REC_SKIP:
                cpos = self._pos_add(cpos, self.data_size - o)
                continue
            if ln > self.data_size - o - REC_HDR or \
                    REC_HDR + _align_up(ln, ALLOC_ALIGN) > self._pos_diff(end, cpos) or \
                    ln > self.h.max_msg:
                break
            moff[0] = self.data_off + o + REC_HDR
            mlen[0] = ln
            next_pos[0] = self._pos_add(cpos, REC_HDR + _align_up(ln, ALLOC_ALIGN))
            if next_pos[0] == end and not newest:
                next_pos[0] = REC_SKIP         # the last record: completing commits it
            return 2
        # A corrupt batch is consumed whole, like any malformed message.
        self._get_commit(0, head, 1)
        return vrh_fail(&self.h, EINVAL, D_ADDR, cpos, end, False)

    cdef void _batch_commit(self, uint16_t head, uint64_t next_pos) noexcept nogil:
        """Commit taking one batch record: the cursor store is the commit
        point (release; the next consumer acquires nothing else from us),
        or for the batch's last record, completing the descriptor."""
        cdef uint16_t u = vr_load_relaxed_u16(&self.used.idx)
        if next_pos == REC_SKIP:
            self._get_commit(0, head, 1)
            return
        vr_store_release_u64(self.cursor, (<uint64_t>u) | (next_pos << 16))
        vr_store_release_u64(self.takes, vr_load_relaxed_u64(self.takes) + 1)
        vr_lock_release(self.clock_)

    cdef void _get_commit(self, uint64_t holder, uint16_t head, int took) noexcept nogil:
        """Record the holder, commit (used->idx), release the lock, wake producers."""
        cdef uint16_t u = vr_load_relaxed_u16(&self.used.idx)
        if self.held[u & self.mask] != holder:     # avoid dirtying a line producers read
            self.held[u & self.mask] = holder
        vr_store_relaxed_u32(&self.used.ring[u & self.mask].id, head)
        vr_store_relaxed_u32(&self.used.ring[u & self.mask].len, 0)
        # The commit point (release): our reads of the message and HELD[] are
        # ordered before producers may reuse its bytes (they acquire used->idx).
        vr_store_release_u16(&self.used.idx, <uint16_t>(u + 1))
        if took:
            vr_store_release_u64(self.takes, vr_load_relaxed_u64(self.takes) + 1)
        vr_lock_release(self.clock_)
        vr_wait_note(self.wget.mine, VR_WS_RUNNING)        # issue 10 hint
        self._wake(self.put_sleepers, self.call_fd)
        # Several consumers sleep on one eventfd and the first one up drains
        # it: pass the wake-up on while messages are left.
        if vr_load_relaxed_u32(self.get_sleepers) != 0 and \
                vr_load_relaxed_u16(&self.avail.idx) != <uint16_t>(u + 1):
            _signal_fd(self.kick_fd)

    cdef void _commit_taken(self, int rc, uint64_t holder, uint16_t head,
                            uint64_t next_pos) noexcept nogil:
        if rc == 2:
            self._batch_commit(head, next_pos)
        else:
            self._get_commit(holder, head, 1)
        self._trim_if_drained()

    cdef object _take(self, bint block, object timeout, bint hold, uint32_t *kind):
        """Take the next message.  Returns bytes (the main payload of a
        message without buffers; its kind in *kind), or the whole message as
        a bytearray copy, or with hold=True as a HeldMessage pinning its bytes
        in shared memory (a message packed in a batch is copied even then).
        Everything is allocated before the lock is taken or with allocators
        that run no Python code (bytes, bytearray: no GC)."""
        cdef int rc
        cdef int64_t deadline = -2
        cdef uint64_t n, mlen, moff = 0, rlen = 0, next_pos = 0
        cdef uint16_t head = 0
        cdef bytearray out
        cdef uint8_t *dst
        cdef const uint8_t *src
        cdef HeldMessage hm = None
        cdef bint slept = False
        cdef int64_t lock_deadline = _deadline(timeout) if (block and timeout is not None) else -1
        if hold:
            hm = HeldMessage.__new__(HeldMessage)     # GC-tracked: allocate outside the lock
        cdef uint64_t puts_seen
        self.mapped.enter()
        try:
            while True:
                # before the attempt (acquire): messages it counts are
                # published, so a put after it is one the attempt may miss
                puts_seen = vr_load_acquire_u64(self.puts)
                if self._lock(self.clock_, lock_deadline) < 0:
                    raise Empty()
                with nogil:
                    rc = self._get_begin(&head, &moff, &rlen, &next_pos)
                if rc == 3:
                    continue                   # completed an exhausted batch: look again
                if rc == 1 or rc == 2:
                    # We hold the consumer lock and the message is not
                    # committed: if we die now it stays for another consumer.
                    if rc == 1:
                        n = self.riov.total
                        src = self.base + self.riov.seg[0].off
                    else:
                        n = rlen
                        src = self.base + moff
                    if hold and rc == 1:
                        hm.q = self
                        hm.slot = vr_load_relaxed_u16(&self.used.idx) & self.mask
                        # Pinned by the PROCESS (a view may outlive the thread
                        # that took it); reclaimed when that process is gone.
                        hm.holder = vr_getpid()
                        hm.pos = vr_load_relaxed_u64(&self.slot_start[hm.slot])
                        hm.ptr = src if self.riov.used == 1 else self.base
                        hm.length = self.riov.seg[0].len if self.riov.used == 1 else 0
                        self.mapped.pins += 1
                        with nogil:
                            self._get_commit(hm.holder | (hm.pos << 32), head, 1)
                        return hm
                    # Fast path: a message with no out-of-band buffers comes
                    # back as its main bytes alone (one copy, no parsing).
                    if (rc == 2 or self.riov.used == 1) and n >= 64 + MSG_HDR:
                        mlen = (<uint64_t *>(src + 8))[0]
                        if (<uint32_t *>src)[0] == 0 and mlen <= n - 64:
                            kind[0] = (<uint32_t *>src)[1]
                            try:
                                fast = PyBytes_FromStringAndSize(<char *>(src + 64), <Py_ssize_t>mlen)
                            finally:
                                with nogil:
                                    self._commit_taken(rc, 0, head, next_pos)
                            return fast
                    try:
                        out = bytearray(n)
                    except BaseException:
                        vr_lock_release(self.clock_)
                        raise
                    dst = <uint8_t *>(<char *>out)
                    with nogil:
                        if rc == 1:
                            vrh_iov_pull(&self.riov, self.base, dst, n)
                        else:
                            memcpy(dst, src, n)
                        self._commit_taken(rc, 0, head, next_pos)
                    return out
                if rc < 0:
                    raise _host_error(&self.h, rc, head)
                if not block:
                    raise Empty()
                if deadline == -2:
                    deadline = _deadline(timeout)
                    self._spin(self.puts, deadline, puts_seen)
                    continue
                vr_fetch_add_u32(self.get_sleepers, 1)
                try:
                    vr_fence_sc()
                    # re-check after announcing (pairs with _wake in the producer)
                    if self._count() != 0:
                        continue
                    if slept and self.check is not None and deadline < 0:
                        # Blocked for good and still nothing: is anyone left?  (With
                        # a timeout the caller gets Empty at the deadline, as with
                        # multiprocessing, so drain loops keep working.)
                        self.check()
                    if slept:
                        self._trim_if_drained()     # what a rate-limited trim left (_trim)
                    vr_wait_sleeping(&self.wget)            # issue 10 hint
                    rc = self._doze(self.kick_fd, deadline)
                    slept = True
                finally:
                    vr_fetch_add_u32(self.get_sleepers, <uint32_t>-1)
                if rc == 0:
                    raise Empty()
        finally:
            self.mapped.leave()

    def get_raw(self, bint block=True, timeout=None, bint hold=False):
        """The whole message: bytearray (or HeldMessage with hold=True), or
        bytes of the main payload for a message without buffers.  Prefer
        get_msg(), which also says the kind."""
        cdef uint32_t kind = 0
        self._check_open()
        return self._take(block, timeout, hold, &kind)

    cdef _unhold(self, uint32_t slot, uint32_t holder, uint64_t pos):
        """Release a HeldMessage's pin: in HELD[slot] if reclamation has not
        reached it, else in the PINNED table (see _pin)."""
        cdef uint64_t h = (<uint64_t>holder) | (pos << 32)
        cdef uint32_t k
        if self.mapped.has_view:
            if not vr_cas_u64(&self.held[slot], h, 0):
                for k in range(PIN_N):
                    if vr_load_acquire_u32(&self.pins[k].holder) == holder and \
                            self.pins[k].pos == pos and vr_cas_u32(&self.pins[k].holder, holder, 0):
                        vr_fetch_add_u32(self.pinned, <uint32_t>-1)
                        break
            if not self.mapped.closing:
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
            return self._count() == 0
        if which == 2:
            return vr_load_acquire_u64(self.unfinished) != 0
        return True

    def sleep_end(self, int which):
        if not self.mapped.has_view:
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
        """Block until unfinished tasks reach zero.  False on timeout.  Without
        a timeout, check() runs every slice and may raise (PeerDead when no
        one is left who could call task_done)."""
        self._check_open()
        cdef int64_t deadline = _deadline(timeout)
        cdef int rc
        cdef int64_t rem
        self.mapped.enter()
        try:
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
                    if rem < 0 or rem > SLEEP_SLICE_NS:
                        rem = SLEEP_SLICE_NS
                    with nogil:
                        rc = _wait_fds(self.join_fd, -1, rem)
                    if rc == -EINTR:
                        PyErr_CheckSignals()
                    self.mapped.check()
                    if rc == 0 and deadline < 0 and self.check is not None:
                        self.check()
                finally:
                    vr_fetch_add_u32(self.join_sleepers, <uint32_t>-1)
        finally:
            self.mapped.leave()
