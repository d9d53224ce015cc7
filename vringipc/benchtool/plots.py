"""PNG plots of the results with matplotlib (optional: ``pip install
'vringipc[bench]'`` or ``pip install matplotlib``).

Every plot shows the statistic the tables show: for each case the median over
runs of each run's own figure, with error bars from the smallest to the
largest run; a case whose runs disagree by more than 2x is drawn hollow.
Titles name the machine, its CPUs and the pinning.

* ``latency_percentiles_<payload>B.png``: p50 ... p99.99 and max of the round
  trip, one panel per pinning (unpinned, split CPUs, same CPU), one line per
  transport and wait policy;
* ``latency_vs_payload.png`` (three payload sizes or more): p50 against
  payload, log-log, one panel per pinning;
* ``throughput_vs_payload.png``: messages/s against payload, log-log, one
  panel per API (single send/recv, batch);
* ``oversub.png``: round trips/s summed over P pairs against P.
"""

from __future__ import annotations

import os

from vringipc.benchtool.latency import fmt_size
from vringipc.benchtool.report import DISAGREE, disagreement

__all__ = ["available", "install_hint", "plot_all"]

INSTALL_HINT = ("plots skipped: matplotlib is not installed. Install it with "
                "`pip install 'vringipc[bench]'` (or `pip install matplotlib`) and run again.")

STAT_NOTE = (f"median over runs of each run's figure; bars = min-max over runs; hollow = runs "
             f">{DISAGREE:g}x apart")
_PIN_LABEL = {"none": "unpinned", "split": "split CPUs", "same": "same CPU"}
_PCTS = ("p50", "p90", "p99", "p99.9", "p99.99", "max")


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except Exception:
        return False
    return True


def install_hint() -> str:
    return INSTALL_HINT


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _width(transport: str) -> float:
    return 2.6 if transport.startswith("vringipc.") else 1.2


# one colour per transport in every plot: vringipc in black and red, the others
# in the remaining tab10 colours
_FIXED = {"vringipc.Channel": "black", "vringipc.Queue": "tab:red", "mp.Queue": "tab:blue",
          "mp.SimpleQueue": "tab:orange", "mp.Pipe": "tab:green", "os.pipe": "tab:purple",
          "unix.socket": "tab:brown", "faster-fifo": "tab:pink", "pyzmq": "tab:olive",
          "iceoryx2": "tab:cyan"}


def _colors(names):
    spare = ["tab:gray", "gold", "navy", "teal", "lime", "maroon"]
    out = {}
    for i, n in enumerate(sorted(set(names) - set(_FIXED))):
        out[n] = spare[i % len(spare)]
    return {**_FIXED, **out}


def _machine(doc) -> str:
    m = doc.get("machine", {})
    load = doc.get("load") or {}
    s = (f"{m.get('cpu_model') or '?'}, {m.get('cores_online')} CPUs, Linux {m.get('kernel')}, "
         f"Python {m.get('python')}")
    if load.get("others_cpus") is not None:
        s += f"; other processes used {load['others_cpus']:.2f} CPUs"
    return s


def _pin_title(recs) -> str:
    modes = sorted({r["pinning"]["mode"] for r in recs})
    cpus = sorted({str(r["pinning"]["cpus"]) for r in recs
                   if r["pinning"]["mode"] != "none" and r["pinning"].get("cpus")})
    s = ", ".join(_PIN_LABEL.get(x, x) for x in modes)
    return s + (f" (CPUs {'; '.join(cpus)})" if cpus else "")


def _errbar(ax, xs, med, lo, hi, flagged, color, label, lw, style="-"):
    """A line through the medians, min-max bars, hollow markers where the
    runs disagree."""
    ax.plot(xs, med, style, color=color, linewidth=lw, label=label)
    yerr = [[max(m - a, 0) for m, a in zip(med, lo)], [max(b - m, 0) for m, b in zip(med, hi)]]
    ax.errorbar(xs, med, yerr=yerr, fmt="none", ecolor=color, elinewidth=0.8, capsize=2,
                alpha=0.8)
    for x, y, f in zip(xs, med, flagged):
        ax.plot([x], [y], "o", markersize=4 if not f else 6, color=color,
                markerfacecolor=color if not f else "white")


def _size_axis(ax, sizes):
    sizes = sorted(set(sizes))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([fmt_size(s).replace(" ", "") for s in sizes], fontsize=8)
    ax.minorticks_off()


def _panels(plt, n, title, doc, width=6.0, height=4.8):
    fig, axes = plt.subplots(1, n, figsize=(width * n + 1, height), squeeze=False, sharey=True)
    fig.suptitle(f"{title}\n{_machine(doc)}\n{STAT_NOTE}", fontsize=9)
    return fig, list(axes[0])


def _save(fig, plt, out_dir, name) -> str:
    fig.tight_layout()
    p = os.path.join(out_dir, name)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def _by_pinning(recs) -> list:
    order = {"none": 0, "split": 1, "same": 2}
    modes = sorted({r["pinning"]["mode"] for r in recs}, key=lambda m: order.get(m, 9))
    return [(m, [r for r in recs if r["pinning"]["mode"] == m]) for m in modes]


