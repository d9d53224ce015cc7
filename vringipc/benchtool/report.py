"""Output of the benchmark tool: terminal tables, a progress line on stderr,
the JSON document (schema ``vringipc-bench/2``, fields in docs/BENCH.md and
DOCUMENTED_FIELDS below), ``.hgrm`` percentile files, and the verdict against the user's transports."""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import time

from vringipc.benchtool.latency import PCT_KEYS, decode, fmt_size

__all__ = ["SCHEMA", "DOCUMENTED_FIELDS", "Progress", "latency_table", "throughput_table",
           "oversub_table", "verdict", "verdict_text", "ratio_words", "disagreement",
           "disagreements", "disagreements_text", "STATISTIC", "write_json", "write_hgrm", "validate", "new_document",
           "skipped_text"]

SCHEMA = "vringipc-bench/2"

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
    "latency[]/default_policy", "throughput[]/default_policy",
    "oversub", "oversub[]/transport", "oversub[]/policy", "oversub[]/default_policy",
    "oversub[]/pairs", "oversub[]/processes", "oversub[]/pinning/mode", "oversub[]/payload",
    "oversub[]/runs", "oversub[]/rt_per_s/median", "oversub[]/rt_per_s/min",
    "oversub[]/rt_per_s/max", "oversub[]/rt_per_s/runs", "oversub[]/slowest_pair_rt_per_s/median",
    "summary/statistic", "summary/verdict/subjects", "summary/verdict/columns",
    "summary/verdict/rows", "summary/verdict/skipped", "summary/disagreements",
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
            f"is the median over {r0['runs']} runs of that run's percentile; [min-max] of p50 over "
            f"the runs; max = median of the runs' maxima; ! = p50 or p99 runs {DISAGREE:g}x apart.")
    if r0.get("mode") == "fixed-rate":
        head += (f"\nFixed rate {r0['rate']:g} round trips/s, corrected for coordinated omission "
                 "(HdrHistogram record_corrected_value).")
    cols = (f"{'transport':<17} {'policy':<8} {'pinning':<9} {'payload':>8} "
            f"{'p50 [min-max]':>25} {'p90':>8} {'p99':>8} {'p99.9':>8} {'p99.99':>8} {'max':>9} "
            f"{'n/run':>7}")
    lines = [head, cols, "-" * len(cols)]
    for r in records:
        p = r["percentiles"]
        p50 = p["p50"]
        flag = "!" if disagreement(p50["runs"]) or disagreement(p["p99"]["runs"]) else " "
        rng = (f"{_f(p50['median'], 7)} [{_f(p50['min'], 1).strip()}-{_f(p50['max'], 1).strip()}]"
               + flag)
        npr = int(sum(r["samples_per_run"]) / max(len(r["samples_per_run"]), 1))
        lines.append(
            f"{r['transport']:<17} {r['policy']:<8} {_pin(r['pinning']):<9} "
            f"{fmt_size(r['payload']):>8} {rng:>25} {_f(p['p90']['median'])} "
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


def _rate_spread(m: dict) -> str:
    """The "median [min-max]" of a rate's spread over runs, "!" when they disagree."""
    return (f"{_rate(m['median'])} [{_rate(m['min'])}-{_rate(m['max'])}]"
            + ("!" if disagreement(m["runs"]) else " "))


def throughput_table(records: list) -> str:
    if not records:
        return ""
    r0 = records[0]
    head = (f"Throughput, median [min-max] over {r0['runs']} runs. CPU/msg = CPU time of all "
            f"producer and consumer processes per message. ! = runs {DISAGREE:g}x apart.")
    cols = (f"{'transport':<17} {'policy':<8} {'api':<9} {'NxM':>4} {'payload':>8} "
            f"{'msgs/s [min-max]':>25} {'bytes/s':>9} {'CPU/msg':>10} {'CPUs':>5}")
    lines = [head, cols, "-" * len(cols)]
    for r in records:
        m = r["msgs_per_s"]
        rng = _rate_spread(m)
        cpu = r["cpu_ns_per_msg"]["median"]
        cpu_s = "-" if cpu is None else (f"{cpu / 1000:.1f} us" if cpu >= 1000 else f"{cpu:.0f} ns")
        api = r["api"] if r["api"] == "single" else f"batch{r['batch']}"
        lines.append(
            f"{r['transport']:<17} {r['policy']:<8} {api:<9} "
            f"{str(r['producers']) + 'x' + str(r['consumers']):>4} {fmt_size(r['payload']):>8} "
            f"{rng:>25} {_rate(r['bytes_per_s']['median']) + 'B':>9} {cpu_s:>10} "
            f"{_f(r['cpus_used']['median'], 5)}")
    return "\n".join(lines)


# --- one statistic, and runs that disagree --------------------------------------------------

STATISTIC = ("median over runs of each run's figure (latency: each run's percentile, from its own "
             "histogram; throughput: each run's msgs/s)")
DISAGREE = 2.0          # runs of one case further apart than this factor are reported


def disagreement(values) -> float | None:
    """max/min of the runs' values if it exceeds DISAGREE (inf when some run
    is 0 and another is not), else None."""
    v = [float(x) for x in values if x is not None]
    if len(v) < 2 or max(v) <= 0:
        return None
    lo, hi = min(v), max(v)
    r = float("inf") if lo <= 0 else hi / lo
    return r if r > DISAGREE else None


def _lat_case(r) -> str:
    return (f"latency {r['transport']} {r['policy']} {fmt_size(r['payload'])} "
            f"pinning {r['pinning']['mode']}")


def _tp_case(r) -> str:
    api = r["api"] if r["api"] == "single" else f"batch{r['batch']}"
    return (f"throughput {r['transport']} {r['policy']} {api} {r['producers']}x{r['consumers']} "
            f"{fmt_size(r['payload'])}")


def _os_case(r) -> str:
    return f"oversubscribed {r['transport']} {r['policy']} {r['pairs']} pairs"


def disagreements(doc: dict) -> list[dict]:
    """Every figure whose runs disagree by more than DISAGREE, with each run."""
    out = []
    for r in doc.get("latency", []):
        # p50 everywhere; p99 where the verdict shows it (64 B)
        for k in ("p50", "p99") if r["payload"] == 64 else ("p50",):
            x = disagreement(r["percentiles"][k]["runs"])
            if x:
                out.append({"case": _lat_case(r), "figure": f"{k} us",
                            "runs": r["percentiles"][k]["runs"], "ratio": x})
    for r in doc.get("throughput", []):
        x = disagreement(r["msgs_per_s"]["runs"])
        if x:
            out.append({"case": _tp_case(r), "figure": "msgs/s", "runs": r["msgs_per_s"]["runs"],
                        "ratio": x})
    for r in doc.get("oversub", []):
        x = disagreement(r["rt_per_s"]["runs"])
        if x:
            out.append({"case": _os_case(r), "figure": "round trips/s",
                        "runs": r["rt_per_s"]["runs"], "ratio": x})
    return out


def disagreements_text(items: list) -> str:
    if not items:
        return ""
    lines = [f"Runs that disagree by more than {DISAGREE:g}x (marked ! above; the median hides "
             "this, so here is every run):"]
    for d in items:
        ratio = "a zero and a non-zero run" if d["ratio"] == float("inf") else f"{d['ratio']:.1f}x"
        runs = ", ".join(_num(v) for v in d["runs"])
        lines.append(f"  {d['case']}, {d['figure']}: {runs} ({ratio} apart)")
    return "\n".join(lines)


def _num(v) -> str:
    if v is None:
        return "-"
    if v >= 1000:
        return _rate(v)
    return f"{v:.3g}"


# --- the verdict: vringipc against the user's transports --------------------------------------

SUBJECTS = ("vringipc.Queue", "vringipc.Channel")

# key, label, kind ("rate": higher is better, "time": lower is better)
VERDICT_COLUMNS = [
    ("tp_64", "tput 64 B", "rate"),
    ("tp_65536", "tput 64 KiB", "rate"),
    ("tp_1048576", "tput 1 MiB", "rate"),
    ("rtt_p50", "RTT p50", "time"),
    ("rtt_p99", "RTT p99", "time"),
    ("same_cpu_p50", "same-CPU p50", "time"),
    ("oversub", "oversubscribed", "rate"),
]


def ratio_words(r: float | None) -> str:
    """A ratio where > 1 means vringipc is better, in words that cannot be
    misread: "12x faster", "1.3x faster", "1.0x: same", "0.5x: slower"."""
    if r is None:
        return "-"
    if r >= 1.05:
        return f"{r:.0f}x faster" if r >= 9.95 else f"{r:.1f}x faster"
    if r > 0.95:
        return "1.0x: same"
    return f"{r:.2g}x: slower"


def _pick(recs, default_first=True):
    recs = list(recs)
    if default_first:
        recs.sort(key=lambda r: not r.get("default_policy", False))
    return recs[0] if recs else None


def _figure(doc: dict, transport: str, key: str, pairs: int | None):
    """(median, runs) of one verdict figure of one transport, or None."""
    if key.startswith("tp_"):
        size = int(key[3:])
        r = _pick(x for x in doc.get("throughput", []) if x["transport"] == transport
                  and x["payload"] == size and x["api"] == "single"
                  and x["producers"] == x["consumers"] == 1)
        return (r["msgs_per_s"]["median"], r["msgs_per_s"]["runs"]) if r else None
    if key in ("rtt_p50", "rtt_p99", "same_cpu_p50"):
        pct = "p99" if key == "rtt_p99" else "p50"
        lat = [x for x in doc.get("latency", []) if x["transport"] == transport
               and x["payload"] == 64 and x.get("mode", "pingpong") == "pingpong"]
        if key == "same_cpu_p50":
            lat = [x for x in lat if x["pinning"]["mode"] == "same"]
        else:                     # unpinned first, as a program runs by default
            lat = sorted((x for x in lat if x["pinning"]["mode"] != "same"),
                         key=lambda x: x["pinning"]["mode"] != "none")
            lat = [x for x in lat if x["pinning"]["mode"] == lat[0]["pinning"]["mode"]] if lat else []
        r = _pick(lat)
        return (r["percentiles"][pct]["median"], r["percentiles"][pct]["runs"]) if r else None
    if key == "oversub":
        r = _pick(x for x in doc.get("oversub", []) if x["transport"] == transport
                  and x["pairs"] == pairs)
        return (r["rt_per_s"]["median"], r["rt_per_s"]["runs"]) if r else None
    raise KeyError(key)


def verdict(doc: dict, subjects=SUBJECTS) -> dict:
    """For every measured transport other than the subjects (the baselines):
    its own figures, and each subject's ratio to them (> 1: the subject is
    better; throughput and round trips/s: subject / baseline; latency:
    baseline / subject).  Columns without any figure are left out."""
    pairs = max((x["pairs"] for x in doc.get("oversub", [])), default=None)
    measured = []
    for r in doc.get("latency", []) + doc.get("throughput", []) + doc.get("oversub", []):
        if r["transport"] not in measured:
            measured.append(r["transport"])
    order = [t["name"] for t in doc.get("transports", [])] or measured
    baselines = [t for t in order if t in measured and t not in subjects]
    subjects = [s for s in subjects if s in measured]
    cols = []
    for key, label, kind in VERDICT_COLUMNS:
        if key == "oversub" and pairs:
            label = f"{pairs} pairs rt/s"
        if any(_figure(doc, t, key, pairs) for t in measured):
            cols.append({"key": key, "label": label, "kind": kind})
    rows = []
    for b in baselines:
        row = {"baseline": b, "values": {}, "flags": {}, "ratios": {s: {} for s in subjects}}
        for c in cols:
            fb = _figure(doc, b, c["key"], pairs)
            row["values"][c["key"]] = fb[0] if fb else None
            flagged = bool(fb and disagreement(fb[1]))
            for s in subjects:
                fs = _figure(doc, s, c["key"], pairs)
                ratio = None
                if fb and fs and fb[0] and fs[0]:
                    ratio = fs[0] / fb[0] if c["kind"] == "rate" else fb[0] / fs[0]
                row["ratios"][s][c["key"]] = ratio
                row["flags"][f"{s}/{c['key']}"] = flagged or bool(fs and disagreement(fs[1]))
        rows.append(row)
    skipped = [{"transport": x["transport"], "reason": x["reason"]}
               for x in doc.get("skipped", []) if x.get("case") is None]
    return {"subjects": subjects, "columns": cols, "oversub_pairs": pairs, "rows": rows,
            "skipped": skipped}


def _value_text(v, kind) -> str:
    if v is None:
        return "-"
    if kind == "rate":
        return _rate(v) + "/s"
    return f"{v:.3g} us" if v < 1000 else f"{v / 1000:.3g} ms"


def verdict_text(v: dict, doc: dict | None = None) -> str:
    if not v["rows"] or not v["subjects"]:
        why = ("no baseline transport was measured" if not v["rows"]
               else "neither vringipc.Queue nor vringipc.Channel was measured")
        return f"Verdict: none ({why})."
    cols = v["columns"]
    w0, w = 20, 16
    lines = ["Verdict: vringipc against the transports you have, all measured in this run.",
             "Each cell says how vringipc compares with the baseline on that line: "
             "\"12x faster\" = vringipc is 12 times",
             "better (throughput: msgs/s ratio; round trip: the baseline's time / vringipc's); "
             "\"0.5x: slower\" = half as good.",
             "Figures: median over runs. ! = that figure's runs disagree by more than "
             f"{DISAGREE:g}x (listed below)."]
    legend = {"tp_64": "throughput: 1 producer -> 1 consumer, single send/recv, each transport's "
                       "default wait",
              "rtt_p50": "RTT: ping-pong round trip of 64 B, each transport's default wait "
                         "(vringipc: its own default; others: blocking get/recv), unpinned",
              "same_cpu_p50": "same-CPU: the same round trip with both processes pinned to one "
                              "CPU",
              "oversub": f"{v['oversub_pairs']} pairs: round trips/s summed over "
                         f"{v['oversub_pairs']} ping-pong pairs ({2 * (v['oversub_pairs'] or 0)} "
                         "processes) running at once, unpinned"}
    for c in cols:
        if c["key"] in legend:
            lines.append("  " + legend[c["key"]])
    head = f"{'baseline':<{w0}}" + "".join(f"{c['label']:>{w}}" for c in cols)
    lines += ["", head, "-" * len(head)]
    for row in v["rows"]:
        lines.append(f"{row['baseline']:<{w0}}"
                     + "".join(f"{_value_text(row['values'][c['key']], c['kind']):>{w}}"
                               for c in cols))
        for s in v["subjects"]:
            cells = []
            for c in cols:
                t = ratio_words(row["ratios"][s][c["key"]])
                if row["flags"].get(f"{s}/{c['key']}") and t != "-":
                    t += "!"
                cells.append(f"{t:>{w}}")
            lines.append(f"  {s:<{w0 - 2}}" + "".join(cells))
    for sk in v.get("skipped", []):
        lines.append(f"Not installed or not usable here: {sk['transport']} ({sk['reason']})")
    return "\n".join(lines)


def oversub_table(records: list) -> str:
    if not records:
        return ""
    r0 = records[0]
    head = (f"Oversubscription: P ping-pong pairs (2P processes, unpinned, {fmt_size(r0['payload'])} "
            f"each way) at once; round trips/s summed over the pairs, median [min-max] over "
            f"{r0['runs']} runs; slowest pair = its median rate.")
    cols = (f"{'transport':<17} {'policy':<8} {'pairs':>5} {'round trips/s [min-max]':>28} "
            f"{'slowest pair':>12}")
    lines = [head, cols, "-" * len(cols)]
    for r in records:
        rng = _rate_spread(r["rt_per_s"])
        lines.append(f"{r['transport']:<17} {r['policy']:<8} {r['pairs']:>5} {rng:>28} "
                     f"{_rate(r['slowest_pair_rt_per_s']['median']):>12}")
    return "\n".join(lines)


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
        "oversub": [],
        "summary": {"statistic": STATISTIC, "verdict": None, "disagreements": []},
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
