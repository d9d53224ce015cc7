"""Round-trip latency: ping-pong between two processes over a transport.

Process A sends a payload over link 1, process B receives it and sends the
same bytes back over link 2, A receives them: one round trip, timed with
perf_counter_ns around send + recv.  Each run forks a fresh pair (pinned as
asked), connects, warms up for ``warmup`` seconds (at least MIN_WARMUP round trips),
then measures for ``duration`` seconds (and at least MIN_SAMPLES round trips
unless that takes 4 x duration) or ``max_samples`` round trips.  The
samples go into an HDR histogram (the ``hdrhistogram`` package, 3 significant
digits) after the run, so nothing but two clock reads is added to the path.

Fixed-rate mode (``rate`` round trips per second): A starts round trip k at
t0 + k/rate, or at once if it is already late.  A slow round trip delays the
ones behind it, which a plain loop would never see (coordinated omission);
the histogram is therefore recorded with ``record_corrected_value(rtt,
1/rate)``, which adds the samples that the stall kept from being taken.  The
latency measured from each round trip's *scheduled* start is reported too.
"""

from __future__ import annotations

import array
import time
from dataclasses import dataclass, field, replace

import numpy as np

from vringipc.benchtool import transports as T
from vringipc.benchtool.procs import Group, cpu_plan, resolve_pin

__all__ = ["LatencyConfig", "new_histogram", "hist_from_samples", "hist_stats",
           "summarize_runs", "pingpong_once", "run_latency", "PCT_KEYS", "handshake"]

PCTS = (50.0, 90.0, 99.0, 99.9, 99.99)
PCT_KEYS = ("p50", "p90", "p99", "p99.9", "p99.99", "max")
HIGHEST_NS = 60_000_000_000          # 60 s
MIN_SAMPLES = 50                     # per run, unless that takes 4x the run's duration
MIN_WARMUP = 5                       # round trips of warm-up at least


@dataclass
class LatencyConfig:
    payloads: list = field(default_factory=lambda: [64])
    policies: list = field(default_factory=lambda: ["block"])
    runs: int = 5
    duration: float = 1.0            # seconds measured per run
    warmup: float = 0.2              # seconds of warm-up per run
    max_samples: int = 500_000       # per run
    rate: float | None = None        # fixed-rate mode: round trips per second
    pin: str = "auto"                # split, same, none, or auto (per wait policy)
    cpus: list | None = None
    timeout: float = 120.0


# --- HDR histograms -------------------------------------------------------------------

def new_histogram():
    from hdrh.histogram import HdrHistogram
    return HdrHistogram(1, HIGHEST_NS, 3)


def hist_from_samples(samples_ns, interval_ns: int = 0):
    """An HDR histogram of the samples (ns); with interval_ns, corrected for
    coordinated omission (record_corrected_value)."""
    h = new_histogram()
    a = np.asarray(samples_ns, dtype=np.int64)
    if a.size == 0:
        return h
    a = np.clip(a, 1, HIGHEST_NS)
    values, counts = np.unique(a, return_counts=True)
    if interval_ns > 0:
        for v, c in zip(values.tolist(), counts.tolist()):
            h.record_corrected_value(v, interval_ns, c)
    else:
        for v, c in zip(values.tolist(), counts.tolist()):
            h.record_value(v, c)
    return h


def hist_stats(h, mean_ns: float | None = None) -> dict:
    """Percentiles (microseconds) of a histogram of nanoseconds.  The mean is
    taken from mean_ns when the caller knows it exactly (the raw samples):
    hdrhistogram's get_mean_value walks every bucket in Python."""
    n = h.get_total_count()
    if n == 0:
        return {k: None for k in PCT_KEYS} | {"min": None, "mean": None, "n": 0}
    vals = h.get_percentile_to_value_dict(list(PCTS))
    out = {f"p{p:g}": vals[p] / 1000.0 for p in PCTS}
    out["max"] = h.get_max_value() / 1000.0
    out["min"] = h.get_min_value() / 1000.0
    out["mean"] = (h.get_mean_value() if mean_ns is None else mean_ns) / 1000.0
    out["n"] = int(n)
    return out


def encode(h) -> str:
    e = h.encode()
    return e.decode() if isinstance(e, bytes) else str(e)


def decode(s: str):
    from hdrh.histogram import HdrHistogram
    return HdrHistogram.decode(s.encode() if isinstance(s, str) else s)