def plot_latency_percentiles(doc, out_dir) -> list[str]:
    plt = _plt()
    recs = [r for r in doc.get("latency", []) if r.get("mode", "pingpong") == "pingpong"]
    colors = _colors(r["transport"] for r in recs)
    paths = []
    xs = list(range(len(_PCTS)))
    for payload in sorted({r["payload"] for r in recs}):
        groups = _by_pinning([r for r in recs if r["payload"] == payload])
        fig, axes = _panels(plt, len(groups),
                            f"Round trip, {fmt_size(payload)} each way: percentiles", doc)
        for ax, (mode, rs) in zip(axes, groups):
            for r in sorted(rs, key=lambda r: (r["transport"], r["policy"])):
                p = r["percentiles"]
                med = [p[k]["median"] for k in _PCTS]
                if any(v is None for v in med):
                    continue
                flagged = [bool(disagreement(p[k]["runs"])) for k in _PCTS]
                _errbar(ax, xs, med, [p[k]["min"] for k in _PCTS], [p[k]["max"] for k in _PCTS],
                        flagged, colors[r["transport"]], f"{r['transport']} [{r['policy']}]",
                        _width(r["transport"]))
            ax.set_yscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels(_PCTS)
            ax.set_xlabel("percentile of each run")
            ax.set_title(f"pinning: {_pin_title(rs)}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
        axes[0].set_ylabel("round trip, microseconds (log)")
        paths.append(_save(fig, plt, out_dir, f"latency_percentiles_{payload}B.png"))
    return paths


def plot_latency_vs_payload(doc, out_dir) -> list[str]:
    plt = _plt()
    recs = [r for r in doc.get("latency", []) if r.get("mode", "pingpong") == "pingpong"]
    if len({r["payload"] for r in recs}) < 3:
        return []            # two points per line say nothing a table does not
    colors = _colors(r["transport"] for r in recs)
    groups = _by_pinning(recs)
    fig, axes = _panels(plt, len(groups), "Round trip p50 against payload", doc)
    for ax, (mode, rs) in zip(axes, groups):
        for t, pol in sorted({(r["transport"], r["policy"]) for r in rs}):
            line = sorted((r for r in rs if (r["transport"], r["policy"]) == (t, pol)),
                          key=lambda r: r["payload"])
            p50 = [r["percentiles"]["p50"] for r in line]
            _errbar(ax, [r["payload"] for r in line], [x["median"] for x in p50],
                    [x["min"] for x in p50], [x["max"] for x in p50],
                    [bool(disagreement(x["runs"])) for x in p50], colors[t], f"{t} [{pol}]",
                    _width(t), "--" if pol == "spin" else "-")
        _size_axis(ax, [r["payload"] for r in rs])
        ax.set_yscale("log")
        ax.set_xlabel("payload each way (log)")
        ax.set_title(f"pinning: {_pin_title(rs)}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("round trip p50, microseconds (log)")
    return [_save(fig, plt, out_dir, "latency_vs_payload.png")]


def plot_throughput_vs_payload(doc, out_dir) -> list[str]:
    plt = _plt()
    recs = [r for r in doc.get("throughput", []) if r["producers"] == r["consumers"] == 1]
    if not recs:
        return []
    colors = _colors(r["transport"] for r in recs)
    apis = [a for a in ("single", "batch") if any(r["api"] == a for r in recs)]
    fig, axes = _panels(plt, len(apis), "Throughput against payload, 1 producer -> 1 consumer "
                        f"(pinning: {_pin_title(recs)})", doc)
    for ax, api in zip(axes, apis):
        rs = [r for r in recs if r["api"] == api]
        for t, pol in sorted({(r["transport"], r["policy"]) for r in rs}):
            line = sorted((r for r in rs if (r["transport"], r["policy"]) == (t, pol)),
                          key=lambda r: r["payload"])
            m = [r["msgs_per_s"] for r in line]
            _errbar(ax, [r["payload"] for r in line], [x["median"] for x in m],
                    [x["min"] for x in m], [x["max"] for x in m],
                    [bool(disagreement(x["runs"])) for x in m], colors[t], f"{t} [{pol}]",
                    _width(t))
        _size_axis(ax, [r["payload"] for r in rs])
        ax.set_yscale("log")
        ax.set_xlabel("payload (log)")
        ax.set_title("single send/recv" if api == "single" else "batch send_many/recv_many",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("messages/s (log)")
    return [_save(fig, plt, out_dir, "throughput_vs_payload.png")]


def plot_oversub(doc, out_dir) -> list[str]:
    plt = _plt()
    recs = doc.get("oversub", [])
    if not recs:
        return []
    colors = _colors(r["transport"] for r in recs)
    ncpu = doc.get("machine", {}).get("cores_online")
    fig, axes = _panels(plt, 1, f"Oversubscription: P ping-pong pairs (2P processes) at once on "
                        f"{ncpu} CPUs, unpinned", doc, width=8.0)
    ax = axes[0]
    for t, pol in sorted({(r["transport"], r["policy"]) for r in recs}):
        line = sorted((r for r in recs if (r["transport"], r["policy"]) == (t, pol)),
                      key=lambda r: r["pairs"])
        m = [r["rt_per_s"] for r in line]
        _errbar(ax, [r["pairs"] for r in line], [x["median"] for x in m], [x["min"] for x in m],
                [x["max"] for x in m], [bool(disagreement(x["runs"])) for x in m], colors[t],
                f"{t} [{pol}]", _width(t))
    pairs = sorted({r["pairs"] for r in recs})
    ax.set_xscale("log", base=2)
    ax.set_xticks(pairs)
    ax.set_xticklabels([str(p) for p in pairs])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("pairs P (log)")
    ax.set_ylabel("round trips/s, all pairs (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return [_save(fig, plt, out_dir, "oversub.png")]


def plot_all(doc, out_dir) -> list[str]:
    """Write every plot the document has data for; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    if doc.get("latency"):
        paths += plot_latency_percentiles(doc, out_dir)
        paths += plot_latency_vs_payload(doc, out_dir)
    paths += plot_throughput_vs_payload(doc, out_dir)
    paths += plot_oversub(doc, out_dir)
    return paths
