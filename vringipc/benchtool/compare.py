"""Running a benchmark session: pick the transports, build the cases, measure
(latency, throughput or both), then print the tables and write the JSON, the
.hgrm files and the plots.

``vringipc bench compare`` runs the same ping-pong and throughput workloads
over vringipc (Channel and Queue) and every other registered transport that
can run here; the others are skipped with a note.  Its summary gives each
peer's figure as a ratio to vringipc.Channel's *measured in the same run*,
which is the only kind of comparison a busy machine allows.
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
from vringipc.benchtool.throughput import ThroughputConfig, run_throughput, supports

__all__ = ["parse_sizes", "parse_topologies", "run", "PRESETS", "BASELINE"]

BASELINE = "vringipc.Channel"

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
# command line.
PRESETS = {
    "latency": (
        dict(transports=[BASELINE], payloads="8..16M", policies="spin,block,adaptive", runs=5,
             duration=0.5, warmup=0.1),
        dict(transports=[BASELINE], payloads="64,4K,256K", policies="spin,block,adaptive", runs=3,
             duration=0.1, warmup=0.05),
    ),
    "throughput": (
        dict(transports=[BASELINE], payloads="64,4K,256K,4M", policies="block",
             apis="single,batch", runs=5, duration=0.5, warmup=0.1),
        dict(transports=[BASELINE], payloads="64,64K", policies="block", apis="single,batch",
             runs=3, duration=0.15, warmup=0.05),
    ),
    "compare": (
        dict(transports=["all"], payloads="64,4K,64K,1M", tp_payloads="64,4K,1M",
             policies="block,spin", tp_policies="block", apis="single,batch", runs=3,
             duration=0.25, warmup=0.05, tp_duration=0.2),
        dict(transports=["all"], payloads="64,64K", tp_payloads="64,64K", policies="block,spin",
             tp_policies="block", apis="single,batch", runs=3, duration=0.1, warmup=0.03,
             tp_duration=0.12),
    ),
}


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


def run(mode: str, args, argv: list, out=None) -> int:
    """Run `mode` ("latency", "throughput" or "compare") with parsed CLI args."""
    out = out or sys.stdout
    for p in args.plugin or []:
        T.load_plugin(p)
    preset = PRESETS[mode][1 if args.quick else 0]
    t_start = time.monotonic()
    do_lat = mode in ("latency", "compare")
    do_tp = mode in ("throughput", "compare")

    payloads = parse_sizes(_opt(args, "payloads", preset))
    policies = _csv(_opt(args, "policies", preset))
    for p in policies:
        if p not in T.POLICIES:
            raise ValueError(f"unknown wait policy {p!r} (choose from {', '.join(T.POLICIES)})")
    runs = _opt(args, "runs", preset)
    duration = _opt(args, "duration", preset)
    warmup = _opt(args, "warmup", preset)
    tp_payloads = parse_sizes(getattr(args, "tp_payloads", None) or preset.get("tp_payloads")
                              or _opt(args, "payloads", preset)) if do_tp else []
    if mode == "throughput":
        tp_payloads = payloads
    tp_policies = _csv(getattr(args, "tp_policies", None) or preset.get("tp_policies")
                       or ",".join(policies)) if mode == "compare" else policies
    apis = _csv(getattr(args, "apis", None) or preset.get("apis", "single")) if do_tp else []
    topologies = parse_topologies(getattr(args, "topology", None) or "1x1") if do_tp else []
    tp_duration = (getattr(args, "tp_duration", None) or preset.get("tp_duration") or duration)
    cpus = [int(c) for c in _csv(args.cpus)] if args.cpus else None
    if args.pin in ("split", "auto") and not cpus and len(os.sched_getaffinity(0)) < 2:
        pin = "none"                     # one CPU: nothing to split
    else:
        pin = args.pin

    settings = {
        "quick": bool(args.quick), "runs": runs, "duration": duration, "warmup": warmup,
        "pin": pin, "cpus": cpus, "policies": policies, "payloads": payloads,
        "rate": getattr(args, "rate", None), "max_samples": args.max_samples,
        "timeout": args.timeout,
        "throughput": ({"payloads": tp_payloads, "policies": tp_policies, "apis": apis,
                        "batch": getattr(args, "batch", 64), "topologies": [list(t) for t in topologies],
                        "duration": tp_duration} if do_tp else None),
    }
    doc = report.new_document(mode, argv, settings, M.machine_info())
    transports = _resolve_transports(args.transport or preset["transports"], doc)
    meter = M.CpuMeter()

    lat_cases = []
    if do_lat:
        for cls in transports:
            for pol in policies:
                if pol not in cls.policies:
                    doc["skipped"].append({"transport": cls.name, "case": f"latency, policy {pol}",
                                           "reason": f"supports {', '.join(cls.policies)} only"})
                    continue
                for size in payloads:
                    lat_cases.append((cls, size, pol))
    tp_cases = []
    if do_tp:
        for cls in transports:
            pols = [p for p in tp_policies if p in cls.policies]
            if not pols and mode == "compare":
                # a polled-only transport (iceoryx2) still gets measured, marked "spin"
                pols = [cls.policies[0]]
            for p in tp_policies:
                if p not in cls.policies and mode != "compare":
                    doc["skipped"].append({"transport": cls.name,
                                           "case": f"throughput, policy {p}",
                                           "reason": f"supports {', '.join(cls.policies)} only"})
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
    # skipped notes are per (transport, case); keep one of each
    seen = set()
    doc["skipped"] = [s for s in doc["skipped"]
                      if (s["transport"], s["case"]) not in seen
                      and not seen.add((s["transport"], s["case"]))]

    total = runs * (len(lat_cases) + len(tp_cases))
    progress = report.Progress(total, enabled=not args.quiet)
    if not args.quiet:
        est = runs * (len(lat_cases) * (duration + warmup + 0.25)
                      + len(tp_cases) * (tp_duration + warmup + 0.3))
        progress.note(f"vringipc bench {mode}: {len(lat_cases)} latency and {len(tp_cases)} "
                      f"throughput cases x {runs} runs, about {est:.0f} s "
                      f"(pinning: {pin}{' ' + ','.join(map(str, cpus)) if cpus else ''})")
    try:
        if lat_cases:
            lcfg = LatencyConfig(payloads=payloads, policies=policies, runs=runs, duration=duration,
                                 warmup=warmup, max_samples=args.max_samples,
                                 rate=getattr(args, "rate", None), pin=pin, cpus=cpus,
                                 timeout=args.timeout)
            doc["latency"] = run_latency(lat_cases, lcfg, progress, doc["errors"])
        if tp_cases:
            tcfg = ThroughputConfig(payloads=tp_payloads, policies=tp_policies, apis=apis,
                                    topologies=topologies, batch=getattr(args, "batch", 64),
                                    runs=runs, duration=tp_duration, warmup=warmup, pin=pin,
                                    cpus=cpus, timeout=args.timeout)
            doc["throughput"] = run_throughput(tp_cases, tcfg, progress, doc["errors"])
    finally:
        progress.done()
    doc["load"] = meter.read()
    doc["duration_s"] = round(time.monotonic() - t_start, 1)
    doc["summary"] = report.summary(doc["latency"], doc["throughput"], BASELINE)

    # --- files --------------------------------------------------------------------------
    out_dir = args.out
    json_path = args.json or (os.path.join(out_dir, f"{mode}.json") if out_dir else None)
    # .hgrm files cost ~0.2 s each (hdrhistogram walks every bucket in Python):
    # --quick writes them only when --hgrm-dir asks; the JSON has the histograms.
    if (out_dir or args.hgrm_dir) and not args.no_hgrm and (not args.quick or args.hgrm_dir):
        hdir = args.hgrm_dir or os.path.join(out_dir, "hgrm")
        if progress.enabled:
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
    if doc["latency"]:
        w("\n" + report.latency_table(doc["latency"]) + "\n")
    if doc["throughput"]:
        w("\n" + report.throughput_table(doc["throughput"]) + "\n")
    if mode == "compare" or len({r["transport"] for r in doc["latency"] + doc["throughput"]}) > 1:
        s = report.summary_text(doc["summary"])
        if s:
            w("\n" + s + "\n")
    sk = report.skipped_text(doc)
    if sk:
        w("\nNot measured:\n" + sk + "\n")
    if json_path:
        w(f"\nJSON: {json_path}")
        if doc["files"]["hgrm"]:
            w(f"  .hgrm: {os.path.dirname(doc['files']['hgrm'][0])}/ ({len(doc['files']['hgrm'])} files)")
        if doc["files"]["plots"]:
            w(f"  plots: {', '.join(doc['files']['plots'])}")
        w("\n")
    if plot_note:
        w(plot_note + "\n")
    w(f"Took {doc['duration_s']:.0f} s.\n")
    return 1 if doc["errors"] and not (doc["latency"] or doc["throughput"]) else 0


def describe_transports(out=None) -> int:
    out = out or sys.stdout
    out.write(f"{'transport':<18} {'available':<10} {'policies':<22} {'MPMC':<5} {'batch':<6} note\n")
    for cls in T.all_transports():
        why = T.check_available(cls)
        out.write(f"{cls.name:<18} {'yes' if why is None else 'no':<10} {','.join(cls.policies):<22} "
                  f"{'yes' if cls.mpmc else 'no':<5} {'yes' if cls.batch else 'no':<6} "
                  f"{cls.note if why is None else why}\n")
    return 0

