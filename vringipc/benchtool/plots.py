"""PNG plots of the results with matplotlib (optional: ``pip install
'vringipc[bench]'`` or ``pip install matplotlib``).

* ``latency_percentiles_<payload>.png``: the percentile distribution of the
  round trip per transport and wait policy (HdrHistogram style: x = percentile
  on a 1/(1-p) scale, y = microseconds, log);
* ``latency_vs_payload.png``: p50 (line, with the min-max band over runs) and
  p99 (dotted) against payload size, log-log;
* ``throughput_vs_payload.png``: messages/s and bytes/s against payload size.
"""

from __future__ import annotations

import os

from vringipc.benchtool.latency import decode, fmt_size

__all__ = ["available", "install_hint", "plot_all"]

INSTALL_HINT = ("plots skipped: matplotlib is not installed. Install it with "
                "`pip install 'vringipc[bench]'` (or `pip install matplotlib`) and run again.")


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


_STYLE = {"block": "-", "spin": "--", "adaptive": ":"}


def _width(transport: str) -> float:
    return 2.4 if transport.startswith("vringipc.") else 1.3


def _colors(names):
    import matplotlib
    cmap = matplotlib.colormaps.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(sorted(set(names)))}


def _subtitle(doc) -> str:
    m = doc.get("machine", {})
    load = doc.get("load") or {}
    s = f"{m.get('cpu_model') or '?'}, {m.get('cores_online')} CPUs, Linux {m.get('kernel')}, "
    s += f"Python {m.get('python')}"
    if load.get("others_cpus") is not None:
        s += f"; other processes used {load['others_cpus']:.2f} CPUs"
    return s


def _pct_curve(h):
    xs, ys = [], []
    for it in h.get_percentile_iterator(5):
        p = it.percentile_level_iterated_to
        if p >= 100.0:
            break
        xs.append(1.0 / (1.0 - p / 100.0))
        ys.append(it.value_iterated_to / 1000.0)
    return xs, ys


def _size_axis(ax, sizes):
    sizes = sorted(set(sizes))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([fmt_size(s).replace(" ", "") for s in sizes], fontsize=8)
    ax.minorticks_off()


def plot_latency_percentiles(doc, out_dir) -> list[str]:
    plt = _plt()
    recs = doc.get("latency", [])
    colors = _colors(r["transport"] for r in recs)
    paths = []
    for payload in sorted({r["payload"] for r in recs}):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for r in [r for r in recs if r["payload"] == payload]:
            xs, ys = _pct_curve(decode(r["hdr"]))
            if not xs:
                continue
            ax.plot(xs, ys, _STYLE.get(r["policy"], "-"), color=colors[r["transport"]],
                    label=f"{r['transport']} [{r['policy']}]", linewidth=_width(r["transport"]))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = [1, 2, 10, 100, 1000, 10000, 100000]
        ax.set_xticks(ticks)
        ax.set_xticklabels(["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
        ax.set_xlabel("percentile")
        ax.set_ylabel("round trip, microseconds")
        ax.set_title(f"Round-trip latency distribution, {fmt_size(payload)} payload\n{_subtitle(doc)}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
        fig.tight_layout()
        p = os.path.join(out_dir, f"latency_percentiles_{payload}B.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def plot_latency_vs_payload(doc, out_dir) -> list[str]:
    plt = _plt()
    recs = [r for r in doc.get("latency", []) if r.get("mode", "pingpong") == "pingpong"
            or r.get("mode") == "fixed-rate"]
    if len({r["payload"] for r in recs}) < 2:
        return []
    colors = _colors(r["transport"] for r in recs)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    keys = sorted({(r["transport"], r["policy"]) for r in recs})
    for t, pol in keys:
        rs = sorted([r for r in recs if r["transport"] == t and r["policy"] == pol],
                    key=lambda r: r["payload"])
        xs = [r["payload"] for r in rs]
        p50 = [r["percentiles"]["p50"]["median"] for r in rs]
        lo = [r["percentiles"]["p50"]["min"] for r in rs]
        hi = [r["percentiles"]["p50"]["max"] for r in rs]
        p99 = [r["percentiles"]["p99"]["median"] for r in rs]
        c = colors[t]
        ax.plot(xs, p50, _STYLE.get(pol, "-"), marker="o", markersize=3, color=c,
                label=f"{t} [{pol}] p50", linewidth=_width(t))
        ax.fill_between(xs, lo, hi, color=c, alpha=0.12)
        ax.plot(xs, p99, ":", color=c, linewidth=0.8, alpha=0.7)
    _size_axis(ax, [r["payload"] for r in recs])
    ax.set_yscale("log")
    ax.set_xlabel("payload (each way)")
    ax.set_ylabel("round trip, microseconds")
    ax.set_title("Round trip against payload: p50 (band = min-max over runs), p99 dotted\n"
                 + _subtitle(doc), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    p = os.path.join(out_dir, "latency_vs_payload.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


def plot_throughput_vs_payload(doc, out_dir) -> list[str]:
    plt = _plt()
    recs = doc.get("throughput", [])
    if not recs:
        return []
    colors = _colors(r["transport"] for r in recs)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5.2))
    keys = sorted({(r["transport"], r["policy"], r["api"], r["producers"], r["consumers"])
                   for r in recs})
    for t, pol, api, n, m in keys:
        rs = sorted([r for r in recs if (r["transport"], r["policy"], r["api"], r["producers"],
                                         r["consumers"]) == (t, pol, api, n, m)],
                    key=lambda r: r["payload"])
        xs = [r["payload"] for r in rs]
        label = f"{t} [{pol}{', batch' if api == 'batch' else ''}{'' if (n, m) == (1, 1) else f', {n}x{m}'}]"
        style = "-." if api == "batch" else _STYLE.get(pol, "-")
        for ax, key in ((a1, "msgs_per_s"), (a2, "bytes_per_s")):
            ys = [r[key]["median"] for r in rs]
            ax.plot(xs, ys, style, marker="o", markersize=3, color=colors[t], label=label,
                    linewidth=_width(t))
            ax.fill_between(xs, [r[key]["min"] for r in rs], [r[key]["max"] for r in rs],
                            color=colors[t], alpha=0.1)
    for ax, yl in ((a1, "messages/s"), (a2, "bytes/s")):
        _size_axis(ax, [r["payload"] for r in recs])
        ax.set_yscale("log")
        ax.set_xlabel("payload")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    a1.legend(fontsize=7, loc="lower left", ncol=1)
    fig.suptitle("Throughput against payload (median, band = min-max over runs)\n"
                 + _subtitle(doc), fontsize=9)
    fig.tight_layout()
    p = os.path.join(out_dir, "throughput_vs_payload.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return [p]


def plot_all(doc, out_dir) -> list[str]:
    """Write every plot the document has data for; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    if doc.get("latency"):
        paths += plot_latency_percentiles(doc, out_dir)
        paths += plot_latency_vs_payload(doc, out_dir)
    paths += plot_throughput_vs_payload(doc, out_dir)
    return paths
