#!/usr/bin/env python3
"""Ring core benchmarks (issue 2): two-process throughput and ping-pong latency
of the vringipc split ring, against same-run baselines.

    python bench/ring_bench.py                 # full run (~1.5-2 minutes)
    python bench/ring_bench.py --quick         # few-second smoke run
    python bench/ring_bench.py --json bench/results/ring.json

Everything is measured in one run of this script, so the ratios compare
figures taken under the same machine load.  Each figure is measured `--runs`
times, each time in a freshly forked pair that warms up first, and the runs
are interleaved in rounds (round r measures every figure once, in rotated
order), so a ratio is computed per round from two measurements taken back to
back.  The table shows the median and the [min-max] range over runs; the
CPU time taken by other processes during each round is recorded too (the
machine is shared).  The two processes are pinned to two different CPUs
unless --no-pin.

1. Throughput of 64-byte messages, producer (parent) -> consumer (child):
   - ring batch API: VringDriver.add_many_slots / reclaim / wait_used and
     VringHost.pull_many / wait, EVENT_IDX on (ring sizes --nums) and off;
   - ring one-at-a-time API: add_slot + kick, getdesc + pull + complete + notify;
   - baselines: os.pipe with one 64-byte write/read per message, and batched
     (256 messages = 16 KiB per syscall).
   Every message carries its sequence number in its first 8 bytes.  The
   consumer checks the first and last number of every batch (catches loss,
   duplication, reordering across batches) and every number and length of
   one batch in 8 (--verify all: every batch), plus the total count.
2. Round-trip latency of a 64-byte ping-pong, perf_counter_ns per round trip:
   - ring "2rings": A drives ring 0 to B, B drives ring 1 back to A;
   - ring "reqrep": one ring, a readable request + writable reply chain,
     the host pushes the reply and completes it with 64 bytes;
   each in busy-poll mode (wait(spin=large): never sleeps) and blocking mode
   (spin=0: sleeps on the eventfd every time);
   - baselines: os.pipe ping-pong in Python (blocking), and two C programs
     compiled here with gcc -O2 (bench/c/): eventfd ping-pong (blocking) and
     a shared cache-line ping-pong (busy-poll).  No gcc: skipped, with a note.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import struct
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # the worktree's vringipc first
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import vringipc  # noqa: E402
from vringipc.ring import SharedRing  # noqa: E402

import _util as U  # noqa: E402

MSG = 64
BUSY_SPIN = 30.0       # seconds: "never sleeps" for the duration of a run
TARGET_TPUT = 3e6
TARGET_BUSY_P50_NS = 2000
TARGET_BLOCK_RATIO = 1.2
QUIET_CPUS = 0.25      # a round is "quiet" if other processes used less than this


# =============================================================================
# 1. throughput
# =============================================================================

def _ring_batch_consumer(ring, num, every):
    def main(chan):
        h = ring.host()
        dst = np.zeros(num * MSG, np.uint8)
        lens = np.zeros(num, np.uint32)
        seq = dst.view(np.uint64)[::MSG // 8]
        ar = np.arange(num, dtype=np.uint64)
        tmp = np.empty(num, np.uint64)
        pull, wait = h.pull_many, h.wait
        while True:
            msg = chan.recv()
            if msg is None:
                break
            total, base = msg
            got = 0
            bad = 0
            batches = 0
            waits = 0
            checked = 0
            while got < total:
                n = pull(dst, lens, num)
                if n == 0:
                    wait()
                    waits += 1
                    continue
                # integrity: first and last sequence number of every batch
                # (catches loss, duplication and reordering across batches)
                # and every number and length of one batch in `every`
                s0 = base + got
                if int(seq[0]) != s0 or int(seq[n - 1]) != s0 + n - 1:
                    bad += 1
                elif batches % every == 0:
                    np.subtract(seq[:n], ar[:n], out=tmp[:n])
                    if tmp[:n].min() != s0 or tmp[:n].max() != s0 \
                            or lens[:n].min() != MSG or lens[:n].max() != MSG:
                        bad += 1
                    checked += n
                got += n
                batches += 1
            chan.send({"got": got, "bad_batches": bad, "batches": batches, "waits": waits,
                       "fully_checked": checked})
        h.close()
        ring.close()
    return main


def _ring_batch_produce(d, total, base, src, lens, seqcol, ar):
    reclaim, add, wait_used = d.reclaim, d.add_many_slots, d.wait_used
    sent = 0
    waits = 0
    while sent < total:
        reclaim()
        free = d.num_free
        if free == 0:
            wait_used()
            waits += 1
            continue
        c = total - sent
        if c > free:
            c = free
        np.add(ar[:c], base + sent, out=seqcol[:c])
        sent += add(src, lens, c)
    while d.in_flight:
        if not reclaim():
            wait_used()
    return waits


def bench_ring_batch(num, event_idx, total, runs, cpus, every):
    with SharedRing.create(num=num, slot_size=MSG, event_idx=event_idx, indirect=False) as ring:
        with U.Pair(_ring_batch_consumer(ring, num, every), cpus) as p:
            d = ring.driver(slot_size=MSG)
            src = np.zeros(num * MSG, np.uint8)
            lens = np.full(num, MSG, np.uint32)
            seqcol = src.view(np.uint64)[::MSG // 8]
            ar = np.arange(num, dtype=np.uint64)
            rates, details = [], []
            base = 0
            for r in range(runs + 1):            # run 0 = warm-up
                n = total if r else max(total // 10, 10 * num)
                p.chan.send([n, base])
                t0 = time.perf_counter_ns()
                pw = _ring_batch_produce(d, n, base, src, lens, seqcol, ar)
                dt = time.perf_counter_ns() - t0
                res = p.chan.recv()
                base += n
                if res["got"] != n or res["bad_batches"]:
                    raise RuntimeError(f"ring batch integrity failure: {res} (sent {n})")
                if r:
                    rates.append(n / dt * 1e9)
                    details.append({"producer_waits": pw, "consumer_waits": res["waits"],
                                    "consumer_batches": res["batches"],
                                    "mean_batch": round(n / max(res["batches"], 1), 1),
                                    "fully_checked": res["fully_checked"]})
            d.close()
    return {"rates": rates, "details": details}


def _ring_single_consumer(ring):
    def main(chan):
        h = ring.host()
        riov = vringipc.Iov()
        unpack = struct.Struct("<Q").unpack_from
        getdesc, complete, notify, wait = h.getdesc, h.complete, h.notify, h.wait
        while True:
            msg = chan.recv()
            if msg is None:
                break
            total, base = msg
            got = 0
            bad = 0
            seqno = base
            while got < total:
                head = getdesc(riov)
                if head is None:
                    wait()
                    continue
                data = riov.pull()
                if unpack(data)[0] != seqno or len(data) != MSG:
                    bad += 1
                complete(head, 0)
                notify()
                got += 1
                seqno += 1
            chan.send({"got": got, "bad": bad})
        h.close()
        ring.close()
    return main


def _ring_single_produce(d, total, base):
    buf = bytearray(MSG)
    pack = struct.Struct("<Q").pack_into
    add, kick, get_buf, wait_used = d.add_slot, d.kick, d.get_buf_head, d.wait_used
    for i in range(base, base + total):
        pack(buf, 0, i)
        while add(buf) is None:
            if get_buf() is None:
                wait_used()
            while get_buf() is not None:
                pass
        kick()
    while d.in_flight:
        if get_buf() is None:
            wait_used()


def bench_ring_single(num, total, runs, cpus):
    with SharedRing.create(num=num, slot_size=MSG, event_idx=True, indirect=False) as ring:
        with U.Pair(_ring_single_consumer(ring), cpus) as p:
            d = ring.driver(slot_size=MSG)
            rates = []
            base = 0
            for r in range(runs + 1):
                n = total if r else max(total // 10, 10 * num)
                p.chan.send([n, base])
                t0 = time.perf_counter_ns()
                _ring_single_produce(d, n, base)
                dt = time.perf_counter_ns() - t0
                res = p.chan.recv()
                base += n
                if res["got"] != n or res["bad"]:
                    raise RuntimeError(f"ring single integrity failure: {res} (sent {n})")
                if r:
                    rates.append(n / dt * 1e9)
            d.close()
    return {"rates": rates}


def _pipe_consumer(rfd, batch_k, every=8):
    def main(chan):
        unpack = struct.Struct("<Q").unpack_from
        buf = np.zeros(max(batch_k, 1) * MSG + MSG, np.uint8)
        mv = memoryview(buf)
        seq64 = buf.view(np.uint64)
        while True:
            msg = chan.recv()
            if msg is None:
                break
            total, base = msg
            got = 0
            bad = 0
            if batch_k == 0:
                read = os.read
                seqno = base
                while got < total:
                    data = read(rfd, MSG)
                    if len(data) != MSG or unpack(data)[0] != seqno:
                        bad += 1
                    got += 1
                    seqno += 1
            else:
                ar = np.arange(batch_k + 1, dtype=np.uint64)
                keep = 0
                reads = 0
                readv = os.readv
                cap = batch_k * MSG
                while got < total:
                    nb = readv(rfd, [mv[keep:cap]])
                    if nb <= 0:
                        raise EOFError("pipe closed")
                    nb += keep
                    m = nb // MSG
                    if m:
                        # same policy as the ring batch consumer
                        s0 = base + got
                        if int(seq64[0]) != s0 or int(seq64[(m - 1) * 8]) != s0 + m - 1:
                            bad += 1
                        elif reads % every == 0:
                            if not np.array_equal(seq64[0:m * 8:8], ar[:m] + np.uint64(s0)):
                                bad += 1
                        reads += 1
                        got += m
                    keep = nb - m * MSG
                    if keep:
                        buf[:keep] = buf[m * MSG:nb]
            chan.send({"got": got, "bad": bad})
    return main


def bench_pipe(batch_k, total, runs, cpus, every=8):
    r_fd, w_fd = os.pipe()
    try:
        with U.Pair(_pipe_consumer(r_fd, batch_k, every), cpus) as p:
            os.close(r_fd)
            r_fd = -1
            pack = struct.Struct("<Q").pack_into
            rates = []
            base = 0
            k = max(batch_k, 1)
            src = np.zeros(k * MSG, np.uint8)
            seqcol = src.view(np.uint64)[::MSG // 8]
            ar = np.arange(k, dtype=np.uint64)
            for r in range(runs + 1):
                n = total if r else max(total // 10, 1000)
                p.chan.send([n, base])
                t0 = time.perf_counter_ns()
                if batch_k == 0:
                    buf = bytearray(MSG)
                    write = os.write
                    for i in range(base, base + n):
                        pack(buf, 0, i)
                        write(w_fd, buf)
                else:
                    sent = 0
                    write = os.write
                    while sent < n:
                        c = min(k, n - sent)
                        np.add(ar[:c], base + sent, out=seqcol[:c])
                        mv = memoryview(src)[:c * MSG]
                        while mv:
                            mv = mv[write(w_fd, mv):]
                        sent += c
                res = p.chan.recv()
                dt = time.perf_counter_ns() - t0
                base += n
                if res["got"] != n or res["bad"]:
                    raise RuntimeError(f"pipe integrity failure: {res} (sent {n})")
                if r:
                    rates.append(n / dt * 1e9)
    finally:
        os.close(w_fd)
        if r_fd >= 0:
            os.close(r_fd)
    return {"rates": rates, "bytes_per_write": MSG * k}


# =============================================================================
# 2. latency
# =============================================================================

def _lat_runs(p, body, samples, warmup, runs):
    """Run the parent's measured loop `body(n, lat)` after telling the child
    how many round trips to serve; returns per-run percentile dicts."""
    lat = np.zeros(samples, np.int64)
    out = []
    p.chan.send(warmup)
    body(warmup, np.zeros(warmup, np.int64))
    p.chan.recv()
    for _ in range(runs):
        p.chan.send(samples)
        body(samples, lat)
        res = p.chan.recv()
        if res.get("bad"):
            raise RuntimeError(f"latency integrity failure: {res}")
        out.append(U.percentiles_ns(lat))
    return out


def _child_serve(chan, serve):
    while True:
        n = chan.recv()
        if n is None:
            break
        chan.send({"bad": serve(n)})


def bench_lat_2rings(spin, samples, warmup, runs, cpus, num=64):
    """A: driver of ring 0 + host of ring 1.  B: host of ring 0 + driver of ring 1."""
    with SharedRing.create(num=num, slot_size=MSG, nrings=2, event_idx=True,
                           indirect=False) as ring:
        def child(chan):
            h0 = ring.host(0)
            d1 = ring.driver(1, slot_size=MSG)
            riov = vringipc.Iov()
            buf = bytearray(MSG)
            wait, getdesc, complete, notify = h0.wait, h0.getdesc, h0.complete, h0.notify
            add, kick, get_buf = d1.add_slot, d1.kick, d1.get_buf_head

            def serve(n):
                for _ in range(n):
                    head = getdesc(riov)
                    if head is None:
                        wait(spin=spin)
                        head = getdesc(riov)
                    riov.pull_into(buf)
                    complete(head, 0)
                    notify()
                    get_buf()             # the previous reply (A completed it)
                    add(buf)
                    kick()
                return 0
            _child_serve(chan, serve)
            ring.close()

        with U.Pair(child, cpus) as p:
            d0 = ring.driver(0, slot_size=MSG)
            h1 = ring.host(1)
            riov = vringipc.Iov()
            msg = bytearray(MSG)
            buf = bytearray(MSG)
            pack = struct.Struct("<Q").pack_into
            unpack = struct.Struct("<Q").unpack_from
            add, kick, get_buf = d0.add_slot, d0.kick, d0.get_buf_head
            wait, getdesc, complete, notify = h1.wait, h1.getdesc, h1.complete, h1.notify
            pc = time.perf_counter_ns
            bad = [0]

            def body(n, lat):
                for i in range(n):
                    pack(msg, 0, i)
                    t0 = pc()
                    add(msg)
                    kick()
                    head = getdesc(riov)
                    if head is None:
                        wait(spin=spin)
                        head = getdesc(riov)
                    riov.pull_into(buf)
                    complete(head, 0)
                    notify()
                    get_buf()
                    lat[i] = pc() - t0
                    if unpack(buf)[0] != i:
                        bad[0] += 1
            res = _lat_runs(p, body, samples, warmup, runs)
            if bad[0]:
                raise RuntimeError(f"2rings ping-pong: {bad[0]} bad replies")
    return res


def bench_lat_reqrep(spin, samples, warmup, runs, cpus, num=64):
    """One ring: A adds [request readable 64 B][reply writable 64 B]; B pulls
    the request, pushes the reply, complete(head, 64)."""
    with SharedRing.create(num=num, slot_size=2 * MSG, event_idx=True, indirect=False) as ring:
        win = ring.layout.rings[0].win_off
        req_off, rep_off = win, win + MSG

        def child(chan):
            h = ring.host(0)
            riov, wiov = vringipc.Iov(), vringipc.Iov()
            buf = bytearray(MSG)
            wait, getdesc, complete, notify = h.wait, h.getdesc, h.complete, h.notify

            def serve(n):
                for _ in range(n):
                    head = getdesc(riov, wiov)
                    if head is None:
                        wait(spin=spin)
                        head = getdesc(riov, wiov)
                    riov.pull_into(buf)
                    wiov.push(buf)
                    complete(head, MSG)
                    notify()
                return 0
            _child_serve(chan, serve)
            ring.close()

        with U.Pair(child, cpus) as p:
            d = ring.driver(0)
            seg = memoryview(ring.segment.buf)
            req = seg[req_off:req_off + MSG]
            rep = seg[rep_off:rep_off + MSG]
            chain_r, chain_w = [(req_off, MSG)], [(rep_off, MSG)]
            reply = bytearray(MSG)
            pack = struct.Struct("<Q").pack_into
            unpack = struct.Struct("<Q").unpack_from
            add, kick, get_buf, wait_used = d.add, d.kick, d.get_buf, d.wait_used
            pc = time.perf_counter_ns
            bad = [0]

            def body(n, lat):
                for i in range(n):
                    t0 = pc()
                    pack(req, 0, i)               # the request, written in place
                    add(chain_r, chain_w)
                    kick()
                    r = get_buf()
                    if r is None:
                        wait_used(spin=spin)
                        r = get_buf()
                    reply[:] = rep                # copy the reply out
                    lat[i] = pc() - t0
                    if r[1] != MSG or unpack(reply)[0] != i:
                        bad[0] += 1
            try:
                res = _lat_runs(p, body, samples, warmup, runs)
            finally:
                del req, rep
                seg.release()
                d.close()
            if bad[0]:
                raise RuntimeError(f"reqrep ping-pong: {bad[0]} bad replies")
    return res


def bench_lat_pipe(samples, warmup, runs, cpus):
    a2b_r, a2b_w = os.pipe()
    b2a_r, b2a_w = os.pipe()
    try:
        def child(chan):
            read, write = os.read, os.write

            def serve(n):
                for _ in range(n):
                    write(b2a_w, read(a2b_r, MSG))
                return 0
            _child_serve(chan, serve)

        with U.Pair(child, cpus) as p:
            msg = bytearray(MSG)
            pack = struct.Struct("<Q").pack_into
            unpack = struct.Struct("<Q").unpack_from
            read, write = os.read, os.write
            pc = time.perf_counter_ns
            bad = [0]

            def body(n, lat):
                for i in range(n):
                    pack(msg, 0, i)
                    t0 = pc()
                    write(a2b_w, msg)
                    data = read(b2a_r, MSG)
                    lat[i] = pc() - t0
                    if len(data) != MSG or unpack(data)[0] != i:
                        bad[0] += 1
            res = _lat_runs(p, body, samples, warmup, runs)
            if bad[0]:
                raise RuntimeError(f"pipe ping-pong: {bad[0]} bad replies")
    finally:
        for fd in (a2b_r, a2b_w, b2a_r, b2a_w):
            os.close(fd)
    return res


def bench_c(exe, n, runs, cpus):
    # the programs warm up by themselves (n/10 + 100 round trips first)
    return [_c_to_pcts(U.run_c(exe, n, cpus)) for _ in range(runs)]


def _c_to_pcts(r):
    out = {f"p{p:g}": float(r[f"p{p:g}_ns"]) for p in U.PCTS}
    out.update(max=float(r["max_ns"]), min=float(r["min_ns"]), mean=float(r["mean_ns"]), n=r["n"])
    return out


# =============================================================================
# reporting
# =============================================================================

def _fmt_rate(s):
    return f"{s['median'] / 1e6:.2f} [{s['min'] / 1e6:.2f}-{s['max'] / 1e6:.2f}]"


def _fmt_us(s):
    return f"{s['median'] / 1e3:.2f} [{s['min'] / 1e3:.2f}-{s['max'] / 1e3:.2f}]"


def _fmt_ratio(r):
    return f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"


def _paired(a_runs, b_runs):
    """Per-round ratios a/b (round r of a ran right next to round r of b)."""
    return U.spread([x / y for x, y in zip(a_runs, b_runs)])


def compute_ratios(res):
    """figure -> {baseline, ratio (paired per round: median [min-max])}."""
    out = {}
    tp, lat = res["throughput"], res["latency"]
    for key, fig in tp.items():
        base = "pipe_batched" if key.startswith("ring_batch") else \
            "pipe_64B" if key.startswith("ring_single") else None
        if base in tp:
            out[key] = {"baseline": base, "ratio": _paired(fig["runs"], tp[base]["runs"])}
    for key, fig in lat.items():
        base = "c_cacheline_busy" if key.startswith("ring") and key.endswith("busy") else \
            "c_eventfd_blocking" if key.endswith("blocking") and not key.startswith("c_") else None
        if base in lat:
            out[key] = {"baseline": base, "stat": "p50",
                        "ratio": _paired(fig["p50"]["runs"], lat[base]["p50"]["runs"])}
    return out


def compute_quiet(res):
    """Medians (and paired ratios) over the rounds in which other processes
    used less than QUIET_CPUS: what the figures look like on an idle machine."""
    out = {}
    for sec in ("throughput", "latency"):
        loads = res["others_cpus_per_round"].get(sec)
        figs = res[sec]
        if not loads or not figs:
            continue
        idx = [i for i, x in enumerate(loads) if x < QUIET_CPUS]
        scale, get = (1e6, lambda f: f["runs"]) if sec == "throughput" else \
            (1e3, lambda f: f["p50"]["runs"])
        q = {"rounds": idx, "figures": {}, "ratios": {}}
        if idx:
            for key, f in figs.items():
                q["figures"][key] = float(np.median([get(f)[i] for i in idx])) / scale
            for key, r in res["ratios"].items():
                if key in figs:
                    q["ratios"][key] = float(np.median([r["ratio"]["runs"][i] for i in idx]))
        out[sec] = q
    return out


def build_table(res) -> str:
    """The human-readable summary (also stored in the JSON)."""
    L = []
    runs = res["config"]["runs"]
    ratios = res["ratios"]
    tp = res["throughput"]
    if tp:
        L.append(f"Throughput, 64-byte messages, producer -> consumer: million transfers/s, "
                 f"median [min-max] of {runs} runs;")
        L.append("ratio = figure / baseline, paired per round (measured back to back), "
                 "median [min-max]")
        L.append(f"{'figure':30s} {'Mtransfers/s':>19s}   {'baseline':30s} {'ratio':>18s}")
        L.append("-" * 102)
        for key, fig in tp.items():
            row = f"{key:30s} {_fmt_rate(fig):>19s}"
            if key in ratios:
                b = ratios[key]["baseline"]
                row += f"   {b + ' ' + format(tp[b]['median'] / 1e6, '.2f'):30s} " \
                       f"{_fmt_ratio(ratios[key]['ratio']):>18s}"
            L.append(row)
        L.append(f"(pipe_batched: {res['config']['pipe_batch_bytes']} bytes per write syscall; "
                 f"pipe_64B: one 64-byte write per message)")
        L.append("")
    lat = res["latency"]
    if lat:
        L.append("Round trip, 64 B each way, microseconds: each percentile is the median over "
                 f"{runs} runs, [min-max] for p50; max = worst of all runs;")
        L.append("ratio = p50 / baseline p50, paired per round, median [min-max]")
        L.append(f"{'figure':21s} {'n/run':>6s} {'p50':>19s} {'p90':>7s} {'p99':>7s} {'p99.9':>7s} "
                 f"{'max':>8s}   {'baseline':24s} {'ratio':>18s}")
        L.append("-" * 126)
        for key, p in lat.items():
            row = (f"{key:21s} {p['samples_per_run']:6d} {_fmt_us(p['p50']):>19s} "
                   f"{p['p90']['median'] / 1e3:7.2f} {p['p99']['median'] / 1e3:7.2f} "
                   f"{p['p99.9']['median'] / 1e3:7.2f} {p['max']['max'] / 1e3:8.1f}")
            if key in ratios:
                b = ratios[key]["baseline"]
                row += (f"   {b + ' ' + format(lat[b]['p50']['median'] / 1e3, '.2f'):24s} "
                        f"{_fmt_ratio(ratios[key]['ratio']):>18s}")
            L.append(row)
        L.append("")
    load = res.get("cpu_load")
    if load:
        L.append(f"Other processes on the machine during the run: {load['others_cpus']:.2f} CPUs "
                 f"busy on average (of {load['ncpu']}); steal {load['steal_cpus']:.2f} CPUs")
        for sec, v in res.get("others_cpus_per_round", {}).items():
            L.append(f"  per {sec} round: " + " ".join(f"{x:.2f}" for x in v))
        L.append("")
    quiet = res.get("quiet_rounds")
    if quiet:
        L.append(f"Quiet rounds only (other processes < {QUIET_CPUS} CPUs during the round), "
                 "median of those rounds:")
        for sec in ("throughput", "latency"):
            q = quiet.get(sec)
            if not q:
                continue
            if not q["rounds"]:
                L.append(f"  {sec}: no quiet round")
                continue
            unit = "Mtransfers/s" if sec == "throughput" else "p50 us"
            L.append(f"  {sec}, round(s) {', '.join(str(r + 1) for r in q['rounds'])}: "
                     f"{unit}, ratio to the same baseline as above")
            for k, v in q["figures"].items():
                L.append(f"    {k:30s} {v:8.2f}" + (f"   {q['ratios'][k]:6.2f}x" if k in q["ratios"] else ""))
        L.append("")
    L.append("Issue 2 targets:")
    for t in res["targets"]:
        L.append(f"  [{'PASS' if t['pass'] else 'MISS'}] {t['target']}: {t['measured']}")
    return "\n".join(L)


def evaluate_targets(res):
    out = []
    tp, lat, ratios = res["throughput"], res["latency"], res["ratios"]
    for key, fig in tp.items():
        if key.startswith("ring_batch_eventidx_num"):
            out.append({"target": f">= 3M transfers/s ({key})",
                        "measured": f"{fig['median'] / 1e6:.2f}M/s (min {fig['min'] / 1e6:.2f})",
                        "pass": fig["median"] >= TARGET_TPUT})
    for key, s in lat.items():
        if key.startswith("ring") and key.endswith("busy"):
            out.append({"target": f"busy-poll RTT p50 <= 2 us ({key})",
                        "measured": f"{s['p50']['median'] / 1e3:.2f} us "
                                    f"(max of runs {s['p50']['max'] / 1e3:.2f})",
                        "pass": s["p50"]["median"] <= TARGET_BUSY_P50_NS})
    for key, s in lat.items():
        if key.startswith("ring") and key.endswith("blocking") and key in ratios:
            r = ratios[key]["ratio"]
            ev = lat[ratios[key]["baseline"]]
            out.append({"target": f"blocking RTT p50 <= 1.2x C eventfd ({key})",
                        "measured": f"{r['median']:.2f}x paired median [{r['min']:.2f}-{r['max']:.2f}]"
                                    f" ({s['p50']['median'] / 1e3:.2f} vs "
                                    f"{ev['p50']['median'] / 1e3:.2f} us)",
                        "pass": r["median"] <= TARGET_BLOCK_RATIO})
    return out


def run_rounds(plan, runs, step):
    """Interleave: round r runs every benchmark of `plan` once (one fresh
    process pair each, warm-up included), in an order rotated by r, so slow
    drifts of the shared machine's load hit every figure alike."""
    acc = {name: [] for name, _ in plan}
    loads = []
    for r in range(runs):
        k = r % len(plan)
        snap = U.cpu_snapshot()
        for name, fn in plan[k:] + plan[:k]:
            step(f"round {r + 1}/{runs}: {name}")
            acc[name].append(fn())
        loads.append(U.cpu_load(snap, U.cpu_snapshot())["others_cpus"])
    return acc, loads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="few-second smoke run")
    ap.add_argument("--json", metavar="PATH", help="write every figure + machine info here")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the two processes to CPUs")
    ap.add_argument("--runs", type=int, help="measured runs per figure (default 7, quick 2)")
    ap.add_argument("--transfers", type=int,
                    help="messages per throughput run, batch API (default 3M, quick 200k)")
    ap.add_argument("--nums", default=None,
                    help="comma-separated ring sizes for the batch throughput (default 256,1024,4096)")
    ap.add_argument("--num", type=int, default=256,
                    help="ring size of the one-at-a-time and EVENT_IDX-off figures (default 256)")
    ap.add_argument("--lat-samples", type=int,
                    help="round trips per busy-poll latency run (default 50000; blocking: 1/5)")
    ap.add_argument("--verify", choices=["sample", "all"], default="sample",
                    help="batch consumer: check first/last seq of every batch and all of every "
                         "8th batch (sample, default) or all of every batch")
    ap.add_argument("--only", choices=["throughput", "latency"], help="run one section only")
    a = ap.parse_args(argv)

    q = a.quick
    runs = a.runs or (2 if q else 7)
    total = a.transfers or (200_000 if q else 3_000_000)
    single_total = max(total // 4, 10_000)
    pipe1_total = max(total // 8, 10_000)
    nums = [int(x) for x in (a.nums or ("256" if q else "256,1024,4096")).split(",")]
    lat_samples = a.lat_samples or (5000 if q else 50_000)
    lat_block = max(lat_samples // 5, 1000)
    warmup = max(lat_samples // 10, 500)
    every = 1 if a.verify == "all" else 8
    cpus = U.pick_cpus(not a.no_pin)
    saved_aff = os.sched_getaffinity(0)

    res = {
        "benchmark": "ring_bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", os.path.relpath(os.path.abspath(__file__), U.REPO)]
                            + (argv if argv is not None else sys.argv[1:])),
        "machine": U.machine_info(),
        "vringipc": vringipc.__file__,
        "pinning": {"enabled": cpus is not None, "cpus": list(cpus) if cpus else None,
                    "parent": "producer / ping side (A)", "child": "consumer / pong side (B)",
                    "note": None if cpus or a.no_pin else "fewer than 2 CPUs: not pinned"},
        "config": {"msg_bytes": MSG, "runs": runs, "interleaved": True,
                   "warmup": "each run forks a fresh pair and warms up first "
                             "(throughput: total/10 messages, latency: lat_warmup round trips)",
                   "transfers_batch": total, "transfers_single": single_total,
                   "transfers_pipe_64B": pipe1_total, "pipe_batch_bytes": 256 * MSG,
                   "nums": nums, "num_single": a.num, "verify": a.verify,
                   "lat_samples_busy": lat_samples, "lat_samples_blocking": lat_block,
                   "lat_warmup": warmup, "busy_spin_s": BUSY_SPIN, "quick": q,
                   "wait_default_spin_ns": 50_000},
        "throughput": {},
        "latency": {},
        "others_cpus_per_round": {},
        "notes": [],
    }
    t_start = time.monotonic()
    load0 = U.cpu_snapshot()

    def step(name):
        print(f"  {time.monotonic() - t_start:6.1f}s  {name}", file=sys.stderr, flush=True)

    try:
        if cpus:
            U.pin_self(cpus[0])
        if a.only in (None, "throughput"):
            plan = [(f"ring_batch_eventidx_num{num}",
                     lambda num=num: bench_ring_batch(num, True, total, 1, cpus, every))
                    for num in nums]
            plan += [
                (f"ring_batch_noeventidx_num{a.num}",
                 lambda: bench_ring_batch(a.num, False, total, 1, cpus, every)),
                (f"ring_single_eventidx_num{a.num}",
                 lambda: bench_ring_single(a.num, single_total, 1, cpus)),
                ("pipe_64B", lambda: bench_pipe(0, pipe1_total, 1, cpus)),
                ("pipe_batched", lambda: bench_pipe(256, total, 1, cpus, every)),
            ]
            transfers = {f"ring_single_eventidx_num{a.num}": single_total,
                         "pipe_64B": pipe1_total}
            acc, res["others_cpus_per_round"]["throughput"] = run_rounds(plan, runs, step)
            for name, got in acc.items():
                fig = U.spread([x for g in got for x in g["rates"]])
                fig["transfers_per_run"] = transfers.get(name, total)
                if "details" in got[0]:
                    fig["details"] = [x for g in got for x in g["details"]]
                if "bytes_per_write" in got[0]:
                    fig["bytes_per_write"] = got[0]["bytes_per_write"]
                res["throughput"][name] = fig
        if a.only in (None, "latency"):
            with tempfile.TemporaryDirectory(prefix="ring_bench_") as tmp:
                exes, why = U.compile_c(["eventfd_pingpong.c", "cacheline_pingpong.c"], tmp)
                plan = []
                if exes is None:
                    res["notes"].append(why)
                    print("note:", why, file=sys.stderr)
                else:
                    plan += [
                        ("c_cacheline_busy",
                         lambda: bench_c(exes["cacheline_pingpong"], lat_samples * 4, 1, cpus)),
                        ("c_eventfd_blocking",
                         lambda: bench_c(exes["eventfd_pingpong"], lat_block, 1, cpus)),
                    ]
                for mode, spin, n in (("busy", BUSY_SPIN, lat_samples), ("blocking", 0, lat_block)):
                    plan += [
                        (f"ring_2rings_{mode}",
                         lambda spin=spin, n=n: bench_lat_2rings(spin, n, warmup, 1, cpus)),
                        (f"ring_reqrep_{mode}",
                         lambda spin=spin, n=n: bench_lat_reqrep(spin, n, warmup, 1, cpus)),
                    ]
                plan.append(("pipe_blocking", lambda: bench_lat_pipe(lat_block, warmup, 1, cpus)))
                acc, res["others_cpus_per_round"]["latency"] = run_rounds(plan, runs, step)
                for name, got in acc.items():
                    res["latency"][name] = U.summarize_latency([x for g in got for x in g])
    finally:
        os.sched_setaffinity(0, saved_aff)

    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    res["cpu_load"] = U.cpu_load(load0, U.cpu_snapshot())
    res["ratios"] = compute_ratios(res)
    res["quiet_rounds"] = compute_quiet(res)
    res["targets"] = evaluate_targets(res)
    table = build_table(res)
    res["table"] = table
    m = res["machine"]
    head = (f"{m['cpu_model']}, {m['cores_online']} CPUs, kernel {m['kernel']}, "
            f"Python {m['python']}, pinning: {'CPUs ' + str(list(cpus)) if cpus else 'off'}; "
            f"{res['elapsed_s']} s")
    res["headline"] = head
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    print()
    print(head)
    print(table)
    if a.json:
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
