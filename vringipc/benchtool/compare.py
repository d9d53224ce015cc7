"""Running a benchmark session: pick the transports, build the cases, measure
(latency, throughput or both), then print the tables and write the JSON, the
.hgrm files and the plots.

``vringipc bench compare`` runs the same ping-pong, throughput and
oversubscription workloads over vringipc (Channel and Queue) and every other
registered transport that can run here; the others are skipped with a note.
It leads with a verdict: for each transport the user has, vringipc.Queue's and
vringipc.Channel's figures as ratios to it, *measured in the same run*, which
is the only kind of comparison a busy machine allows.
"""

from __future__ import annotations

import os
import re
import sys
import time

from vringipc.benchtool import machine as M
from vringipc.benchtool import plots, report
from vringipc.benchtool import transports as T
from vringipc.benchtool.latency import LatencyConfig, run_latency
from vringipc.benchtool.oversub import OversubConfig, run_oversub
from vringipc.benchtool.throughput import ThroughputConfig, run_throughput, supports

__all__ = ["parse_sizes", "parse_topologies", "parse_pins", "run", "PRESETS", "QUICK_SECONDS",
           "estimate_seconds"]

BASELINE = "vringipc.Channel"          # what the latency and throughput modes measure by default

# `compare --quick` is sized to take this long on a 2-CPU machine (measuring,
# forking, plots and JSON included): its run lengths are scaled to fit the
# cases at hand, so the same figure holds whichever peers are installed.
QUICK_SECONDS = 45

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GIB": 1 << 30}


