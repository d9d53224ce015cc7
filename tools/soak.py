#!/usr/bin/env python3
"""vringipc soak test: load, random SIGKILLs and restarts, every payload checked.

    python tools/soak.py --minutes 10 --json soak.json      # the standard run
    python tools/soak.py --seconds 15                        # CI-sized

What runs (all forked from this orchestrator, which uses neither end itself):

* a Queue (named shm segment) with ``--producers`` producer processes
  (pickled bytes, in-band or as out-of-band PickleBuffers) and ``--consumers``
  consumer processes (get and zero-copy get_nocopy, holding up to 3 zero-copy
  messages at a time);
* a Channel (named shm segment) with one producer and one consumer process,
  mixing send / send_many / loan and recv / recv_into / recv_view / recv_many
  (``--no-channel`` to leave it out).

Messages are 64 B .. 1 MiB (log-uniform; ``--min-size`` / ``--max-size``):
``u64 id | u32 size | payload | blake2b-128(id, size, payload)``, where id packs
(stream, producer slot, incarnation, sequence number).  Every received message
is checked and logged (16-byte records, one file per consumer incarnation,
os.write: durable across the consumer's SIGKILL).

About every ``--kill-interval`` seconds (exponential), a random worker is
SIGSTOPped, its state word read (what it was doing: idle, inside put/send,
inside get/recv with how many messages at risk, holding a view of which
message), then SIGKILLed, reaped, and restarted a moment later as a new
incarnation.  At the end producers stop, consumers drain, and the logs are
checked against docs/GUARANTEES.md:

* lost: an acked message (put/send returned) that nobody received.  A consumer
  killed inside get/recv may lose what it was taking (at most its "at risk"
  count): those are reported as lost_with_killed_consumer; anything beyond is
  unexplained_lost and fails the run.
* duplicated: a message received twice fails the run, except the known
  Channel bug (a view held by a killed consumer is redelivered to the next),
  reported separately as redelivered_after_killed_view_holder.
* corrupt (checksum), phantom (never sent), out-of-order (per consumer, per
  producer): all must be 0.
* open fds and RSS of this process and of long-lived workers, and vringipc
  entries in /dev/shm, at start and end: must be flat.

Prints a summary, writes JSON with --json; exit status 0 iff the verdict is ok.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import mmap
import os
import pickle
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import vringipc  # noqa: E402
from vringipc import Channel, Empty, Full, PeerDead, Queue  # noqa: E402
from vringipc.errors import ChannelClosed  # noqa: E402
from vringipc.segment import name_pid  # noqa: E402
from vringipc.testing import shm_entries  # noqa: E402

# --- message format ---------------------------------------------------------------------

HDR = struct.Struct("<QI")            # id, payload size
DIGEST = 16
REC = struct.Struct("<QII")            # log record: id, total length, flags
F_CORRUPT = 1

SEQ_BITS, INC_BITS, SLOT_BITS = 36, 16, 8
SEQ_MASK = (1 << SEQ_BITS) - 1
STREAM_QUEUE, STREAM_CHANNEL = 0, 1


def make_id(stream: int, slot: int, inc: int, seq: int) -> int:
    return (stream << 60) | (slot << 52) | ((inc & 0xFFFF) << SEQ_BITS) | seq


def split_id(key: int) -> tuple[int, int, int, int]:
    return key >> 60, (key >> 52) & 0xFF, (key >> SEQ_BITS) & 0xFFFF, key & SEQ_MASK


def build_message(key: int, n: int, block: bytes, rng: random.Random) -> bytes:
    off = rng.randrange(0, 4096)
    head = HDR.pack(key, n)
    payload = block[off:off + n]
    return head + payload + hashlib.blake2b(head + payload, digest_size=DIGEST).digest()


def peek_id(data) -> tuple[int, int]:
    """(id, length) from the header, without checking anything."""
    mv = memoryview(data).cast("B")
    if len(mv) < HDR.size:
        return 0, len(mv)
    return HDR.unpack_from(mv, 0)[0], len(mv)


def verify_message(data) -> tuple[int, int]:
    """(id, flags): flags F_CORRUPT if the length or the checksum is wrong."""
    mv = memoryview(data).cast("B")
    if len(mv) < HDR.size + DIGEST:
        return 0, F_CORRUPT
    key, n = HDR.unpack_from(mv, 0)
    if len(mv) != HDR.size + n + DIGEST:
        return key, F_CORRUPT
    h = hashlib.blake2b(mv[:HDR.size + n], digest_size=DIGEST).digest()
    return key, (0 if h == mv[HDR.size + n:] else F_CORRUPT)


# --- shared status words ----------------------------------------------------------------

G_STOP, G_PRODUCERS_DONE = 0, 4
SLOT0, SLOT_SIZE = 64, 128
S_PHASE, S_RISK, S_BEAT, S_ACKED, S_HELD = 0, 4, 8, 16, 24
S_FDS0, S_FDS1, S_RSS0, S_RSS1, S_MSGS, S_INC, S_PIDFDS = 32, 36, 40, 48, 56, 64, 68
IDLE, IN_PUT, IN_GET, HOLD = 0, 1, 2, 3
PHASES = {IDLE: "idle", IN_PUT: "in_put", IN_GET: "in_get", HOLD: "holding_view"}
EXIT_OK, EXIT_PEER, EXIT_ERROR = 0, 3, 4


class Status:
    """A worker's words in the shared anonymous mapping, read by the
    orchestrator while the worker is stopped or gone.  Every store is one
    aligned machine-word store (a memoryview item): struct.pack_into zeroes a
    field and then writes it a byte at a time, and a worker SIGKILLed in
    between would leave a zeroed phase or acked count behind."""

    def __init__(self, mm: mmap.mmap, index: int):
        self.mm = mm
        self.base = SLOT0 + SLOT_SIZE * index
        self.w32 = memoryview(mm).cast("I")
        self.w64 = memoryview(mm).cast("q")

    def set32(self, off, v):
        self.w32[(self.base + off) >> 2] = v

    def get32(self, off):
        return self.w32[(self.base + off) >> 2]

    def set64(self, off, v):
        self.w64[(self.base + off) >> 3] = v

    def get64(self, off):
        return self.w64[(self.base + off) >> 3]

    def phase(self, p, risk=0):
        # phase and risk in one 8-byte store: never one without the other
        self.w64[(self.base + S_PHASE) >> 3] = p | risk << 32

    def beat(self):
        self.set64(S_BEAT, self.get64(S_BEAT) + 1)


def g_get(mm, off):
    return struct.unpack_from("<I", mm, off)[0]


def g_set(mm, off, v):
    with memoryview(mm) as m, m.cast("I") as w:
        w[off >> 2] = v


def count_fds(pidfds: bool = True) -> int:
    """Open fds of this process.  pidfds=False leaves out pidfds: a Channel end
    opens one on its peer the first time it waits, and re-points it when the
    peer changes, so it may appear after the first sample without leaking
    (they are counted apart, see count_pidfds)."""
    if pidfds:
        return len(os.listdir("/proc/self/fd")) - 1      # minus listdir's own fd
    return sum(1 for k in _fd_kinds() if k != "anon_inode:[pidfd]")


def count_pidfds() -> int:
    return sum(1 for k in _fd_kinds() if k == "anon_inode:[pidfd]")


def _fd_kinds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:                       # listdir's own fd, closed by now
            pass
    return out


def rss_kb(field: str = "RssAnon") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# --- workers ----------------------------------------------------------------------------

class Worker:
    """Common worker plumbing: status, log file, sizes, rate, resource samples."""

    def __init__(self, cfg, mm, index, stream, slot, inc, logdir, role):
        self.cfg, self.mm, self.st = cfg, mm, Status(mm, index)
        self.stream, self.slot, self.inc, self.role = stream, slot, inc, role
        self.rng = random.Random((cfg.seed, index, inc).__hash__())
        self.logfd = -1
        if role.endswith("c"):
            self.logfd = os.open(os.path.join(logdir, f"{role}_{slot}_{inc}.log"),
                                 os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        self.errpath = os.path.join(logdir, f"err_{role}_{slot}_{inc}.txt")
        self.msgs = 0
        self.sampled = False
        self.next_sample = 0.0
        self.lo, self.hi = math.log(cfg.min_size), math.log(cfg.max_size)
        self.next_send = time.monotonic()

    def size(self) -> int:
        return int(math.exp(self.rng.uniform(self.lo, self.hi)))

    def stopping(self) -> bool:
        return g_get(self.mm, G_STOP) != 0

    def producers_done(self) -> bool:
        return g_get(self.mm, G_PRODUCERS_DONE) != 0

    def throttle(self):
        if self.cfg.rate > 0:
            self.next_send += 1.0 / self.cfg.rate
            delay = self.next_send - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                self.next_send = time.monotonic()

    def sample(self):
        now = time.monotonic()
        if now < self.next_sample:
            return
        self.next_sample = now + 1.0
        if not self.sampled and self.msgs >= 20:
            self.st.set32(S_FDS0, count_fds(pidfds=False))
            self.st.set64(S_RSS0, rss_kb())
            self.sampled = True
        if self.sampled:
            self.st.set32(S_FDS1, count_fds(pidfds=False))
            self.st.set32(S_PIDFDS, count_pidfds())
            self.st.set64(S_RSS1, rss_kb())

    def log(self, key, length, flags):
        os.write(self.logfd, REC.pack(key, length, flags))
        self.msgs += 1
        self.st.set64(S_MSGS, self.msgs)

    def got(self, data):
        """Record a received message first (it is in our hands now: a kill from
        here on is no loss), then check it; a bad one gets a second record."""
        key, length = peek_id(data)
        self.st.set64(S_HELD, key)                 # before the record: see record_end
        self.log(key, length, 0)
        k2, flags = verify_message(data)
        if flags or k2 != key:
            os.write(self.logfd, REC.pack(key, length, F_CORRUPT))
        return key

    def error(self, text: str):
        with open(self.errpath, "a") as f:
            f.write(text)


def queue_producer(w: Worker, q: Queue, block: bytes):
    seq = 0
    pb = pickle.PickleBuffer
    while not w.stopping():
        w.throttle()
        m = build_message(make_id(STREAM_QUEUE, w.slot, w.inc, seq), w.size(), block, w.rng)
        obj = pb(bytearray(m)) if w.rng.random() < 0.3 else m     # out-of-band or in-band
        while True:
            w.st.phase(IN_PUT, 1)
            try:
                q.put(obj, timeout=0.5)
                break
            except Full:
                w.st.phase(IDLE)
            except PeerDead:                       # nobody else alive right now
                w.st.phase(IDLE)
                time.sleep(0.02)
            w.st.beat()
            if w.stopping():
                return
        w.st.set64(S_ACKED, seq)
        w.st.phase(IDLE)
        seq += 1
        w.msgs += 1
        w.st.beat()
        w.sample()


def queue_consumer(w: Worker, q: Queue):
    held = []
    while True:
        nocopy = w.rng.random() < 0.4
        w.st.phase(IN_GET, 1)
        try:
            obj = q.get_nocopy(timeout=0.3) if nocopy else q.get(timeout=0.3)
        except (Empty, PeerDead):
            w.st.phase(IDLE)
            w.st.beat()
            if w.producers_done():
                try:
                    obj = q.get_nowait()           # a last look, then done
                except Empty:
                    return
            else:
                continue
        w.got(obj)
        w.st.phase(IDLE)
        if nocopy:
            held.append(obj)                       # keep a few zero-copy messages pinned
        while len(held) > w.rng.randint(0, 3):
            held.pop(0)
        w.st.beat()
        w.sample()


def channel_producer(w: Worker, ch: Channel, block: bytes):
    seq = 0
    try:
        while not w.stopping():
            w.throttle()
            how = w.rng.random()
            if how < 0.2:                          # a batch
                k = w.rng.randint(2, 5)
                msgs = [build_message(make_id(STREAM_CHANNEL, 0, w.inc, seq + i),
                                      min(w.size(), ch.capacity // 8), block, w.rng)
                        for i in range(k)]
                w.st.phase(IN_PUT, k)
                ch.send_many(msgs, timeout=5)
            else:
                k = 1
                m = build_message(make_id(STREAM_CHANNEL, 0, w.inc, seq), w.size(), block, w.rng)
                w.st.phase(IN_PUT, 1)
                if how < 0.5:
                    with ch.loan(len(m), timeout=5) as buf:   # written in place
                        buf[:] = m
                else:
                    ch.send(m, timeout=5)
            w.st.set64(S_ACKED, seq + k - 1)
            w.st.phase(IDLE)
            seq += k
            w.msgs += k
            w.st.beat()
            w.sample()
    except (Full, PeerDead):
        # Consumer gone (or stuck): exit and be restarted; a new process
        # re-claims the role.  The phase stays IN_PUT: part of a send_many
        # batch may have been published before the error.
        raise SystemExit(EXIT_PEER)
    ch.close()                                     # clean end: the consumer sees ChannelClosed


def channel_consumer(w: Worker, ch: Channel):
    buf = bytearray(ch.capacity)
    while True:
        how = w.rng.random()
        w.st.set64(S_HELD, 0)
        try:
            if how < 0.3:
                w.st.phase(IN_GET, 1)
                items = [ch.recv(timeout=0.3)]
            elif how < 0.5:
                w.st.phase(IN_GET, 1)
                n = ch.recv_into(buf, timeout=0.3)
                items = [memoryview(buf)[:n]]
            elif how < 0.7:
                w.st.phase(IN_GET, 4)
                items = ch.recv_many(4, timeout=0.3)
            else:
                w.st.phase(IN_GET, 1)
                v = ch.recv_view(timeout=0.3)
                w.got(v)
                w.st.phase(HOLD)
                if w.rng.random() < 0.3:
                    time.sleep(w.rng.uniform(0, 0.005))
                v.release()
                w.st.phase(IDLE)
                w.st.beat()
                w.sample()
                continue
        except ChannelClosed:
            w.st.phase(IDLE)
            return
        except (Empty, PeerDead):
            w.st.phase(IDLE)
            w.st.beat()
            if w.producers_done():
                return
            time.sleep(0.01)
            continue
        for m in items:
            w.got(m)
        w.st.phase(IDLE)
        w.st.beat()
        w.sample()


def worker_main(cfg, mm, index, role, slot, inc, logdir, q, ch, block) -> int:
    stream = STREAM_CHANNEL if role in ("cp", "cc") else STREAM_QUEUE
    w = Worker(cfg, mm, index, stream, slot, inc, logdir, role)
    try:
        if role == "qp":
            queue_producer(w, q, block)
        elif role == "qc":
            queue_consumer(w, q)
        elif role == "cp":
            channel_producer(w, ch, block)
        else:
            channel_consumer(w, ch)
        w.sample()
        return EXIT_OK
    except SystemExit as e:
        return int(e.code or 0)
    except BaseException:
        w.error(traceback.format_exc())
        return EXIT_ERROR


# --- orchestrator -----------------------------------------------------------------------

class Slot:
    def __init__(self, index, role, slot):
        self.index, self.role, self.slot = index, role, slot
        self.pid = 0
        self.inc = -1
        self.started = 0.0
        self.restart_at = 0.0
        self.last_beat = (0, 0.0)
        self.last_exit = None


class Soak:
    def __init__(self, cfg):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.logdir = cfg.workdir or tempfile.mkdtemp(prefix="vr_soak_")
        os.makedirs(self.logdir, exist_ok=True)
        self.slots = ([Slot(0, "qp", i) for i in range(cfg.producers)]
                      + [Slot(0, "qc", i) for i in range(cfg.consumers)])
        if not cfg.no_channel:
            self.slots += [Slot(0, "cp", 0), Slot(0, "cc", 0)]
        for i, s in enumerate(self.slots):
            s.index = i
        self.mm = mmap.mmap(-1, SLOT0 + SLOT_SIZE * len(self.slots))
        self.incs = {}           # (stream, slot, inc) -> producer record
        self.consumer_incs = []  # consumer records
        self.kills = []
        self.exits = {"ok": 0, "peer_restart": 0, "error": 0, "signal": 0}
        self.errors = []
        self.stalls = []
        self.inc_counter = {}
        self.our_pids = {os.getpid()}
        self.block = os.urandom(cfg.max_size + 4096)

    # --- process management -----------------------------------------------------------
    def start(self, s: Slot):
        key = (s.role, s.slot)
        s.inc = self.inc_counter.get(key, -1) + 1
        self.inc_counter[key] = s.inc
        st = Status(self.mm, s.index)
        self.mm[st.base:st.base + SLOT_SIZE] = bytes(SLOT_SIZE)
        st.set64(S_ACKED, -1)
        st.set32(S_INC, s.inc)
        pid = os.fork()
        if pid == 0:                               # worker
            code = EXIT_ERROR
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                code = worker_main(self.cfg, self.mm, s.index, s.role, s.slot, s.inc,
                                   self.logdir, self.q, self.ch, self.block)
            finally:
                os._exit(code)
        s.pid = pid
        self.our_pids.add(pid)
        s.started = time.monotonic()
        s.last_beat = (0, s.started)

    def record_end(self, s: Slot, how: str, status_code: int | None, phase=None, risk=0,
                   acked=None, held=None):
        st = Status(self.mm, s.index)
        if phase is None:
            phase, risk = st.get32(S_PHASE), st.get32(S_RISK)
        if acked is None:
            acked = st.get64(S_ACKED)
        if held is None:
            held = st.get64(S_HELD)
        life = time.monotonic() - s.started
        res = {"fds0": st.get32(S_FDS0), "fds1": st.get32(S_FDS1), "pidfds": st.get32(S_PIDFDS),
               "rss0": st.get64(S_RSS0), "rss1": st.get64(S_RSS1), "life": life}
        if s.role in ("qp", "cp"):
            stream = STREAM_CHANNEL if s.role == "cp" else STREAM_QUEUE
            self.incs[(stream, s.slot, s.inc)] = {
                "acked": acked, "maybe": risk if phase == IN_PUT else 0,
                "how": how, **res}
        else:
            self.consumer_incs.append({
                "role": s.role, "slot": s.slot, "inc": s.inc, "how": how,
                "at_risk": risk if (how == "killed" and phase == IN_GET) else 0,
                # A Channel consumer killed while it may still hold a view of
                # the last message it recorded (known bug: redelivered).
                "held": held if (how == "killed" and s.role == "cc"
                                 and phase in (IN_GET, HOLD)) else None,
                "msgs": st.get64(S_MSGS), **res})
        if how == "killed":
            self.kills.append({"role": s.role, "phase": PHASES.get(phase, str(phase))})
        elif status_code is not None:
            if status_code == EXIT_OK:
                self.exits["ok"] += 1
            elif status_code == EXIT_PEER:
                self.exits["peer_restart"] += 1
            elif status_code < 0:
                self.exits["signal"] += 1
                self.errors.append(f"{s.role}{s.slot}.{s.inc} died of signal {-status_code}")
            else:
                self.exits["error"] += 1
                path = os.path.join(self.logdir, f"err_{s.role}_{s.slot}_{s.inc}.txt")
                text = open(path).read() if os.path.exists(path) else f"exit {status_code}"
                self.errors.append(f"{s.role}{s.slot}.{s.inc}: {text.strip()[-600:]}")
        s.pid = 0

    def reap(self, restart: bool):
        for s in self.slots:
            if not s.pid:
                continue
            try:
                pid, st = os.waitpid(s.pid, os.WNOHANG)
            except ChildProcessError:
                pid, st = s.pid, 0
            if pid:
                s.last_exit = os.waitstatus_to_exitcode(st)
                self.record_end(s, "exited", s.last_exit)
                s.restart_at = time.monotonic() + (0.2 if restart else 0)

    def kill_one(self):
        live = [s for s in self.slots if s.pid and f"{s.role}{s.slot}" not in self.cfg.keep]
        if not live:
            return
        s = self.rng.choice(live)
        os.kill(s.pid, signal.SIGSTOP)
        pid, st = os.waitpid(s.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(st):                 # it ended by itself meanwhile
            self.record_end(s, "exited", os.waitstatus_to_exitcode(st))
            s.restart_at = time.monotonic() + 0.2
            return
        ss = Status(self.mm, s.index)
        phase, risk = ss.get32(S_PHASE), ss.get32(S_RISK)
        acked, held = ss.get64(S_ACKED), ss.get64(S_HELD)
        os.kill(s.pid, signal.SIGKILL)
        os.waitpid(s.pid, 0)                       # reap at once: no zombie lock owner
        self.record_end(s, "killed", None, phase, risk, acked, held)
        s.restart_at = time.monotonic() + self.rng.uniform(0.0, 0.3)

    def check_stalls(self):
        now = time.monotonic()
        for s in self.slots:
            if not s.pid:
                continue
            beat = Status(self.mm, s.index).get64(S_BEAT)
            if beat != s.last_beat[0]:
                s.last_beat = (beat, now)
            elif now - s.last_beat[1] > self.cfg.stall:
                self.stalls.append(f"{s.role}{s.slot}.{s.inc} made no progress for "
                                   f"{now - s.last_beat[1]:.0f}s")
                os.kill(s.pid, signal.SIGKILL)
                os.waitpid(s.pid, 0)
                self.record_end(s, "stalled", None)
                s.restart_at = now

    def received(self) -> int:
        total = 0
        for name in os.listdir(self.logdir):
            if name.endswith(".log"):
                total += os.path.getsize(os.path.join(self.logdir, name)) // REC.size
        return total

    def shm_ours(self) -> set:
        """vringipc entries in /dev/shm created by this run (names carry the
        creator's pid; other programs on the machine may have their own)."""
        return {n for n in shm_entries() if name_pid(n) in self.our_pids}

    # --- the run --------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        shm0, all0 = self.shm_ours(), len(shm_entries())
        self.q = Queue(200, capacity=cfg.queue_capacity, num=256, backend="shm")   # bounded: back-pressure
        self.ch = None if cfg.no_channel else Channel(cfg.channel_capacity, num=64, backend="shm")
        fds0, rss0 = count_fds(), rss_kb()
        shm_during = len(self.shm_ours() - shm0)
        t0 = time.monotonic()
        end = t0 + cfg.duration
        for s in self.slots:
            self.start(s)
        next_kill = t0 + (self.rng.expovariate(1 / cfg.kill_interval) if cfg.kill_interval > 0 else 1e18)
        next_report, next_stall = t0 + 10, t0 + 1
        while time.monotonic() < end:
            time.sleep(0.02)
            self.reap(restart=True)
            now = time.monotonic()
            for s in self.slots:
                if not s.pid and now >= s.restart_at:
                    self.start(s)
            if now >= next_kill:
                self.kill_one()
                next_kill = now + self.rng.expovariate(1 / cfg.kill_interval)
            if now >= next_stall:
                self.check_stalls()
                next_stall = now + 1
                shm_during = max(shm_during, len(self.shm_ours() - shm0))
            if now >= next_report and not cfg.quiet:
                print(f"[{now - t0:6.0f}s] received {self.received()} messages, "
                      f"{len(self.kills)} kills", flush=True)
                next_report = now + 10
        # --- drain: producers stop; every consumer slot runs until the queues are empty
        g_set(self.mm, G_STOP, 1)
        for s in self.slots:
            s.last_exit = None
        drain_end = time.monotonic() + 60
        producers = [s for s in self.slots if s.role in ("qp", "cp")]
        consumers = [s for s in self.slots if s.role in ("qc", "cc")]
        while any(s.pid for s in producers) and time.monotonic() < drain_end:
            time.sleep(0.02)
            self.reap(restart=False)
            for s in consumers:
                if not s.pid and s.last_exit != EXIT_OK:     # killed, or not yet done
                    self.start(s)
        for s in producers:
            if s.pid:
                self.stalls.append(f"{s.role}{s.slot}.{s.inc} did not stop")
                os.kill(s.pid, signal.SIGKILL)
                os.waitpid(s.pid, 0)
                self.record_end(s, "stalled", None)
        g_set(self.mm, G_PRODUCERS_DONE, 1)
        while any(s.pid for s in consumers) and time.monotonic() < drain_end:
            time.sleep(0.02)
            self.reap(restart=False)
        for s in consumers:
            if s.pid:
                self.stalls.append(f"{s.role}{s.slot}.{s.inc} did not finish draining")
                os.kill(s.pid, signal.SIGKILL)
                os.waitpid(s.pid, 0)
                self.record_end(s, "stalled", None)
        left_in_queue = self.q.qsize()
        elapsed = time.monotonic() - t0
        fds1, rss1 = count_fds(), rss_kb()
        self.q.close()
        if self.ch is not None:
            self.ch.close()
        shm1, all1 = self.shm_ours(), len(shm_entries())
        result = self.analyse()
        result.update({
            "config": {k: v for k, v in vars(cfg).items() if k not in ("workdir", "keep")},
            "vringipc": vringipc.__file__,
            "elapsed_s": round(elapsed, 1),
            "left_in_queue": left_in_queue,
            "kills": self.kill_summary(),
            "exits": self.exits,
            "worker_errors": self.errors[:20],
            "stalls": self.stalls[:20],
            "orchestrator": {"fds_start": fds0, "fds_end": fds1,
                             "rss_anon_kb_start": rss0, "rss_anon_kb_end": rss1},
            "dev_shm": {"start": len(shm0), "during_max_extra": shm_during,
                        "end": len(shm1), "leaked": sorted(shm1 - shm0),
                        "machine_wide_vr_entries": [all0, all1]},
            "workers": self.worker_resources(),
        })
        result["verdict"] = self.verdict(result)
        if not cfg.keep_logs and not cfg.workdir:
            shutil.rmtree(self.logdir, ignore_errors=True)
        else:
            result["logdir"] = self.logdir
        return result

    def kill_summary(self) -> dict:
        out: dict = {"total": len(self.kills)}
        for k in self.kills:
            key = f"{k['role']}:{k['phase']}"
            out[key] = out.get(key, 0) + 1
        return out

    def worker_resources(self) -> dict:
        """fds / RssAnon growth of workers that lived long enough (10 s, or a
        third of a short run), sampled from their 20th message on, until their
        last second."""
        min_life = min(10.0, self.cfg.duration / 3)
        recs = [r for r in list(self.incs.values()) + self.consumer_incs
                if r["life"] >= min_life and r["fds0"] and r["fds1"]]
        survivors = [{"worker": f"{r['role']}{r['slot']}", "life_s": round(r["life"], 1),
                      "fds": [r["fds0"], r["fds1"]], "rss_anon_kb": [r["rss0"], r["rss1"]]}
                     for r in [dict(v, role=("cp" if k[0] == STREAM_CHANNEL else "qp"), slot=k[1])
                               for k, v in self.incs.items()] + self.consumer_incs
                     if f"{r['role']}{r['slot']}" in self.cfg.keep]
        return {
            "survivors": survivors,
            "long_lived": len(recs),
            "max_fd_growth": max((r["fds1"] - r["fds0"] for r in recs), default=0),
            "max_pidfds": max((r.get("pidfds", 0) for r in list(self.incs.values())
                               + self.consumer_incs), default=0),
            "max_rss_anon_growth_kb": max((r["rss1"] - r["rss0"] for r in recs), default=0),
            "longest_life_s": round(max((r["life"] for r in recs), default=0), 1),
            "min_life_s": round(min_life, 1),
        }

    # --- checking the logs ----------------------------------------------------------------------
    def analyse(self) -> dict:
        import numpy as np
        dt = np.dtype([("key", "<u8"), ("len", "<u4"), ("flags", "<u4")])
        files = sorted(n for n in os.listdir(self.logdir) if n.endswith(".log"))
        arrays, order_violations = [], 0
        for name in files:
            a = np.fromfile(os.path.join(self.logdir, name), dtype=dt)
            if not len(a):
                continue
            arrays.append(a)
            k = a["key"][a["flags"] == 0]
            prefix, seq = k >> np.uint64(SEQ_BITS), k & np.uint64(SEQ_MASK)
            idx = np.argsort(prefix, kind="stable")
            p, s = prefix[idx], seq[idx].astype(np.int64)
            same = p[1:] == p[:-1]
            order_violations += int(np.count_nonzero(same & (np.diff(s) <= 0)))
        allrec = np.concatenate(arrays) if arrays else np.zeros(0, dt)
        corrupt = int(np.count_nonzero(allrec["flags"]))      # second records of bad ones
        good = allrec[allrec["flags"] == 0]
        keys, first_idx, counts = np.unique(good["key"], return_index=True, return_counts=True)
        dup_keys = keys[counts > 1]
        redeliver_expected = {c["held"] for c in self.consumer_incs if c["held"] is not None}
        redelivered = [int(k) for k in dup_keys if int(k) in redeliver_expected]
        unexplained_dups = [int(k) for k in dup_keys if int(k) not in redeliver_expected]
        bytes_moved = int(good["len"][first_idx].astype(np.int64).sum()) if len(keys) else 0
        # per producer incarnation: acked (definite) vs received
        prefix = keys >> np.uint64(SEQ_BITS)
        seq = (keys & np.uint64(SEQ_MASK)).astype(np.int64)
        streams = {STREAM_QUEUE: "queue", STREAM_CHANNEL: "channel"}
        per = {name: {"sent_acked": 0, "received": 0, "lost": 0, "phantom": 0,
                      "lost_samples": []} for name in streams.values()}
        known = set()
        for (stream, slot, inc), rec in self.incs.items():
            pf = (stream << (60 - SEQ_BITS)) | (slot << (52 - SEQ_BITS)) | (inc & 0xFFFF)
            known.add(pf)
            lo, hi = np.searchsorted(prefix, pf), np.searchsorted(prefix, pf, side="right")
            got = seq[lo:hi]
            acked = rec["acked"]
            name = streams[stream]
            per[name]["sent_acked"] += acked + 1
            n_def = int(np.count_nonzero(got <= acked))
            per[name]["received"] += len(got)
            per[name]["lost"] += (acked + 1) - n_def
            if n_def < acked + 1 and len(per[name]["lost_samples"]) < 10:
                missing = sorted(set(range(acked + 1)) - set(got.tolist()))
                per[name]["lost_samples"] += [f"{slot}.{inc}#{m}" for m in missing[:10]]
            per[name]["phantom"] += int(np.count_nonzero(got > acked + rec["maybe"]))
        unknown = int(np.count_nonzero(~np.isin(prefix, np.array(sorted(known), dtype=np.uint64))))
        for name, stream in (("queue", ("qc",)), ("channel", ("cc",))):
            allowance = sum(c["at_risk"] for c in self.consumer_incs if c["role"] in stream)
            lw = min(per[name]["lost"], allowance)
            per[name]["lost_with_killed_consumer"] = lw
            per[name]["unexplained_lost"] = per[name]["lost"] - lw
            per[name]["loss_allowance"] = allowance
        return {
            "messages_received": int(len(good)),
            "messages_unique": int(len(keys)),
            "bytes_moved": bytes_moved,
            "streams": per,
            "lost": sum(v["lost"] for v in per.values()),
            "lost_with_killed_consumer": sum(v["lost_with_killed_consumer"] for v in per.values()),
            "unexplained_lost": sum(v["unexplained_lost"] for v in per.values()),
            "duplicated": len(unexplained_dups),
            "duplicated_samples": [hex(k) for k in unexplained_dups[:10]],
            "redelivered_after_killed_view_holder": len(redelivered),
            "corrupt": corrupt,
            "phantom": sum(v["phantom"] for v in per.values()) + unknown,
            "order_violations": order_violations,
        }

    def verdict(self, r: dict) -> dict:
        o = r["orchestrator"]
        checks = {
            "no_unexplained_loss": r["unexplained_lost"] == 0,
            "no_duplicates": r["duplicated"] == 0,
            "no_corruption": r["corrupt"] == 0,
            "no_phantoms": r["phantom"] == 0,
            "in_order": r["order_violations"] == 0,
            "no_worker_errors": not r["worker_errors"],
            "no_stalls": not r["stalls"],
            "drained": r["left_in_queue"] == 0,
            "fds_flat": (o["fds_start"] == o["fds_end"] and r["workers"]["max_fd_growth"] <= 0
                         and r["workers"]["max_pidfds"] <= 1),
            "dev_shm_flat": r["dev_shm"]["start"] == r["dev_shm"]["end"] and not r["dev_shm"]["leaked"],
            "messages_moved": r["messages_unique"] > 0,
        }
        if self.cfg.strict:
            checks["no_view_redelivery"] = r["redelivered_after_killed_view_holder"] == 0
        return {"ok": all(checks.values()), "checks": checks}


def summary(r: dict) -> str:
    v = r["verdict"]
    o, shm, wk = r["orchestrator"], r["dev_shm"], r["workers"]
    lines = [
        f"vringipc soak: {r['elapsed_s']}s, {r['config']['producers']} queue producers, "
        f"{r['config']['consumers']} queue consumers"
        + ("" if r["config"]["no_channel"] else ", 1+1 on a Channel"),
        f"  messages moved     {r['messages_unique']} ({r['bytes_moved'] / 2**30:.2f} GiB), "
        f"received records {r['messages_received']}",
    ]
    for name, s in r["streams"].items():
        lines.append(f"    {name:8} acked {s['sent_acked']}, received {s['received']}, lost "
                     f"{s['lost']} (with killed consumer {s['lost_with_killed_consumer']} of "
                     f"{s['loss_allowance']} at risk, unexplained {s['unexplained_lost']})")
    lines += [
        f"  lost               {r['lost']} (lost-with-killed-consumer "
        f"{r['lost_with_killed_consumer']}, unexplained {r['unexplained_lost']})",
        f"  duplicated         {r['duplicated']}  (+ {r['redelivered_after_killed_view_holder']} "
        f"Channel view redeliveries after the holder was killed: known bug)",
        f"  corrupt {r['corrupt']}, phantom {r['phantom']}, out of order {r['order_violations']}, "
        f"left in queue {r['left_in_queue']}",
        f"  kills              {r['kills']}",
        f"  worker exits       {r['exits']}; errors {len(r['worker_errors'])}; stalls {len(r['stalls'])}",
        f"  orchestrator fds   {o['fds_start']} -> {o['fds_end']}, RssAnon "
        f"{o['rss_anon_kb_start']} -> {o['rss_anon_kb_end']} kB",
        f"  workers (>={wk['min_life_s']:g} s)  {wk['long_lived']}: max fd growth {wk['max_fd_growth']} "
        f"(+ at most {wk['max_pidfds']} pidfd), max RssAnon "
        f"growth {wk['max_rss_anon_growth_kb']} kB, longest {wk['longest_life_s']} s",
    ] + [
        f"  never killed       {x['worker']}: lived {x['life_s']} s, fds {x['fds'][0]} -> {x['fds'][1]}, "
        f"RssAnon {x['rss_anon_kb'][0]} -> {x['rss_anon_kb'][1]} kB" for x in wk["survivors"]
    ] + [
        f"  /dev/shm entries   {shm['start']} -> {shm['end']} (max +{shm['during_max_extra']} "
        f"during), leaked {shm['leaked']} (ours; machine-wide vr_ entries "
        f"{shm['machine_wide_vr_entries'][0]} -> {shm['machine_wide_vr_entries'][1]})",
        f"  verdict            {'OK' if v['ok'] else 'FAIL'} "
        + ", ".join(k for k, ok in v["checks"].items() if not ok),
    ]
    for e in r["worker_errors"][:5]:
        lines.append("  error: " + e.replace("\n", "\n         "))
    for e in r["stalls"][:5]:
        lines.append("  stall: " + e)
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_mutually_exclusive_group()
    t.add_argument("--minutes", type=float, help="run time in minutes (standard: 10)")
    t.add_argument("--seconds", type=float, help="run time in seconds")
    p.add_argument("--producers", type=int, default=2, help="queue producer processes (2)")
    p.add_argument("--consumers", type=int, default=2,
                   help="queue consumer processes (2), mixing get and get_nocopy")
    p.add_argument("--no-channel", action="store_true", help="leave out the Channel pair")
    p.add_argument("--kill-interval", type=float, default=1.0,
                   help="mean seconds between SIGKILLs (0 = no kills)")
    p.add_argument("--min-size", type=int, default=64)
    p.add_argument("--max-size", type=int, default=1 << 20)
    p.add_argument("--rate", type=float, default=0,
                   help="messages/s per producer (0 = as fast as possible)")
    p.add_argument("--queue-capacity", type=int, default=16 << 20)
    p.add_argument("--channel-capacity", type=int, default=4 << 20)
    p.add_argument("--stall", type=float, default=30, help="seconds without progress = a stall")
    p.add_argument("--keep-alive", default="",
                   help="workers never killed, e.g. 'qp0,qc0' (long-lived witnesses of flat "
                        "fds/RSS while their peers die around them)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--workdir", help="keep logs here (default: a temp dir, removed)")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--strict", action="store_true",
                   help="also fail on the known Channel view-redelivery bug")
    p.add_argument("--quiet", action="store_true")
    cfg = p.parse_args(argv)
    cfg.duration = (cfg.minutes * 60 if cfg.minutes is not None
                    else cfg.seconds if cfg.seconds is not None else 60.0)
    cfg.keep = {w for w in cfg.keep_alive.split(",") if w}
    if cfg.producers < 1 or cfg.consumers < 1:
        p.error("at least one producer and one consumer")
    if not 16 <= cfg.min_size <= cfg.max_size:
        p.error("need 16 <= min-size <= max-size")
    if cfg.max_size + 64 > min(cfg.queue_capacity, cfg.channel_capacity) // 2:
        p.error("capacities must hold at least two of the largest messages")
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    soak = Soak(cfg)
    result = soak.run()
    print(summary(result), flush=True)
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
