"""Oversubscription: P request/response pairs at once.

Each pair is a client and a server process with two links of their own (a
request queue and a response queue).  The client sends a small object and
waits for the server to send it back, over and over; all 2P processes run at
the same time, unpinned, so with P > CPUs / 2 they compete for the CPUs.  A
waiter that spins while its peer needs the CPU it is spinning on shows up
here as a collapse of the total; one that sleeps does not.

The figure is round trips per second summed over all pairs, counted in a
window that every process places on the same monotonic clock (after a
warm-up), like the throughput workload.  Sweep P = 1, 2, 4, 8, 16 and compare
each transport with multiprocessing.Queue and SimpleQueue measured in the same
run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vringipc.benchtool import transports as T
from vringipc.benchtool.latency import _pong, handshake, spread
from vringipc.benchtool.procs import Group

__all__ = ["OversubConfig", "oversub_once", "run_oversub", "DEFAULT_PAIRS"]

DEFAULT_PAIRS = (1, 2, 4, 8, 16)


@dataclass
class OversubConfig:
    pairs: list = field(default_factory=lambda: list(DEFAULT_PAIRS))
    payload: int = 64
    runs: int = 3
    duration: float = 0.5            # seconds counted per run
    warmup: float = 0.1
    timeout: float = 120.0


def _client(ctl, req, resp, payload, window):
    tx = req.sender()
    rx = resp.receiver()
    t_go = handshake(ctl, tx, rx)
    t_win, t_end = t_go + window[0], t_go + window[0] + window[1]
    send, recv = tx.send, rx.recv
    msg = bytes(range(256)) * (payload // 256) + bytes(payload % 256)
    pc = time.perf_counter
    n = 0
    n0 = w0 = None
    while True:
        send(msg)
        r = recv()
        if len(r) != payload:
            raise AssertionError(f"reply of {len(r)} bytes, sent {payload}")
        n += 1
        now = pc()
        if w0 is None and now >= t_win:
            n0, w0 = n, now
        if now >= t_end:
            break
    w1 = pc()
    if w0 is None:
        n0, w0 = 0, t_go
    send(T.SENTINEL)
    recv()                               # the server's echo of the stop
    ctl.send(("result", {"round_trips": n, "window_round_trips": n - n0, "window_s": w1 - w0}))
    ctl.recv()
    tx.close()
    rx.close()


def oversub_once(tcls, pairs: int, policy: str, cfg: OversubConfig) -> dict:
    """One run of `pairs` client/server pairs; returns round trips/s summed
    over the pairs and each pair's own rate."""
    links = []
    try:
        for _ in range(2 * pairs):
            links.append(tcls(cfg.payload, policy, 2))
        window = (cfg.warmup, cfg.duration)
        with Group(cfg.timeout) as g:
            for i in range(pairs):
                req, resp = links[2 * i], links[2 * i + 1]
                g.spawn(_client, req, resp, cfg.payload, window, label=f"{tcls.name} client {i}")
                # the server: latency's pong (echo until the stop marker)
                g.spawn(_pong, req, resp, label=f"{tcls.name} server {i}")
            g.recv_all()
            g.send_all("connect")
            g.recv_all()
            g.send_all(time.perf_counter() + 0.01)
            res = [g.recv(c, cfg.timeout)[1] for c in g.children]
            g.send_all("exit")
    finally:
        for link in links:
            link.close()
    cres, echoed = res[0::2], res[1::2]        # spawned client, server, client, ...
    sent = sum(c["round_trips"] for c in cres)
    if sent != sum(echoed):
        raise AssertionError(f"{tcls.name}: clients made {sent} round trips, servers echoed "
                             f"{sum(echoed)}")
    per_pair = [c["window_round_trips"] / c["window_s"] if c["window_s"] > 0 else 0.0
                for c in cres]
    return {"rt_per_s": sum(per_pair), "per_pair": per_pair, "round_trips": sent}


def run_oversub(cases, cfg: OversubConfig, progress=None, errors=None) -> list[dict]:
    """cases: (transport class, pairs, policy) tuples, measured interleaved
    in rounds like the other workloads; one record per case."""
    runs: dict = {c: [] for c in cases}
    failed: set = set()
    for r in range(cfg.runs):
        for c in cases:
            tcls, pairs, policy = c
            what = f"oversub {tcls.name} {policy} {pairs} pair{'s' if pairs > 1 else ''}"
            if progress:
                progress.step(f"{what} run {r + 1}/{cfg.runs}")
            if c in failed:
                continue
            try:
                runs[c].append(oversub_once(tcls, pairs, policy, cfg))
            except (Exception, TimeoutError) as e:
                if errors is None:
                    raise
                failed.add(c)
                errors.append({"case": what, "error": f"{type(e).__name__}: {e}"})
                if progress:
                    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    progress.note(f"FAILED {what}: {msg}")
    out = []
    for c in cases:
        if c in failed:
            continue
        tcls, pairs, policy = c
        rs = runs[c]
        out.append({
            "transport": tcls.name,
            "policy": policy,
            "pairs": pairs,
            "processes": 2 * pairs,
            "pinning": {"mode": "none", "requested": "none", "cpus": None},
            "payload": cfg.payload,
            "runs": len(rs),
            "rt_per_s": spread([x["rt_per_s"] for x in rs]),
            "slowest_pair_rt_per_s": spread([min(x["per_pair"]) for x in rs]),
        })
    return out
