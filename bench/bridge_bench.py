"""Bridged throughput and added round-trip latency over loopback, in the same
run as raw pyzmq PUSH/PULL with the same message sizes.

    python bench/bridge_bench.py [--runs 3] [--kind queue|channel] [--json out.json]
                                 [--sizes 64,65536,1048576] [--no-tune-malloc]
                                 [--inline-max BYTES]

Throughput: a producer process puts N messages into a local object, a sender
bridge and a receiver bridge (two more processes) carry them over
tcp://127.0.0.1, and the consumer (this process) gets them: messages/s from
the first get to the last.  The baseline is what one would write without
vringipc: a PUSH socket in the producer, a PULL socket in the consumer, one
zmq message per message.  Messages are bytes (put/get; send/recv); small ones
are batched by the bridge (up to 512 per network message; zmq batches small
messages in its I/O thread too).  From 64 KiB on the baseline uses
send(copy=False)/recv(copy=False), and a second bridged case ("numpy") puts
a NumPy array (one copy into shared memory, pickled with an out-of-band
buffer) and takes it with get_nocopy().

Relay: raw pyzmq PUSH -> PULL where the PULL socket lives in a relay process
that puts into a local Queue read by the consumer: half a bridge and none of
its code, the ceiling that a receiving process of its own sets on this
machine.

CPU: for every throughput case, the CPU time each process spent (all its
threads, zmq's I/O threads included; process_time() as each child ends, this
process's own over the case), per message.  With more busy processes than
cores, messages/s is about cores / (the summed CPU per message): that sum,
not the slowest stage, is what a bridged pipeline of four processes is held
to on a machine with two cores.

Latency: ping-pong of a 64 B message, A -> bridge pair -> B -> bridge pair -> A,
against a raw zmq ping-pong (PUSH/PULL both ways): the medians and their
difference, the round-trip latency the bridges add.

Medians over --runs repeats, the cases interleaved.  On a shared machine the
figures are noisy: compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import multiprocessing
import resource
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import zmq  # noqa: E402

import vringipc  # noqa: E402
from vringipc import bridge  # noqa: E402

# messages per case: about a second of the bridged case, and 1.3-2 GiB
# through the local queues' 64 MiB arenas, so that their first touch (page
# faults; 40 per 1 MiB message when only 400 were sent) is not what is measured
SIZES = {64: 200_000, 65536: 20_000, 1 << 20: 2_000}
ZERO_COPY_FROM = 65536       # from this size both sides use their zero-copy calls
HWM = 1000                   # zmq's default high-water mark; the local queues' maxsize


def messages_for(size: int) -> int:
    """SIZES[size], or for another size about 1.3 GiB's worth."""
    return SIZES.get(size) or max(2_000, min(200_000, (1300 << 20) // size))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(fn, *args) -> multiprocessing.Process:
    p = multiprocessing.get_context("fork").Process(target=fn, args=args)
    p.start()
    return p


def _usage() -> tuple[float, int]:
    """CPU seconds (all threads) and minor page faults of this process so far."""
    return time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _metered(slots, k, fn, *args):
    try:
        fn(*args)
    finally:
        # each one aligned 8-byte store
        slots[2 * k], slots[2 * k + 1] = _usage()


class CpuMeter:
    """The CPU time and page faults of one case's processes: each child
    started with meter.child(role, ...) stores its own as it ends (all its
    life: idle waits cost nothing); this process counts from the meter's
    creation to per_message()."""

    def __init__(self):
        self._mm = mmap.mmap(-1, 8 * 16)
        self.slots = memoryview(self._mm).cast("d")
        self.roles: dict[str, int] = {}
        self.t0 = _usage()

    def child(self, role: str, fn, *args) -> multiprocessing.Process:
        self.roles[role] = k = len(self.roles)
        return child(_metered, self.slots, k, fn, *args)

    def per_message(self, n: int, me: str = "consumer") -> dict:
        """role -> (microseconds of CPU, minor page faults) per message;
        call once the children are reaped."""
        out = {r: (self.slots[2 * k] * 1e6 / n, self.slots[2 * k + 1] / n)
               for r, k in self.roles.items()}
        cpu, faults = _usage()
        out[me] = ((cpu - self.t0[0]) * 1e6 / n, (faults - self.t0[1]) / n)
        return out


TUNE_MALLOC = True           # --no-tune-malloc: bridges without keep_freed_buffers()


def run_bridge(kind, local, ep):
    bridge.run_until_signal(bridge.Sender(local, ep) if kind == "send"
                            else bridge.Receiver(local, ep), tune_malloc=TUNE_MALLOC)


def reap(procs, term=()):
    for p in term:
        p.terminate()
    for p in procs:
        p.join(60)


def gets_per_second(get, n, procs) -> float:
    """Get n messages, timing all but the first; reap procs (killed if a get
    failed)."""
    try:
        get(timeout=60)
        t0 = time.perf_counter()
        for _ in range(n - 1):
            get(timeout=60)
        dt = time.perf_counter() - t0
    except BaseException:
        reap(procs, procs)
        raise
    reap(procs)
    return (n - 1) / dt


def make(kind, size, n):
    # bounded like the baseline's sockets (high-water mark 1000): a producer
    # that outruns the bridge blocks instead of filling the arena
    if kind == "queue":
        return vringipc.Queue(HWM, capacity=max(64 << 20, 8 * size))
    return vringipc.Channel(max(16 << 20, 8 * size), num=1024)


def bridged_tp(kind, size, n, numpy=False):
    """Bytes put/get (send/recv), or with numpy=True a NumPy array put (one
    copy in, pickled out-of-band) and get_nocopy() (no copy out)."""
    a, b = make(kind, size, n), make(kind, size, n)
    meter = CpuMeter()
    put = a.put if kind == "queue" else a.send
    get = b.get if kind == "queue" else b.recv
    ep = f"tcp://127.0.0.1:{free_port()}"
    br = [meter.child("receiver", run_bridge, "recv", b, ep),
          meter.child("sender", run_bridge, "send", a, ep)]
    msg = b"x" * size
    if numpy:
        msg = np.frombuffer(msg, np.uint8)
        get = b.get_nocopy

    def produce():
        for _ in range(n):
            put(msg)
    p = meter.child("producer", produce)
    try:
        rate = gets_per_second(get, n, [p])
    finally:
        reap(br, br)
        a.close()
        b.close()
    return rate, meter.per_message(n)


def zmq_push(ep, msg, n):
    """The baseline's producer: n sends of msg on a PUSH socket (zero-copy
    from ZERO_COPY_FROM bytes on, as the bridged case's get_nocopy)."""
    c = zmq.Context()
    s = c.socket(zmq.PUSH)
    s.linger = 10000
    s.connect(ep)
    for _ in range(n):
        s.send(msg, copy=len(msg) < ZERO_COPY_FROM)
    s.close()
    c.term()


def raw_tp(size, n):
    ep = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(ep)
    pull.rcvtimeo = 60_000
    meter = CpuMeter()
    p = meter.child("producer", zmq_push, ep, b"x" * size, n)
    copy = size < ZERO_COPY_FROM
    try:
        rate = gets_per_second(lambda timeout: pull.recv(copy=copy), n, [p])
    finally:
        pull.close()
        ctx.term()
    return rate, meter.per_message(n)


def relay_tp(size, n):
    """Half a bridge without any bridge code: raw pyzmq PUSH -> PULL in a
    relay process that puts each message into a local Queue, which the
    consumer (this process) gets from.  Any bridge's receiving side is a
    process like this one; the gap between this and raw_tp is what having
    the zmq socket in a process other than the consumer costs on this
    machine, before any protocol, window or second copy."""
    ep = f"tcp://127.0.0.1:{free_port()}"
    q = make("queue", size, n)
    meter = CpuMeter()
    msg = b"x" * size
    zero_copy = size >= ZERO_COPY_FROM

    def relay():
        c = zmq.Context()
        s = c.socket(zmq.PULL)
        s.bind(ep)
        put = q._core.put_msg
        for _ in range(n):
            f = s.recv(copy=False)
            put(2, f.buffer if zero_copy else f.bytes, None, True, 60)
        s.close()
        c.term()

    procs = [meter.child("relay", relay), meter.child("producer", zmq_push, ep, msg, n)]
    try:
        rate = gets_per_second(q.get_nocopy if zero_copy else q.get, n, procs)
    finally:
        q.close()
    return rate, meter.per_message(n)


def bridged_rtt(kind, rounds=2000):
    objs = [make(kind, 64, 0) for _ in range(4)]       # a->(bridge)->b, c->(bridge)->d
    a, b, c, d = objs
    ep1, ep2 = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    br = [child(run_bridge, "recv", b, ep1), child(run_bridge, "send", a, ep1),
          child(run_bridge, "recv", d, ep2), child(run_bridge, "send", c, ep2)]
    put_a = a.put if kind == "queue" else a.send
    get_d = d.get if kind == "queue" else d.recv

    def echo():
        g = b.get if kind == "queue" else b.recv
        p = c.put if kind == "queue" else c.send
        for _ in range(rounds + 100):
            p(g(timeout=60))
    e = child(echo)
    msg = b"x" * 64
    lat = []
    for i in range(rounds + 100):
        t0 = time.perf_counter_ns()
        put_a(msg)
        get_d(timeout=60)
        if i >= 100:
            lat.append(time.perf_counter_ns() - t0)
    reap([e])
    reap(br, br)
    for o in objs:
        o.close()
    return statistics.median(lat) / 1e3


def raw_rtt(rounds=2000):
    ep1, ep2 = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind(ep1)
    pull.bind(ep2)

    def echo():
        c = zmq.Context()
        i, o = c.socket(zmq.PULL), c.socket(zmq.PUSH)
        i.connect(ep1)
        o.connect(ep2)
        for _ in range(rounds + 100):
            o.send(i.recv())
        o.linger = 5000
        i.close()
        o.close()
        c.term()
    e = child(echo)
    lat = []
    for k in range(rounds + 100):
        t0 = time.perf_counter_ns()
        push.send(b"x" * 64)
        pull.recv()
        if k >= 100:
            lat.append(time.perf_counter_ns() - t0)
    reap([e])
    push.close(0)
    pull.close(0)
    ctx.term()
    return statistics.median(lat) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kind", choices=("queue", "channel"),
                    default="queue" if hasattr(vringipc.Queue, "get_message") else "channel")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--no-tune-malloc", action="store_true",
                    help="bridges without keep_freed_buffers() (what it buys)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)),
                    help="comma-separated message sizes (default: %(default)s)")
    ap.add_argument("--inline-max", type=int, metavar="BYTES",
                    help="sending bridges copy parts shorter than this into one frame "
                         f"(bridge.INLINE_MAX, {bridge.INLINE_MAX}): where copying stops paying")
    args = ap.parse_args()
    if args.inline_max is not None:
        bridge.INLINE_MAX = args.inline_max      # the forked bridges inherit it
    global TUNE_MALLOC
    TUNE_MALLOC = not args.no_tune_malloc
    sizes = {int(x): messages_for(int(x)) for x in args.sizes.split(",")}
    res: dict = {"kind": args.kind, "runs": args.runs, "tune_malloc": TUNE_MALLOC,
                 "inline_max": bridge.INLINE_MAX,
                 "throughput": {}, "latency_us": {}}
    # per size: case name -> function; the NumPy case only where a Queue
    # has zero-copy calls worth using
    cases = {}
    for size, n in sizes.items():
        c = {"raw": lambda s=size, n=n: raw_tp(s, n),
             "bridged": lambda s=size, n=n: bridged_tp(args.kind, s, n)}
        if args.kind == "queue" and size >= ZERO_COPY_FROM:
            c["bridged_numpy"] = lambda s=size, n=n: bridged_tp(args.kind, s, n, numpy=True)
        c["relay"] = lambda s=size, n=n: relay_tp(s, n)
        cases[size] = c
    tp = {s: {k: [] for k in c} for s, c in cases.items()}
    cpu = {s: {k: [] for k in c} for s, c in cases.items()}  # per run: role -> (us, faults)
    rtt = {"bridged": [], "raw": []}
    for r in range(args.runs):
        for size, c in cases.items():
            for k, fn in c.items():
                rate, per_role = fn()
                tp[size][k].append(rate)
                cpu[size][k].append(per_role)
            print(f"run {r + 1} {size:>8} B: " + "  ".join(
                f"{k} {v[-1]:,.0f}" for k, v in tp[size].items()) + " msg/s", file=sys.stderr)
        rtt["raw"].append(raw_rtt())
        rtt["bridged"].append(bridged_rtt(args.kind))
    print(f"\nbridged {args.kind} -> {args.kind} vs raw pyzmq PUSH/PULL, tcp://127.0.0.1, "
          f"medians of {args.runs} runs (msg/s, and the ratio to raw)")
    cols = ("bridged", "bridged_numpy", "relay")
    print(f"{'size':>9} {'raw':>10} " + " ".join(f"{c:>21}" for c in cols))
    for size in sizes:
        raw = statistics.median(tp[size]["raw"])
        row = {"raw": tp[size]["raw"]}
        cells = []
        for c in cols:
            if c not in tp[size]:
                cells.append(f"{'-':>21}")
                continue
            m = statistics.median(tp[size][c])
            row[c] = tp[size][c]
            row[c + "_ratio"] = m / raw
            cells.append(f"{m:>13,.0f} {m / raw:>6.0%} ")
        res["throughput"][size] = row
        print(f"{size:>9} {raw:>10,.0f} " + " ".join(cells))
    print("bridged: bytes put()/get(); bridged_numpy: a NumPy array put(), get_nocopy(); "
          "relay: raw pyzmq into a process that puts into a local Queue (half a bridge, "
          "no bridge code)")
    print("\nCPU per message, all processes and threads (us, medians; on this machine "
          f"the ceiling is {os.cpu_count()} cores / the total), and in brackets minor page "
          "faults per message")
    for size in sizes:
        for c, runs in cpu[size].items():
            roles = {r: statistics.median(x[r][0] for x in runs) for r in runs[0]}
            faults = {r: statistics.median(x[r][1] for x in runs) for r in runs[0]}
            total = statistics.median(sum(v[0] for v in x.values()) for x in runs)
            row = res["throughput"][size]
            row.setdefault("cpu_us_per_msg", {})[c] = {"total": total, **roles}
            row.setdefault("page_faults_per_msg", {})[c] = faults
            print(f"{size:>9} {c:>14} {total:>9.1f}  " + "  ".join(
                f"{r} {roles[r]:.1f} ({faults[r]:.0f})" for r in roles))
    rr, rb = statistics.median(rtt["raw"]), statistics.median(rtt["bridged"])
    res["latency_us"] = {"raw": rtt["raw"], "bridged": rtt["bridged"], "added": rb - rr}
    print(f"round trip 64 B (median): raw zmq {rr:.0f} us, through two bridge pairs {rb:.0f} us,"
          f" added {rb - rr:.0f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
