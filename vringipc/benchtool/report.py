"""Output of the benchmark tool: terminal tables, a progress line on stderr,
the JSON document (schema ``vringipc-bench/1``, fields in docs/BENCH.md and
DOCUMENTED_FIELDS below), ``.hgrm`` percentile files and ratio summaries."""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time

from vringipc.benchtool.latency import PCT_KEYS, decode, fmt_size

__all__ = ["SCHEMA", "DOCUMENTED_FIELDS", "Progress", "latency_table", "throughput_table",
           "summary", "summary_text", "write_json", "write_hgrm", "validate", "new_document",
           "skipped_text"]

SCHEMA = "vringipc-bench/1"

# Every field the JSON document is documented to have (docs/BENCH.md lists the
# same paths): "a/b" is key b of object a, "a[]" every element of list a.
# Fields of latency[] / throughput[] are required when the list is non-empty.
DOCUMENTED_FIELDS = [
    "schema", "mode", "command", "created", "duration_s",
    "machine/cpu_model", "machine/cores_online", "machine/affinity", "machine/kernel",
    "machine/python", "machine/packages", "machine/build", "machine/loadavg_start",
    "settings/runs", "settings/duration", "settings/warmup", "settings/pin",
    "settings/policies", "settings/payloads",
    "load/others_cpus", "load/ours_cpus", "load/wall_s",
    "transports[]/name", "transports[]/policies", "transports[]/mpmc", "transports[]/batch",
    "transports[]/available", "transports[]/skipped",
    "skipped", "errors",
    "latency[]/transport", "latency[]/policy", "latency[]/pinning/mode",
    "latency[]/pinning/requested", "latency[]/pinning/cpus",
    "latency[]/payload", "latency[]/mode", "latency[]/rate", "latency[]/unit", "latency[]/runs",
    "latency[]/samples", "latency[]/samples_per_run",
    "latency[]/percentiles/p50/median", "latency[]/percentiles/p50/min",
    "latency[]/percentiles/p50/max", "latency[]/percentiles/p50/runs",
    "latency[]/percentiles/p90/median", "latency[]/percentiles/p99/median",
    "latency[]/percentiles/p99.9/median", "latency[]/percentiles/p99.99/median",
    "latency[]/percentiles/max/median", "latency[]/percentiles/mean/median",
    "latency[]/combined/p50", "latency[]/combined/p99.99", "latency[]/combined/max",
    "latency[]/combined/n", "latency[]/hdr", "latency[]/hgrm",
    "throughput[]/transport", "throughput[]/policy", "throughput[]/pinning/mode",
    "throughput[]/pinning/requested", "throughput[]/pinning/cpus", "throughput[]/api", "throughput[]/batch",
    "throughput[]/producers", "throughput[]/consumers", "throughput[]/payload",
    "throughput[]/runs", "throughput[]/messages_per_run",
    "throughput[]/msgs_per_s/median", "throughput[]/msgs_per_s/min",
    "throughput[]/msgs_per_s/max", "throughput[]/msgs_per_s/runs",
    "throughput[]/bytes_per_s/median", "throughput[]/cpu_ns_per_msg/median",
    "throughput[]/cpus_used/median",
    "summary/baseline", "summary/latency", "summary/throughput",
    "files/json", "files/hgrm", "files/plots",
]


# --- progress ----------------------------------------------------------------------

