"""Throughput: N producer processes x M consumer processes.

Every producer sends payload-sized messages as fast as the transport takes
them, with the single-message API (``send``/``recv``) or the batch API
(``send_many``/``recv_many`` with ``batch`` messages per call, for transports
that have one).  The run has a warm-up phase (``warmup`` seconds, not
counted) and a measured window (``duration`` seconds) that every process
places on the same monotonic clock; the producers stop at the end of the
window and send end markers.  Figures:

* messages/s and bytes/s: messages the consumers received inside the window,
  each consumer over the window it actually observed, summed;
* CPU time per message: the process CPU clock (user + system, all threads,
  as getrusage(RUSAGE_SELF)) of every producer and consumer over its window,
  as CPUs used, divided by the message rate.  It shows what a transport costs
  besides its speed (a spinning consumer burns a whole CPU).

Topology: a transport with ``mpmc = True`` shares one link between all
processes (each producer ends with M end markers, each consumer stops after
N).  Other transports run N independent producer -> consumer links and need
N == M.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vringipc.benchtool import transports as T
from vringipc.benchtool.latency import fmt_size, handshake, spread
from vringipc.benchtool.procs import Group, cpu_plan_pc, resolve_pin

__all__ = ["ThroughputConfig", "throughput_once", "run_throughput", "supports"]


@dataclass
class ThroughputConfig:
    payloads: list = field(default_factory=lambda: [64])
    policies: list = field(default_factory=lambda: ["block"])
    apis: list = field(default_factory=lambda: ["single"])
    topologies: list = field(default_factory=lambda: [(1, 1)])
    batch: int = 64
    runs: int = 5
    duration: float = 1.0
    warmup: float = 0.2
    pin: str = "auto"                # split, same, none, or auto (per wait policy)
    cpus: list | None = None
    timeout: float = 120.0


def supports(tcls, api: str, nprod: int, ncons: int) -> str | None:
    """None if the transport can run this shape, else why not."""
    if api == "batch" and not tcls.batch:
        return "no batch API"
    if (nprod, ncons) != (1, 1) and not tcls.mpmc and nprod != ncons:
        return "single-producer single-consumer: N x M needs N == M (one link per pair)"
    return None


def _depth(payload: int) -> int:
    """Messages in flight the link is sized for (buffers of ~32 MiB)."""
    return max(4, min(256, (32 << 20) // payload))


def effective_batch(batch: int, payload: int) -> int:
    """Messages per batch call: at most half of what the link holds."""
    return max(1, min(batch, _depth(payload) // 2))


def _producer(ctl, link, payload, api, batch, nstop, window):
    ep = link.sender()
    t_go = handshake(ctl, ep)
    t_win, t_end = t_go + window[0], t_go + window[0] + window[1]
    msg = bytes(range(256)) * (payload // 256) + bytes(payload % 256)
    pc = time.perf_counter
    cpu = time.process_time
    n = 0
    n0 = c0 = w0 = None
    every = 1 if payload >= 65536 else 16
    if api == "single":
        send = ep.send
        while True:
            send(msg)
            n += 1
            if n % every == 0:
                now = pc()
                if w0 is None and now >= t_win:
                    n0, c0, w0 = n, cpu(), now
                if now >= t_end:
                    break
    else:
        send_many = ep.send_many
        msgs = [msg] * batch
        while True:
            send_many(msgs)
            n += batch
            now = pc()
            if w0 is None and now >= t_win:
                n0, c0, w0 = n, cpu(), now
            if now >= t_end:
                break
    c1, w1 = cpu(), pc()
    for _ in range(nstop):
        ep.send(T.SENTINEL)
    if w0 is None:                       # the whole run fit in the warm-up (very slow transport)
        n0, c0, w0 = 0, c1, w1
    ctl.send(("result", {"sent": n, "window_sent": n - n0, "cpu_s": c1 - c0, "window_s": w1 - w0}))
    ctl.recv()
    ep.close()


def _consumer(ctl, link, payload, api, batch, nstop, window):
    ep = link.receiver()
    t_go = handshake(ctl, ep)
    t_win, t_end = t_go + window[0], t_go + window[0] + window[1]
    pc = time.perf_counter
    cpu = time.process_time
    n = stops = 0
    back = None
    n0 = c0 = w0 = n1 = c1 = w1 = None
    every = 1 if payload >= 65536 else 16
    if api == "single":
        recv = ep.recv
        while True:
            m = recv()
            if len(m) == 1:
                stops += 1
                if stops == nstop:
                    break
                continue
            n += 1
            if n % every == 0:
                now = pc()
                if w0 is None:
                    if now >= t_win:
                        n0, c0, w0 = n, cpu(), now
                elif w1 is None and now >= t_end:
                    n1, c1, w1 = n, cpu(), now
    else:
        recv_many = ep.recv_many
        back = None
        while stops < nstop:
            ms = recv_many(batch)
            k = len(ms)
            for m in ms:
                if len(m) == 1:
                    stops += 1
                    k -= 1
            n += k
            if stops > nstop:
                # a shared queue: this batch took end markers meant for the
                # other consumers; put them back
                if back is None:
                    back = link.sender()
                for _ in range(stops - nstop):
                    back.send(T.SENTINEL)
                stops = nstop
            now = pc()
            if w0 is None:
                if now >= t_win:
                    n0, c0, w0 = n, cpu(), now
            elif w1 is None and now >= t_end:
                n1, c1, w1 = n, cpu(), now
    if w1 is None:                       # the producers stopped before we saw the window end
        n1, c1, w1 = n, cpu(), pc()
    if w0 is None:
        n0, c0, w0 = 0, c1, w1
    ctl.send(("result", {"received": n, "window_received": n1 - n0, "cpu_s": c1 - c0,
                         "window_s": w1 - w0}))
    ctl.recv()
    ep.close()
    if back is not None:
        back.close()


def throughput_once(tcls, payload, policy, api, nprod, ncons, cfg: ThroughputConfig) -> dict:
    """One run; returns msgs_per_s, bytes_per_s, cpu_ns_per_msg and the raw
    per-process figures."""
    why = supports(tcls, api, nprod, ncons)
    if why:
        raise ValueError(f"{tcls.name}: {why}")
    pplan, cplan = cpu_plan_pc(resolve_pin(cfg.pin, policy), nprod, ncons, cfg.cpus)
    depth = _depth(payload)
    batch = effective_batch(cfg.batch, payload)
    links = []
    try:
        if tcls.mpmc:
            links.append(tcls(payload, policy, depth))
            prod_links = [links[0]] * nprod
            cons_links = [links[0]] * ncons
            prod_stop, cons_stop = ncons, nprod
        else:
            for _ in range(nprod):
                links.append(tcls(payload, policy, depth))
            prod_links = cons_links = links
            prod_stop = cons_stop = 1
        window = (cfg.warmup, cfg.duration)
        with Group(cfg.timeout) as g:
            prods = [g.spawn(_producer, prod_links[i], payload, api, batch, prod_stop, window,
                             cpu=pplan[i], label=f"{tcls.name} producer {i}")
                     for i in range(nprod)]
            cons = [g.spawn(_consumer, cons_links[j], payload, api, batch, cons_stop, window,
                            cpu=cplan[j], label=f"{tcls.name} consumer {j}")
                    for j in range(ncons)]
            g.recv_all()
            g.send_all("connect")
            g.recv_all()
            g.send_all(time.perf_counter() + 0.01)      # "go", on the shared monotonic clock
            pres = [g.recv(c, cfg.timeout)[1] for c in prods]
            cres = [g.recv(c, cfg.timeout)[1] for c in cons]
            g.send_all("exit")
    finally:
        for link in links:
            link.close()
    sent = sum(p["sent"] for p in pres)
    received = sum(c["received"] for c in cres)
    if sent != received:
        raise AssertionError(f"{tcls.name}: producers sent {sent} messages, consumers got {received}")
    rate = sum(c["window_received"] / c["window_s"] for c in cres if c["window_s"] > 0)
    cpus_used = sum(p["cpu_s"] / p["window_s"] for p in pres + cres if p["window_s"] > 0)
    return {
        "msgs_per_s": rate,
        "bytes_per_s": rate * payload,
        "cpu_ns_per_msg": cpus_used / rate * 1e9 if rate > 0 else None,
        "cpus_used": cpus_used,
        "messages": received,
        "cpus": {"producers": pplan, "consumers": cplan},
        "producers_raw": pres,
        "consumers_raw": cres,
    }


def run_throughput(cases, cfg: ThroughputConfig, progress=None, errors=None) -> list[dict]:
    """cases: (transport class, payload, policy, api, nprod, ncons) tuples,
    measured interleaved in rounds; one record per case.  With `errors` (a
    list), a failing case is recorded there and dropped."""
    runs: dict = {c: [] for c in cases}
    failed: set = set()
    for r in range(cfg.runs):
        for c in cases:
            tcls, payload, policy, api, nprod, ncons = c
            what = f"{tcls.name} {policy} {api} {nprod}x{ncons} {fmt_size(payload)}"
            if progress:
                progress.step(f"throughput {what} run {r + 1}/{cfg.runs}")
            if c in failed:
                continue
            try:
                runs[c].append(throughput_once(tcls, payload, policy, api, nprod, ncons, cfg))
            except (Exception, TimeoutError) as e:
                if errors is None:
                    raise
                failed.add(c)
                errors.append({"case": f"throughput {tcls.name} {policy} {api} {nprod}x{ncons} "
                                       f"{payload} B", "error": f"{type(e).__name__}: {e}"})
                if progress:
                    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    progress.note(f"FAILED throughput {what}: {msg}")
    out = []
    for c in cases:
        if c in failed:
            continue
        tcls, payload, policy, api, nprod, ncons = c
        rs = runs[c]
        out.append({
            "transport": tcls.name,
            "policy": policy,
            "pinning": {"mode": resolve_pin(cfg.pin, policy), "requested": cfg.pin,
                        "cpus": rs[-1]["cpus"]},
            "api": api,
            "batch": effective_batch(cfg.batch, payload) if api == "batch" else 1,
            "producers": nprod,
            "consumers": ncons,
            "payload": payload,
            "runs": len(rs),
            "messages_per_run": [x["messages"] for x in rs],
            "msgs_per_s": spread([x["msgs_per_s"] for x in rs]),
            "bytes_per_s": spread([x["bytes_per_s"] for x in rs]),
            "cpu_ns_per_msg": spread([x["cpu_ns_per_msg"] for x in rs]),
            "cpus_used": spread([x["cpus_used"] for x in rs]),
        })
    return out