def spread(values) -> dict:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": float(np.median(v)), "min": min(v), "max": max(v), "runs": v}


def summarize_runs(run_hists, run_means=None) -> tuple[dict, object, float | None]:
    """(percentiles: median/min/max/runs of every percentile over the runs,
    the combined histogram of all runs, its mean in ns if run_means given)."""
    means = run_means or [None] * len(run_hists)
    stats = [hist_stats(h, m) for h, m in zip(run_hists, means)]
    pct = {k: spread([s[k] for s in stats]) for k in PCT_KEYS + ("mean",)}
    combined = new_histogram()
    for h in run_hists:
        combined.add(h)
    cmean = None
    if run_means:
        counts = [h.get_total_count() for h in run_hists]
        if sum(counts):
            cmean = sum(m * c for m, c in zip(run_means, counts)) / sum(counts)
    return pct, combined, cmean


# --- the two processes ----------------------------------------------------------------

def handshake(ctl, *ends):
    """A benchmark process's start: report its ends opened, wait for
    "connect", call each end's ready(), report ready, and return the parent's
    "go" message (a start time on the shared clock, for the timed workloads)."""
    ctl.send("opened")
    ctl.recv()
    for e in ends:
        e.ready()
    ctl.send("ready")
    return ctl.recv()


def _ping(ctl, link_out, link_in, payload, cfg_tuple):
    duration, warmup, max_samples, rate = cfg_tuple
    tx = link_out.sender()
    rx = link_in.receiver()
    handshake(ctl, tx, rx)
    send, recv = tx.send, rx.recv
    msg = bytes(range(256)) * (payload // 256) + bytes(payload % 256)
    pc = time.perf_counter_ns
    # warm-up
    stop = pc() + int(warmup * 1e9)
    k = 0
    while k < MIN_WARMUP or pc() < stop:
        send(msg)
        r = recv()
        if len(r) != payload:
            raise AssertionError(f"reply of {len(r)} bytes, sent {payload}")
        k += 1
    samples = array.array("q", bytes(8 * max_samples))
    sched = array.array("q", bytes(8 * max_samples)) if rate else None
    n = 0
    t_begin = pc()
    t_stop = t_begin + int(duration * 1e9)
    # at least MIN_SAMPLES round trips, unless that takes 4x the duration
    t_hard = t_begin + int(4 * duration * 1e9)
    if not rate:
        while n < max_samples:
            t0 = pc()
            send(msg)
            r = recv()
            t1 = pc()
            samples[n] = t1 - t0
            n += 1
            if len(r) != payload:
                raise AssertionError(f"reply of {len(r)} bytes, sent {payload}")
            if t1 >= t_stop and (n >= MIN_SAMPLES or t1 >= t_hard):
                break
    else:
        interval = 1e9 / rate
        sleep = time.sleep
        start = pc()
        while n < max_samples:
            due = start + int(n * interval)
            now = pc()
            if now < due:
                if due - now > 200_000:
                    sleep((due - now - 100_000) / 1e9)
                while pc() < due:
                    pass
            t0 = pc()
            send(msg)
            r = recv()
            t1 = pc()
            samples[n] = t1 - t0
            sched[n] = t1 - due
            n += 1
            if len(r) != payload:
                raise AssertionError(f"reply of {len(r)} bytes, sent {payload}")
            if t1 >= t_stop and (n >= MIN_SAMPLES or t1 >= t_hard):
                break
    send(T.SENTINEL)
    recv()                              # B's echo of the stop: it has seen everything
    ctl.send(("result", samples[:n].tobytes(), sched[:n].tobytes() if sched else None, k))
    ctl.recv()                          # "exit": the peer has finished too
    tx.close()
    rx.close()


def _pong(ctl, link_in, link_out):
    rx = link_in.receiver()
    tx = link_out.sender()
    handshake(ctl, rx, tx)
    send, recv = tx.send, rx.recv
    n = 0
    while True:
        m = recv()
        send(m)
        if len(m) == 1:
            break
        n += 1
    ctl.send(("result", n))
    ctl.recv()
    rx.close()
    tx.close()


def pingpong_once(tcls, payload: int, policy: str, cfg: LatencyConfig) -> dict:
    """One run: fork the pair, measure, return raw samples (ns)."""
    plan = cpu_plan(resolve_pin(cfg.pin, policy), 2, cfg.cpus)
    link1 = tcls(payload, policy, 2)
    try:
        link2 = tcls(payload, policy, 2)
    except BaseException:
        link1.close()
        raise
    try:
        with Group(cfg.timeout) as g:
            a = g.spawn(_ping, link1, link2, payload,
                        (cfg.duration, cfg.warmup, cfg.max_samples, cfg.rate),
                        cpu=plan[0], label=f"{tcls.name} ping")
            b = g.spawn(_pong, link1, link2, cpu=plan[1], label=f"{tcls.name} pong")
            g.recv_all()                 # both opened their ends
            g.send_all("connect")
            g.recv_all()                 # both ready
            g.send_all("go")
            ra = g.recv(a)
            rb = g.recv(b)
            g.send_all("exit")
    finally:
        link1.close()
        link2.close()
    samples = np.frombuffer(ra[1], dtype=np.int64)
    sched = np.frombuffer(ra[2], dtype=np.int64) if ra[2] is not None else None
    if rb[1] != samples.size + ra[3]:
        raise AssertionError(f"pong echoed {rb[1]} messages, ping sent {samples.size + ra[3]}")
    return {"samples": samples, "schedule": sched, "warmup": ra[3], "cpus": plan}


def _case_pin(case, cfg: LatencyConfig) -> str:
    return case[3] if len(case) > 3 and case[3] else cfg.pin


def run_latency(cases, cfg: LatencyConfig, progress=None, errors=None) -> list[dict]:
    """Measure every (transport class, payload, policy[, pinning]) case of
    `cases` (pinning: split, same, none or auto; default cfg.pin),
    interleaved in rounds (round r measures each case once), and return one
    record per case (see docs/BENCH.md for the fields).  With `errors` (a
    list), a case that fails is recorded there and dropped; otherwise the
    exception propagates."""
    per_case: dict = {c: [] for c in cases}
    sched_case: dict = {c: [] for c in cases}
    mean_case: dict = {c: [] for c in cases}
    cpus_used: dict = {}
    failed: set = set()
    for r in range(cfg.runs):
        for c in cases:
            tcls, payload, policy = c[:3]
            pin = _case_pin(c, cfg)
            if progress:
                progress.step(f"latency {tcls.name} {policy} {fmt_size(payload)}"
                              f"{'' if pin == cfg.pin else ' ' + pin} run {r + 1}/{cfg.runs}")
            if c in failed:
                continue
            try:
                res = pingpong_once(tcls, payload, policy,
                                    cfg if pin == cfg.pin else replace(cfg, pin=pin))
            except (Exception, TimeoutError) as e:
                if errors is None:
                    raise
                failed.add(c)
                errors.append({"case": f"latency {tcls.name} {policy} {payload} B {pin}",
                               "error": f"{type(e).__name__}: {e}"})
                if progress:
                    progress.note(f"FAILED latency {tcls.name} {policy} {fmt_size(payload)}: "
                                  f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
                continue
            interval = int(1e9 / cfg.rate) if cfg.rate else 0
            per_case[c].append(hist_from_samples(res["samples"], interval))
            if not interval:         # exact mean of the raw samples (not corrected ones)
                mean_case[c].append(float(res["samples"].mean()) if res["samples"].size else 0.0)
            if res["schedule"] is not None:
                sched_case[c].append(hist_from_samples(res["schedule"]))
            cpus_used[c] = res["cpus"]
    out = []
    for c in cases:
        if c in failed:
            continue
        tcls, payload, policy = c[:3]
        pin = _case_pin(c, cfg)
        pct, combined, cmean = summarize_runs(per_case[c], mean_case[c] or None)
        rec = {
            "transport": tcls.name,
            "policy": policy,
            "pinning": {"mode": resolve_pin(pin, policy), "requested": pin,
                        "cpus": cpus_used[c]},
            "payload": payload,
            "mode": "fixed-rate" if cfg.rate else "pingpong",
            "rate": cfg.rate,
            "unit": "us",
            "runs": len(per_case[c]),
            "samples": int(combined.get_total_count()),
            "samples_per_run": [int(h.get_total_count()) for h in per_case[c]],
            "percentiles": pct,
            "combined": hist_stats(combined, cmean),
            "hdr": encode(combined),
            "hgrm": None,
        }
        if cfg.rate:
            _, sc, _ = summarize_runs(sched_case[c])
            rec["from_schedule"] = hist_stats(sc)
        out.append(rec)
    return out


def fmt_size(n: int) -> str:
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k and n % k == 0:
            return f"{n // k} {unit}"
    return f"{n} B"