class Progress:
    """A one-line progress indicator on stderr: "[ 5/40] 12% 0:06 elapsed,
    ~0:45 left  <what>".  Redrawn in place on a terminal; otherwise a line at
    most every `every` seconds.  Silent when disabled."""

    def __init__(self, total: int, enabled: bool = True, stream=None, every: float = 5.0):
        self.total = max(total, 1)
        self.n = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every
        self.t0 = time.monotonic()
        self.last = -1e9
        self.width = 0

    @staticmethod
    def _clock(s: float) -> str:
        s = int(s)
        return f"{s // 60}:{s % 60:02d}"

    def step(self, what: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        now = time.monotonic()
        el = now - self.t0
        left = el / (self.n - 1) * (self.total - self.n + 1) if self.n > 1 else None
        pct = 100 * (self.n - 1) // self.total
        line = (f"[{self.n:>{len(str(self.total))}}/{self.total}] {pct:3d}% {self._clock(el)} elapsed"
                + (f", ~{self._clock(left)} left" if left is not None else "") + f"  {what}")
        if self.tty:
            pad = max(0, self.width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.width = len(line)
            self.stream.flush()
        elif now - self.last >= self.every or self.n == 1:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = now

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


# --- tables --------------------------------------------------------------------------------

def _f(x, width=8, prec=2) -> str:
    if x is None:
        return "-".rjust(width)
    if x >= 1e5:
        return f"{x:{width}.0f}"
    if x >= 100:
        return f"{x:{width}.1f}"
    return f"{x:{width}.{prec}f}"


def _pin(p: dict) -> str:
    cpus = p.get("cpus")
    if isinstance(cpus, dict):
        cpus = cpus.get("producers", []) + cpus.get("consumers", [])
    if p.get("mode") == "none" or not cpus or all(c is None for c in cpus):
        return "none"
    return f"{p.get('mode')} {','.join(str(c) for c in cpus)}"


def latency_table(records: list) -> str:
    if not records:
        return ""
    r0 = records[0]
    head = ("Round-trip latency (ping-pong between two processes), microseconds. Each percentile "
            f"is the median over {r0['runs']} runs; [min-max] of p50 over the runs; "
            "max = median of the runs' maxima.")
    if r0.get("mode") == "fixed-rate":
        head += (f"\nFixed rate {r0['rate']:g} round trips/s, corrected for coordinated omission "
                 "(HdrHistogram record_corrected_value).")
    cols = (f"{'transport':<17} {'policy':<8} {'pinning':<9} {'payload':>8} "
            f"{'p50 [min-max]':>24} {'p90':>8} {'p99':>8} {'p99.9':>8} {'p99.99':>8} {'max':>9} "
            f"{'n/run':>7}")
    lines = [head, cols, "-" * len(cols)]
    for r in records:
        p = r["percentiles"]
        p50 = p["p50"]
        rng = f"{_f(p50['median'], 7)} [{_f(p50['min'], 1).strip()}-{_f(p50['max'], 1).strip()}]"
        npr = int(sum(r["samples_per_run"]) / max(len(r["samples_per_run"]), 1))
        lines.append(
            f"{r['transport']:<17} {r['policy']:<8} {_pin(r['pinning']):<9} "
            f"{fmt_size(r['payload']):>8} {rng:>24} {_f(p['p90']['median'])} "
            f"{_f(p['p99']['median'])} {_f(p['p99.9']['median'])} {_f(p['p99.99']['median'])} "
            f"{_f(p['max']['median'], 9)} {npr:>7}")
    return "\n".join(lines)


def _rate(x) -> str:
    if x is None:
        return "-"
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= k:
            return f"{x / k:.2f}{unit}"
    return f"{x:.1f}"


def throughput_table(records: list) -> str:
    if not records:
        return ""
    r0 = records[0]
    head = (f"Throughput, median [min-max] over {r0['runs']} runs. CPU/msg = CPU time of all "
            "producer and consumer processes per message.")
    cols = (f"{'transport':<17} {'policy':<8} {'api':<9} {'NxM':>4} {'payload':>8} "
            f"{'msgs/s [min-max]':>24} {'bytes/s':>9} {'CPU/msg':>10} {'CPUs':>5}")
    lines = [head, cols, "-" * len(cols)]
    for r in records:
        m = r["msgs_per_s"]
        rng = f"{_rate(m['median'])} [{_rate(m['min'])}-{_rate(m['max'])}]"
        cpu = r["cpu_ns_per_msg"]["median"]
        cpu_s = "-" if cpu is None else (f"{cpu / 1000:.1f} us" if cpu >= 1000 else f"{cpu:.0f} ns")
        api = r["api"] if r["api"] == "single" else f"batch{r['batch']}"
        lines.append(
            f"{r['transport']:<17} {r['policy']:<8} {api:<9} "
            f"{str(r['producers']) + 'x' + str(r['consumers']):>4} {fmt_size(r['payload']):>8} "
            f"{rng:>24} {_rate(r['bytes_per_s']['median']) + 'B':>9} {cpu_s:>10} "
            f"{_f(r['cpus_used']['median'], 5)}")
    return "\n".join(lines)


# --- ratios against the peers ----------------------------------------------------------------

def summary(latency: list, throughput: list, baseline: str = "vringipc.Channel") -> dict:
    """For each (payload, policy): every transport's p50 RTT and its ratio to
    the baseline's, measured in the same run; for each throughput shape the
    same with msgs/s.  ratio > 1: the baseline is that many times better."""
    lat = []
    groups: dict = {}
    for r in latency:
        groups.setdefault((r["payload"], r["policy"], r.get("mode")), []).append(r)
    for (payload, policy, mode), rs in groups.items():
        base = next((r for r in rs if r["transport"] == baseline), None)
        b = base["percentiles"]["p50"]["median"] if base else None
        lat.append({"payload": payload, "policy": policy, "mode": mode,
                    "baseline_p50_us": b,
                    "p50_us": {r["transport"]: r["percentiles"]["p50"]["median"] for r in rs},
                    "p99_us": {r["transport"]: r["percentiles"]["p99"]["median"] for r in rs},
                    "ratio_p50": {r["transport"]: (r["percentiles"]["p50"]["median"] / b if b else None)
                                  for r in rs if r["transport"] != baseline}})
    tp = []
    groups = {}
    for r in throughput:
        # a transport measured without the group's policy (iceoryx2: spin only)
        # is compared within its shape and API all the same, marked by its policy
        groups.setdefault((r["payload"], r["api"], r["producers"], r["consumers"]), []).append(r)
    for (payload, api, n, m), rs in groups.items():
        base = [r for r in rs if r["transport"] == baseline]
        for bpol in sorted({r["policy"] for r in base}) or [None]:
            b = next((r["msgs_per_s"]["median"] for r in base if r["policy"] == bpol), None)
            figs = {}
            for r in rs:
                if r["transport"] == baseline and r["policy"] != bpol:
                    continue
                if r["policy"] != bpol and any(x["transport"] == r["transport"]
                                               and x["policy"] == bpol for x in rs):
                    continue
                key = r["transport"] + ("" if r["policy"] == bpol else f" [{r['policy']}]")
                figs[key] = r["msgs_per_s"]["median"]
            tp.append({"payload": payload, "api": api, "policy": bpol, "producers": n,
                       "consumers": m, "baseline_msgs_per_s": b, "msgs_per_s": figs,
                       "ratio": {k: (b / v if b and v else None) for k, v in figs.items()
                                 if k != baseline}})
    return {"baseline": baseline, "latency": lat, "throughput": tp}


def summary_text(s: dict) -> str:
    base = s["baseline"]
    out = []
    if s["latency"]:
        out.append(f"Round trip p50 against {base} (peer p50 / {base} p50, same run; "
                   ">1 = {base} faster):".replace("{base}", base))
        for g in s["latency"]:
            if g["baseline_p50_us"] is None:
                continue
            parts = [f"{t} {r:.1f}x" for t, r in sorted(g["ratio_p50"].items(),
                                                          key=lambda kv: kv[1] or 0) if r]
            out.append(f"  {fmt_size(g['payload']):>8} {g['policy']:<8} {base} "
                       f"{g['baseline_p50_us']:.2f} us: " + ", ".join(parts))
    if s["throughput"]:
        out.append(f"Throughput against {base} ({base} msgs/s / peer msgs/s, same run; "
                   f">1 = {base} faster):")
        for g in s["throughput"]:
            if not g["baseline_msgs_per_s"]:
                continue
            parts = [f"{t} {r:.1f}x" for t, r in sorted(g["ratio"].items(),
                                                          key=lambda kv: kv[1] or 0) if r]
            out.append(f"  {fmt_size(g['payload']):>8} {g['policy']:<8} {g['api']:<6} "
                       f"{g['producers']}x{g['consumers']} {base} "
                       f"{_rate(g['baseline_msgs_per_s'])} msgs/s: " + ", ".join(parts))
    return "\n".join(out)


def skipped_text(doc: dict) -> str:
    lines = []
    for s in doc.get("skipped", []):
        what = s["transport"] + (f" ({s['case']})" if s.get("case") else "")
        lines.append(f"  skipped {what}: {s['reason']}")
    for e in doc.get("errors", []):
        lines.append(f"  FAILED {e['case']}: {e['error'].strip().splitlines()[-1]}")
    return "\n".join(lines)


# --- files ------------------------------------------------------------------------------------

def new_document(mode: str, argv: list, settings: dict, machine: dict) -> dict:
    return {
        "schema": SCHEMA,
        "mode": mode,
        "command": "vringipc " + " ".join(argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": None,
        "machine": machine,
        "settings": settings,
        "load": None,
        "transports": [],
        "skipped": [],
        "errors": [],
        "latency": [],
        "throughput": [],
        "summary": {"baseline": None, "latency": [], "throughput": []},
        "files": {"json": None, "hgrm": [], "plots": []},
    }


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", s).strip("_")


def write_hgrm(out_dir: str, rec: dict) -> str:
    """The percentile distribution of a latency record (microseconds), as
    HdrHistogram's output_percentile_distribution writes it."""
    os.makedirs(out_dir, exist_ok=True)
    name = _slug(f"latency_{rec['transport']}_{rec['policy']}_{rec['payload']}B"
                 + (f"_rate{rec['rate']:g}" if rec.get("rate") else "")) + ".hgrm"
    path = os.path.join(out_dir, name)
    h = decode(rec["hdr"])
    with open(path, "wb") as f:
        h.output_percentile_distribution(f, 1000.0)
    return path


def write_json(path: str, doc: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def _lookup(obj, parts: list, path: str, missing: list) -> None:
    if not parts:
        return
    p = parts[0]
    if p.endswith("[]"):
        key = p[:-2]
        if not isinstance(obj, dict) or key not in obj or not isinstance(obj[key], list):
            missing.append(path)
            return
        for el in obj[key]:
            _lookup(el, parts[1:], path, missing)
        return
    if not isinstance(obj, dict) or p not in obj:
        missing.append(path)
        return
    _lookup(obj[p], parts[1:], path, missing)


def validate(doc: dict, fields=None) -> list:
    """The documented fields missing from doc (empty list: valid)."""
    missing: list = []
    if doc.get("schema") != SCHEMA:
        missing.append(f"schema (got {doc.get('schema')!r}, want {SCHEMA!r})")
    for path in fields or DOCUMENTED_FIELDS:
        _lookup(doc, path.split("/"), path, missing)
    return sorted(set(missing))


def percentile_keys() -> tuple:
    return PCT_KEYS
