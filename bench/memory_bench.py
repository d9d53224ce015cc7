#!/usr/bin/env python3
"""Memory follows the data: what idle and bursting Channels / Queues commit.

* idle: create N default objects and measure the shared memory they commit;
* burst: push BURST bytes into one default object without reading, measure
  the peak, read everything back, and measure what stays committed.

Committed memory is counted exactly on each object's own memfd (allocated
blocks: ``st_blocks * 512``); the machine-wide ``Shmem:`` of /proc/meminfo
is shown beside it for reference (other processes move it too).

    python bench/memory_bench.py [--kind channel|queue|all] [--count 1000]
                                 [--burst-mib 1024] [--frame-mib 4] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vringipc  # noqa: E402

MiB = 1 << 20


def shmem_kib() -> int:
    """Machine-wide Shmem (KiB) from /proc/meminfo: reference only."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    return 0


def committed(obj) -> int:
    """Bytes of the object's memfd segment backed by memory now."""
    return os.fstat(obj._ring.segment.fd).st_blocks * 512


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


# --- per kind: how to make one, fill it with a burst, drain it ------------------------

def _channel_new():
    return vringipc.Channel()


def _channel_fill(ch, frame: bytes, n: int) -> None:
    for _ in range(n):
        ch.send(frame, timeout=10)


def _channel_drain(ch, frame_size: int, n: int) -> None:
    buf = bytearray(frame_size)
    for _ in range(n):
        ch.recv_into(buf, timeout=10)
    ch.trim()       # the producer gives back at its next call; this is that call


def _queue_new():
    return vringipc.Queue()


def _queue_fill(q, frame: bytes, n: int) -> None:
    for _ in range(n):
        q.put(frame, timeout=10)


def _queue_drain(q, frame_size: int, n: int) -> None:
    for _ in range(n):
        q.get(timeout=10)


KINDS = {
    "channel": (_channel_new, _channel_fill, _channel_drain),
    "queue": (_queue_new, _queue_fill, _queue_drain),
}


def measure_idle(kind: str, count: int) -> dict:
    new = KINDS[kind][0]
    _raise_fd_limit(count * 6 + 256)
    gc.collect()
    m0 = shmem_kib()
    t0 = time.perf_counter()
    objs = [new() for _ in range(count)]
    dt = time.perf_counter() - t0
    own = sum(committed(o) for o in objs)
    m1 = shmem_kib()
    cap = objs[0].capacity if hasattr(objs[0], "capacity") else None
    for o in objs:
        o.close()
    return {"kind": kind, "test": "idle", "count": count, "capacity": cap,
            "committed_bytes": own, "per_object_bytes": own // count,
            "shmem_delta_bytes": (m1 - m0) * 1024, "create_s": dt}


def measure_burst(kind: str, burst: int, frame_size: int) -> dict:
    new, fill, drain = KINDS[kind]
    n = burst // frame_size
    frame = os.urandom(frame_size)
    obj = new()
    try:
        base = committed(obj)
        t0 = time.perf_counter()
        fill(obj, frame, n)
        t_fill = time.perf_counter() - t0
        peak = committed(obj)
        t0 = time.perf_counter()
        drain(obj, frame_size, n)
        t_drain = time.perf_counter() - t0
        after = committed(obj)
    finally:
        obj.close()
    return {"kind": kind, "test": "burst", "burst_bytes": n * frame_size,
            "frame_bytes": frame_size, "created_bytes": base, "peak_bytes": peak,
            "after_drain_bytes": after, "fill_s": t_fill, "drain_s": t_drain}


def _mib(x) -> str:
    return f"{x / MiB:9.2f}"


def print_table(rows: list[dict]) -> None:
    print(f"{'kind':8} {'test':6} {'what':34} {'MiB':>9}")
    for r in rows:
        if r["test"] == "idle":
            what = f"{r['count']} idle, committed (own memfds)"
            print(f"{r['kind']:8} idle   {what:34} {_mib(r['committed_bytes'])}")
            print(f"{'':8} {'':6} {'  per object':34} {_mib(r['per_object_bytes'])}")
            print(f"{'':8} {'':6} {'  Shmem delta (machine-wide)':34} {_mib(r['shmem_delta_bytes'])}")
        else:
            print(f"{r['kind']:8} burst  {'created':34} {_mib(r['created_bytes'])}")
            what = f"peak ({r['burst_bytes'] // MiB} MiB in flight)"
            print(f"{'':8} {'':6} {what:34} {_mib(r['peak_bytes'])}")
            print(f"{'':8} {'':6} {'after drain':34} {_mib(r['after_drain_bytes'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["channel", "queue", "all"], default="all")
    ap.add_argument("--count", type=int, default=1000, help="idle objects to create")
    ap.add_argument("--burst-mib", type=int, default=1024, help="burst size (MiB)")
    ap.add_argument("--frame-mib", type=int, default=4, help="message size in the burst (MiB)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    kinds = ["channel", "queue"] if args.kind == "all" else [args.kind]
    rows = []
    for k in kinds:
        rows.append(measure_idle(k, args.count))
        rows.append(measure_burst(k, args.burst_mib * MiB, args.frame_mib * MiB))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