def _size(tok: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", tok)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"bad size {tok!r} (examples: 8, 64, 4K, 1M, 16MiB)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_sizes(spec: str) -> list[int]:
    """"64,4K,1M" -> [64, 4096, 1048576]; "8..16M" -> 8, 64, 512, ... (x8
    steps, the last one included); "8..16M:x4" -> x4 steps."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if ".." in part:
            rng, _, step = part.partition(":")
            a, b = (_size(x) for x in rng.split("..", 1))
            f = int(step.lstrip("xX")) if step else 8
            if f < 2 or a < 1 or b < a:
                raise ValueError(f"bad size range {part!r}")
            v = a
            while v < b:
                out.append(v)
                v *= f
            out.append(b)
        else:
            out.append(_size(part))
    if not out:
        raise ValueError("no payload size given")
    for v in out:
        if v < 8:
            raise ValueError(f"payload {v} B: the smallest payload is 8 bytes")
    return sorted(set(out))


def parse_topologies(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", part)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ValueError(f"bad topology {part!r} (NxM, e.g. 1x1,2x2)")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def _csv(spec: str) -> list[str]:
    return [x.strip() for x in spec.split(",") if x.strip()]


# Defaults per mode: (normal, --quick).  Every key can be overridden on the
# command line.  "default" as a policy = each transport's own default wait.
PRESETS = {
    "latency": (
        dict(transports=[BASELINE], payloads="8..16M", policies="spin,block,adaptive", runs=5,
             duration=0.5, warmup=0.1, pins="auto"),
        dict(transports=[BASELINE], payloads="64,4K,256K", policies="spin,block,adaptive", runs=3,
             duration=0.1, warmup=0.05, pins="auto"),
    ),
    "throughput": (
        dict(transports=[BASELINE], payloads="64,4K,256K,4M", policies="block",
             apis="single,batch", runs=5, duration=0.5, warmup=0.1, pins="auto"),
        dict(transports=[BASELINE], payloads="64,64K", policies="block", apis="single,batch",
             runs=3, duration=0.15, warmup=0.05, pins="auto"),
    ),
    "oversub": (
        dict(transports=["vringipc.Queue", "vringipc.Channel", "mp.Queue", "mp.SimpleQueue"],
             pairs="1,2,4,8,16", policies="default", runs=3, duration=0.5, warmup=0.1),
        dict(transports=["vringipc.Queue", "vringipc.Channel", "mp.Queue", "mp.SimpleQueue"],
             pairs="1,4,16", policies="default", runs=3, duration=0.2, warmup=0.05),
    ),
    "compare": (
        dict(transports=["all"], payloads="64,4K,64K,1M", tp_payloads="64,4K,64K,1M",
             policies="default,spin", tp_policies="default", apis="single,batch", runs=3,
             duration=0.25, warmup=0.05, tp_duration=0.2, pins="none,split,same",
             pairs="1,2,4,8,16", os_transports=["all"], os_duration=0.4),
        dict(transports=["all"], payloads="64,64K", tp_payloads="64,64K,1M", policies="default",
             tp_policies="default", apis="single", runs=3, duration=0.1, warmup=0.03,
             tp_duration=0.12, pins="none,same", pairs="1,4,16",
             os_transports=["vringipc.Queue", "vringipc.Channel", "mp.Queue", "mp.SimpleQueue"],
             os_duration=0.25),
    ),
}

# Seconds a run costs besides its measured window and warm-up (forking,
# connecting, reaping; measured on the 2-vCPU development VM), and the fixed
# cost of a session (imports, JSON, plots).
_OVERHEAD = {"latency": 0.05, "throughput": 0.09, "oversub": 0.06, "per_process": 0.006,
             "session": 4.0}


def estimate_seconds(runs: int, n_lat: int, n_tp: int, os_procs: list, duration: float,
                     tp_duration: float, os_duration: float, warmup: float) -> float:
    """Wall time of a session: `runs` rounds of n_lat latency cases, n_tp
    throughput cases and one oversubscription case per entry of os_procs
    (its process count)."""
    per_round = (n_lat * (duration + warmup + _OVERHEAD["latency"])
                 + n_tp * (tp_duration + warmup + _OVERHEAD["throughput"])
                 + sum(os_duration + warmup + _OVERHEAD["oversub"] + _OVERHEAD["per_process"] * p
                       for p in os_procs))
    return runs * per_round + _OVERHEAD["session"]


def _fit_to(budget: float, runs: int, n_lat: int, n_tp: int, os_procs: list, d: dict) -> float:
    """The factor to scale the run lengths in d by so that the session takes
    about `budget` seconds (between 0.1 and 4)."""
    fixed = estimate_seconds(runs, n_lat, n_tp, os_procs, 0, 0, 0, 0)
    measured = estimate_seconds(runs, n_lat, n_tp, os_procs, d["duration"], d["tp_duration"],
                                d["os_duration"], d["warmup"]) - fixed
    if measured <= 0:
        return 1.0
    return min(4.0, max(0.1, (budget - fixed) / measured))


def parse_pins(spec: str) -> list[str]:
    out = _csv(spec)
    for p in out:
        if p not in ("auto", "split", "same", "none"):
            raise ValueError(f"bad pinning {p!r} (auto, split, same or none)")
    if not out:
        raise ValueError("no pinning given")
    return out


def _opt(args, name, preset):
    v = getattr(args, name, None)
    return preset[name] if v is None else v


def _resolve_transports(names, doc) -> list:
    """Registered transport classes to run, in registry order; unavailable
    ones are reported in doc["skipped"] and doc["transports"]."""
    want: list = []
    for n in names:
        for x in _csv(n):
            want.append(x)
    if "all" in want:
        classes = T.all_transports()
    else:
        classes = [T.get(n) for n in want]
    out = []
    for cls in classes:
        why = T.check_available(cls)
        doc["transports"].append({"name": cls.name, "policies": list(cls.policies),
                                  "mpmc": cls.mpmc, "batch": cls.batch, "note": cls.note,
                                  "available": why is None, "skipped": why})
        if why:
            doc["skipped"].append({"transport": cls.name, "case": None, "reason": why})
        else:
            out.append(cls)
    return out


def _policies_of(cls, policies: list, doc, what: str, fallback: bool = False) -> list[str]:
    """The policies of `policies` (with "default" resolved) that cls runs;
    the others are noted in doc["skipped"].  fallback: a transport with none
    of them still runs with its default."""
    out = []
    for p in policies:
        pol = T.resolve_policy(cls, p)
        if pol not in cls.policies:
            if not fallback:
                doc["skipped"].append({"transport": cls.name, "case": f"{what}, policy {pol}",
                                       "reason": f"supports {', '.join(cls.policies)} only"})
            continue
        if pol not in out:
            out.append(pol)
    if not out and fallback:
        out = [T.resolve_policy(cls, T.DEFAULT)]
    return out


def run(mode: str, args, argv: list, out=None) -> int:
    """Run `mode` ("latency", "throughput", "oversub" or "compare") with
    parsed CLI args."""
    out = out or sys.stdout
    for p in args.plugin or []:
        T.load_plugin(p)
    preset = PRESETS[mode][1 if args.quick else 0]
    t_start = time.monotonic()
    do_lat = mode in ("latency", "compare")
    do_tp = mode in ("throughput", "compare")
    do_os = mode in ("oversub", "compare") and not getattr(args, "no_oversub", False)

    payloads = parse_sizes(_opt(args, "payloads", preset)) if do_lat or do_tp else []
    policies = _csv(_opt(args, "policies", preset))
    for p in policies:
        if p not in T.POLICIES + (T.DEFAULT,):
            raise ValueError(f"unknown wait policy {p!r} (choose from "
                             f"{', '.join(T.POLICIES + (T.DEFAULT,))})")
    runs = _opt(args, "runs", preset)
    d = {"duration": _opt(args, "duration", preset), "warmup": _opt(args, "warmup", preset)}
    tp_payloads = parse_sizes(getattr(args, "tp_payloads", None) or preset.get("tp_payloads")
                              or _opt(args, "payloads", preset)) if do_tp else []
    if mode == "throughput":
        tp_payloads = payloads
    tp_policies = _csv(getattr(args, "tp_policies", None) or preset.get("tp_policies")
                       or ",".join(policies)) if mode == "compare" else policies
    apis = _csv(getattr(args, "apis", None) or preset.get("apis", "single")) if do_tp else []
    topologies = parse_topologies(getattr(args, "topology", None) or "1x1") if do_tp else []
    d["tp_duration"] = (getattr(args, "tp_duration", None) or preset.get("tp_duration")
                        or d["duration"])
    d["os_duration"] = (getattr(args, "os_duration", None) or getattr(args, "duration", None)
                        or preset.get("os_duration") or d["duration"])
    pairs = [int(x) for x in _csv(getattr(args, "pairs", None) or preset.get("pairs", "1"))]
    if any(x < 1 for x in pairs):
        raise ValueError("--pairs: at least 1 pair")
    cpus = [int(c) for c in _csv(args.cpus)] if args.cpus else None
    pins = parse_pins(args.pin or preset.get("pins", "auto"))
    if not cpus and len(os.sched_getaffinity(0)) < 2:
        # one CPU: nothing to split
        pins = list(dict.fromkeys("none" if p in ("split", "auto") else p for p in pins))
    # compare's throughput part runs as a program would, unpinned, unless --pin says
    tp_pin = pins[0] if (mode != "compare" or args.pin) else "none"

    doc = report.new_document(mode, argv, {}, M.machine_info())
    transports = _resolve_transports(args.transport or preset["transports"], doc)
    meter = M.CpuMeter()

    lat_cases = []
    if do_lat:
        for cls in transports:
            for pol in _policies_of(cls, policies, doc, "latency"):
                for pin in pins:
                    if pin == "same" and pol == "spin" and len(pins) > 1:
                        doc["skipped"].append({
                            "transport": cls.name, "case": "latency, policy spin, pinning same",
                            "reason": "a busy-polling waiter on its peer's only CPU measures the "
                                      "scheduler's time slice"})
                        continue
                    for size in payloads:
                        lat_cases.append((cls, size, pol, pin))
    tp_cases = []
    if do_tp:
        for cls in transports:
            # a polled-only transport (iceoryx2) still gets measured in compare
            pols = _policies_of(cls, tp_policies, doc, "throughput", fallback=mode == "compare")
            for pol in pols:
                for api in apis:
                    for n, m in topologies:
                        why = supports(cls, api, n, m)
                        if why:
                            doc["skipped"].append({"transport": cls.name,
                                                   "case": f"throughput, {api} API, {n}x{m}",
                                                   "reason": why})
                            continue
                        for size in tp_payloads:
                            tp_cases.append((cls, size, pol, api, n, m))
    os_cases = []
    if do_os:
        os_names = args.transport or preset.get("os_transports") or preset["transports"]
        os_classes = (transports if args.transport or "all" in os_names
                      else [c for c in transports if c.name in os_names])
        if mode == "oversub":
            os_policies = policies
        else:
            os_policies = [T.DEFAULT]
        for cls in os_classes:
            for pol in _policies_of(cls, os_policies, doc, "oversubscription"):
                if pol == "spin":
                    doc["skipped"].append({"transport": cls.name,
                                           "case": "oversubscription, policy spin",
                                           "reason": "busy-polling waiters on too few CPUs "
                                                     "measure the scheduler's time slice"})
                    continue
                for np_ in pairs:
                    os_cases.append((cls, np_, pol))
    # skipped notes are per (transport, case); keep one of each
    seen = set()
    doc["skipped"] = [s for s in doc["skipped"]
                      if (s["transport"], s["case"]) not in seen
                      and not seen.add((s["transport"], s["case"]))]

    os_procs = [2 * c[1] for c in os_cases]
    user_lengths = any(getattr(args, k, None) is not None
                       for k in ("duration", "warmup", "tp_duration", "os_duration"))
    budget = getattr(args, "time", None)
    if args.quick and mode == "compare" and not user_lengths:
        f = _fit_to(budget or QUICK_SECONDS, runs, len(lat_cases), len(tp_cases), os_procs, d)
        d = {k: v * f for k, v in d.items()}
    elif budget:
        raise ValueError("--time applies to compare --quick (without --duration / --warmup)")
    est = estimate_seconds(runs, len(lat_cases), len(tp_cases), os_procs, d["duration"],
                           d["tp_duration"], d["os_duration"], d["warmup"])

    doc["settings"] = {
        "quick": bool(args.quick), "runs": runs, "duration": round(d["duration"], 4),
        "warmup": round(d["warmup"], 4), "pin": pins if len(pins) > 1 else pins[0], "cpus": cpus,
        "policies": policies, "payloads": payloads, "rate": getattr(args, "rate", None),
        "max_samples": args.max_samples, "timeout": args.timeout,
        "estimate_s": round(est),
        "throughput": ({"payloads": tp_payloads, "policies": tp_policies, "apis": apis,
                        "batch": getattr(args, "batch", 64), "pin": tp_pin,
                        "topologies": [list(t) for t in topologies],
                        "duration": round(d["tp_duration"], 4)} if do_tp else None),
        "oversub": ({"pairs": pairs, "duration": round(d["os_duration"], 4),
                     "transports": sorted({c[0].name for c in os_cases})} if do_os else None),
    }
    total = runs * (len(lat_cases) + len(tp_cases) + len(os_cases))
    progress = report.Progress(total, enabled=not args.quiet)
    if not args.quiet:
        progress.note(f"vringipc bench {mode}{' --quick' if args.quick else ''}: "
                      f"{len(lat_cases)} latency, {len(tp_cases)} throughput and {len(os_cases)} "
                      f"oversubscription cases x {runs} runs: about {est:.0f} s")
    try:
        if lat_cases:
            lcfg = LatencyConfig(payloads=payloads, policies=policies, runs=runs,
                                 duration=d["duration"], warmup=d["warmup"],
                                 max_samples=args.max_samples, rate=getattr(args, "rate", None),
                                 pin=pins[0], cpus=cpus, timeout=args.timeout)
            doc["latency"] = run_latency(lat_cases, lcfg, progress, doc["errors"])
        if tp_cases:
            tcfg = ThroughputConfig(payloads=tp_payloads, policies=tp_policies, apis=apis,
                                    topologies=topologies, batch=getattr(args, "batch", 64),
                                    runs=runs, duration=d["tp_duration"], warmup=d["warmup"],
                                    pin=tp_pin, cpus=cpus, timeout=args.timeout)
            doc["throughput"] = run_throughput(tp_cases, tcfg, progress, doc["errors"])
        if os_cases:
            ocfg = OversubConfig(pairs=pairs, runs=runs, duration=d["os_duration"],
                                 warmup=d["warmup"], timeout=args.timeout)
            doc["oversub"] = run_oversub(os_cases, ocfg, progress, doc["errors"])
    finally:
        progress.done()
    for rec in doc["latency"] + doc["throughput"] + doc["oversub"]:
        rec["default_policy"] = rec["policy"] == T.resolve_policy(T.get(rec["transport"]),
                                                                  T.DEFAULT)
    doc["load"] = meter.read()
    doc["duration_s"] = round(time.monotonic() - t_start, 1)
    doc["summary"]["verdict"] = report.verdict(doc)
    doc["summary"]["disagreements"] = report.disagreements(doc)

    # --- files --------------------------------------------------------------------------
    out_dir = args.out
    json_path = args.json or (os.path.join(out_dir, f"{mode}.json") if out_dir else None)
    # .hgrm files cost ~0.2 s each (hdrhistogram walks every bucket in Python):
    # --quick writes them only when --hgrm-dir asks; the JSON has the histograms.
    if (out_dir or args.hgrm_dir) and not args.no_hgrm and (not args.quick or args.hgrm_dir):
        hdir = args.hgrm_dir or os.path.join(out_dir, "hgrm")
        if progress.enabled and doc["latency"]:
            progress.note(f"writing {len(doc['latency'])} .hgrm files to {hdir}/")
        for rec in doc["latency"]:
            rec["hgrm"] = report.write_hgrm(hdir, rec)
            doc["files"]["hgrm"].append(rec["hgrm"])
    plot_note = None
    if out_dir and not args.no_plots:
        if plots.available():
            doc["files"]["plots"] = plots.plot_all(doc, args.plot_dir or out_dir)
        else:
            plot_note = plots.install_hint()
    doc["duration_s"] = round(time.monotonic() - t_start, 1)
    if json_path:
        doc["files"]["json"] = json_path
        report.write_json(json_path, doc)

    # --- terminal -----------------------------------------------------------------------
    w = out.write
    m = doc["machine"]
    w(f"\nvringipc bench {mode}{' --quick' if args.quick else ''}: {m['cpu_model']}, "
      f"{m['cores_online']} CPUs, Linux {m['kernel']}, Python {m['python']}\n")
    load = doc["load"]
    w(f"Other processes kept {load['others_cpus']:.2f} of {load['ncpu']} CPUs busy during the run"
      + (" - a loaded machine: treat absolute figures with care, compare within the run.\n"
         if load["others_cpus"] > 0.25 else ".\n"))
    if mode == "compare":
        w("\n" + report.verdict_text(doc["summary"]["verdict"]) + "\n")
        w("\nDetails. Statistic everywhere (tables and plots): " + report.STATISTIC + ".\n")
    if doc["latency"]:
        w("\n" + report.latency_table(doc["latency"]) + "\n")
    if doc["throughput"]:
        w("\n" + report.throughput_table(doc["throughput"]) + "\n")
    if doc["oversub"]:
        w("\n" + report.oversub_table(doc["oversub"]) + "\n")
    dis = report.disagreements_text(doc["summary"]["disagreements"])
    if dis:
        w("\n" + dis + "\n")
    sk = report.skipped_text(doc)
    if sk:
        w("\nNot measured:\n" + sk + "\n")
    if json_path:
        w(f"\nJSON: {json_path}\n")
        if doc["files"]["hgrm"]:
            w(f".hgrm: {os.path.dirname(doc['files']['hgrm'][0])}/ "
              f"({len(doc['files']['hgrm'])} files)\n")
        if doc["files"]["plots"]:
            w(f"plots: {', '.join(doc['files']['plots'])}\n")
    if plot_note:
        w(plot_note + "\n")
    w(f"Took {doc['duration_s']:.0f} s (estimated {est:.0f} s).\n")
    return 1 if doc["errors"] and not (doc["latency"] or doc["throughput"] or doc["oversub"]) else 0


def describe_transports(out=None) -> int:
    out = out or sys.stdout
    out.write(f"{'transport':<18} {'available':<10} {'policies':<22} {'MPMC':<5} {'batch':<6} note\n")
    for cls in T.all_transports():
        why = T.check_available(cls)
        out.write(f"{cls.name:<18} {'yes' if why is None else 'no':<10} {','.join(cls.policies):<22} "
                  f"{'yes' if cls.mpmc else 'no':<5} {'yes' if cls.batch else 'no':<6} "
                  f"{cls.note if why is None else why}\n")
    return 0

