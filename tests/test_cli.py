"""The `vringipc` command: bench modes end to end in quick mode with tiny
counts, the JSON against the documented fields, plots, optional peers
skipped cleanly, user adapters, and ls / inspect / gc on real segments.

Nothing here asserts on a timing: the figures only have to exist and be
consistent (counts, fields, files)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout

import pytest

from vringipc import cli
from vringipc.benchtool import compare as C
from vringipc.benchtool import latency as L
from vringipc.benchtool import report as R
from vringipc.benchtool import segments as S
from vringipc.benchtool import throughput as TP
from vringipc.benchtool import transports as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs", "BENCH.md")

# tiny counts: each bench test runs a few fresh process pairs for ~0.02 s each
TINY = ["--runs", "1", "--duration", "0.02", "--warmup", "0.005", "-q"]
TINY_TP = ["--tp-duration", "0.03"]


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


# The bench modes need the "bench" extra (hdrhistogram); the segment tools do not.
needs_hdrh = pytest.mark.skipif(not _importable("hdrh"),
                                reason="hdrhistogram not installed: pip install 'vringipc[bench]'")


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def documented_fields() -> list[str]:
    with open(DOCS) as f:
        text = f.read()
    section = text.split("### JSON fields", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, re.M)


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# --- the documentation and the validator -----------------------------------------------

def test_docs_list_exactly_the_documented_fields():
    fields = documented_fields()
    assert len(fields) > 50
    assert sorted(fields) == sorted(R.DOCUMENTED_FIELDS)


def test_validate_reports_missing_fields():
    doc = R.new_document("latency", ["bench", "latency"], {}, {})
    missing = R.validate(doc)
    assert "machine/cpu_model" in missing and "load/others_cpus" in missing
    doc["latency"] = [{"transport": "x"}]
    assert "latency[]/percentiles/p99.99/median" in R.validate(doc)


# --- parsing -------------------------------------------------------------------------------

def test_parse_sizes():
    assert C.parse_sizes("64,4K,1M") == [64, 4096, 1 << 20]
    assert C.parse_sizes("8..16M") == [8, 64, 512, 4096, 32768, 262144, 2097152, 16 << 20]
    assert C.parse_sizes("1K..4K:x2") == [1024, 2048, 4096]
    assert C.parse_sizes("16MiB,8") == [8, 16 << 20]
    for bad in ("", "4", "12Q", "8..4", "8..64:x1"):
        with pytest.raises(ValueError):
            C.parse_sizes(bad)
    assert C.parse_topologies("1x1,2X3") == [(1, 1), (2, 3)]
    with pytest.raises(ValueError):
        C.parse_topologies("0x1")


def test_help_explains_every_mode(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("latency", "throughput", "compare", "spin", "block", "adaptive"):
        assert word in out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for word in ("bench", "ls", "inspect", "gc"):
        assert word in out


def test_pinning_plans():
    from vringipc.benchtool.procs import cpu_plan, cpu_plan_pc, resolve_pin
    assert resolve_pin("auto", "spin") == "split" and resolve_pin("auto", "block") == "none"
    assert resolve_pin("same", "spin") == "same"
    assert cpu_plan("split", 2, [4, 6]) == [4, 6]
    assert cpu_plan("same", 3, [4, 6]) == [4, 4, 4]
    assert cpu_plan("none", 2, [4, 6]) == [None, None]
    # each producer -> consumer pair crosses CPUs
    assert cpu_plan_pc("split", 2, 2, [0, 1]) == ([0, 1], [1, 0])


# --- HDR histograms ------------------------------------------------------------------------

@needs_hdrh
def test_coordinated_omission_correction():
    # 9 round trips of 1 us and one stall of 100 us at a 1 us schedule: the
    # stall hid 99 round trips that would have been started meanwhile
    samples = [1000] * 9 + [100_000]
    plain = L.hist_from_samples(samples)
    corrected = L.hist_from_samples(samples, interval_ns=1000)
    assert plain.get_total_count() == 10
    assert corrected.get_total_count() == 10 + 99
    assert L.hist_stats(plain)["p50"] == pytest.approx(1.0, rel=0.01)
    assert L.hist_stats(corrected)["p50"] > 40      # half the corrected samples are in the stall
    assert L.hist_stats(corrected)["max"] == pytest.approx(100.0, rel=0.01)


# --- the bench modes end to end -------------------------------------------------------------

@needs_hdrh
@pytest.mark.timeout(60)
def test_latency_end_to_end(tmp_path):
    code, out, err = run_cli(["bench", "latency", "--quick", "--payload", "64,4K",
                              "--policy", "spin,block", "--out", str(tmp_path),
                              "--hgrm-dir", str(tmp_path / "hgrm")] + TINY)
    assert code == 0, out + err
    doc = json.loads((tmp_path / "latency.json").read_text())
    assert R.validate(doc, documented_fields()) == []
    assert doc["mode"] == "latency"
    assert {(r["payload"], r["policy"]) for r in doc["latency"]} == {
        (64, "spin"), (64, "block"), (4096, "spin"), (4096, "block")}
    for r in doc["latency"]:
        assert r["transport"] == "vringipc.Channel"
        assert r["samples"] == sum(r["samples_per_run"]) >= 20
        p = r["percentiles"]
        assert p["p50"]["median"] <= p["p99"]["median"] <= p["p99.99"]["median"] <= p["max"]["median"]
        assert os.path.exists(r["hgrm"])
        with open(r["hgrm"]) as f:
            assert "Percentile" in f.readline()
        h = L.decode(r["hdr"])
        assert h.get_total_count() == r["samples"]
        assert r["combined"]["mean"] == pytest.approx(h.get_mean_value() / 1000, rel=0.01)
    assert "p99.99" in out and "vringipc.Channel" in out
    assert len(list((tmp_path / "hgrm").glob("*.hgrm"))) == 4
    if has_matplotlib():
        # two payload sizes: no line plot against payload (a table says as much)
        assert not (tmp_path / "latency_vs_payload.png").exists()
        assert (tmp_path / "latency_percentiles_64B.png").exists()


@needs_hdrh
@pytest.mark.timeout(60)
def test_fixed_rate_mode(tmp_path):
    code, out, err = run_cli(["bench", "latency", "--payload", "64", "--policy", "block",
                              "--rate", "2000", "--out", str(tmp_path), "--no-plots"] + TINY)
    assert code == 0, out + err
    doc = json.loads((tmp_path / "latency.json").read_text())
    assert R.validate(doc, documented_fields()) == []
    (r,) = doc["latency"]
    assert r["mode"] == "fixed-rate" and r["rate"] == 2000
    assert r["from_schedule"]["n"] == sum(r["samples_per_run"]) or r["from_schedule"]["n"] > 0
    assert r["samples"] >= r["from_schedule"]["n"]        # correction only adds samples
    assert "coordinated omission" in out


@needs_hdrh
@pytest.mark.timeout(60)
def test_throughput_end_to_end(tmp_path):
    code, out, err = run_cli(["bench", "throughput", "-t", "vringipc.Channel,vringipc.Queue",
                              "--payload", "64", "--api", "single,batch", "--topology", "1x1,2x2",
                              "--out", str(tmp_path), "--no-plots"] + TINY)
    assert code == 0, out + err
    doc = json.loads((tmp_path / "throughput.json").read_text())
    assert R.validate(doc, documented_fields()) == []
    got = {(r["transport"], r["api"], r["producers"]) for r in doc["throughput"]}
    assert got == {("vringipc.Channel", "single", 1), ("vringipc.Channel", "batch", 1),
                   ("vringipc.Channel", "single", 2), ("vringipc.Channel", "batch", 2),
                   ("vringipc.Queue", "single", 1), ("vringipc.Queue", "single", 2)}
    for r in doc["throughput"]:
        # (a 20 ms window may see no message on a loaded machine: only >= 0)
        assert r["messages_per_run"][0] > 0 and r["msgs_per_s"]["median"] >= 0
        assert r["bytes_per_s"]["median"] == pytest.approx(r["msgs_per_s"]["median"] * 64)
        cpu = r["cpu_ns_per_msg"]["median"]
        assert cpu is None or cpu > 0
    assert {"transport": "vringipc.Queue", "case": "throughput, batch API, 1x1",
            "reason": "no batch API"} in doc["skipped"]


@needs_hdrh
@pytest.mark.timeout(120)
def test_compare_quick_end_to_end(tmp_path):
    code, out, err = run_cli(["bench", "compare", "--quick",
                              "-t", "vringipc.Channel,vringipc.Queue,mp.SimpleQueue,os.pipe",
                              "--payload", "64", "--tp-payload", "64", "--pairs", "1,2",
                              "--out", str(tmp_path)] + TINY + TINY_TP)
    assert code == 0, out + err
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert R.validate(doc, documented_fields()) == []
    assert doc["files"]["hgrm"] == [] and not (tmp_path / "hgrm").exists()   # --quick
    assert doc["settings"]["quick"] is True
    lat = {(r["transport"], r["policy"], r["pinning"]["mode"]) for r in doc["latency"]}
    # --quick: each transport's default wait, unpinned and on one CPU
    assert lat == {(t, p, pin) for t, p in (("vringipc.Channel", "default"),
                                            ("vringipc.Queue", "default"),
                                            ("mp.SimpleQueue", "block"), ("os.pipe", "block"))
                   for pin in ("none", "same")}
    assert all(r["default_policy"] for r in doc["latency"] + doc["throughput"] + doc["oversub"])
    assert {(r["transport"], r["pairs"]) for r in doc["oversub"]} == {
        (t, p) for t in ("vringipc.Channel", "vringipc.Queue", "mp.SimpleQueue", "os.pipe")
        for p in (1, 2)}
    v = doc["summary"]["verdict"]
    assert v["subjects"] == ["vringipc.Queue", "vringipc.Channel"]
    assert [r["baseline"] for r in v["rows"]] == ["mp.SimpleQueue", "os.pipe"]
    assert [c["key"] for c in v["columns"]] == ["tp_64", "rtt_p50", "rtt_p99", "same_cpu_p50",
                                                "oversub"]
    for row in v["rows"]:
        for s in v["subjects"]:
            assert all(x is None or x > 0 for x in row["ratios"][s].values())
    # the terminal: the verdict first, each baseline with both vringipc lines under it
    vi = out.index("Verdict:")
    assert vi < out.index("Round-trip latency") < out.index("Throughput,") < out.index(
        "Oversubscription:")
    block = out[vi:out.index("Details.")]
    assert re.search(r"^mp\.SimpleQueue .*\n  vringipc\.Queue .*\n  vringipc\.Channel ", block, re.M)
    assert re.search(r"\d(\.\d)?x faster|x: slower|x: same", block)
    assert "Statistic everywhere" in out and "median over runs" in out
    assert re.search(r"Took \d+ s \(estimated \d+ s\)", out)
    if has_matplotlib():
        for name in ("latency_percentiles_64B.png", "throughput_vs_payload.png", "oversub.png"):
            assert (tmp_path / name).stat().st_size > 1000, name
        assert sorted(doc["files"]["plots"]) == sorted(
            str(p) for p in tmp_path.glob("*.png"))
    else:
        pytest.skip("matplotlib not installed: plot files not checked")


@needs_hdrh
@pytest.mark.timeout(60)
def test_verdict_without_channel_still_has_rows(tmp_path):
    code, out, err = run_cli(["bench", "compare", "-t", "vringipc.Queue,mp.Queue",
                              "--payload", "64", "--tp-payload", "64", "--pin", "none",
                              "--no-oversub", "--out", "", "--no-plots"] + TINY + TINY_TP)
    assert code == 0, out + err
    block = out[out.index("Verdict:"):out.index("Details.")]
    assert re.search(r"^mp\.Queue .*\n  vringipc\.Queue +\S", block, re.M), block
    assert "vringipc.Channel" not in block


# --- the verdict's arithmetic on synthetic data --------------------------------------------

def test_ratio_words():
    assert R.ratio_words(12.3) == "12x faster"
    assert R.ratio_words(1.34) == "1.3x faster"
    assert R.ratio_words(1.01) == "1.0x: same"
    assert R.ratio_words(0.5) == "0.5x: slower"
    assert R.ratio_words(0.047) == "0.047x: slower"
    assert R.ratio_words(None) == "-"


def test_disagreement_flags_runs_more_than_2x_apart():
    assert R.disagreement([10, 11, 12]) is None
    assert R.disagreement([10, 20]) is None                 # exactly 2x: not flagged
    assert R.disagreement([10, 21, 15]) == pytest.approx(2.1)
    assert R.disagreement([0, 5]) == float("inf")
    assert R.disagreement([7]) is None and R.disagreement([]) is None


def _lat(t, pol, pin, p50_runs, p99_runs, payload=64):
    import statistics
    pct = {k: {"median": None, "min": None, "max": None, "runs": []} for k in L.PCT_KEYS}
    for k, runs in (("p50", p50_runs), ("p99", p99_runs)):
        pct[k] = {"median": statistics.median(runs), "min": min(runs), "max": max(runs),
                  "runs": runs}
    return {"transport": t, "policy": pol, "default_policy": True, "payload": payload,
            "mode": "pingpong", "pinning": {"mode": pin, "requested": pin, "cpus": None},
            "percentiles": pct}


def _tp(t, payload, runs):
    import statistics
    return {"transport": t, "policy": "block", "default_policy": True, "api": "single",
            "batch": 1, "producers": 1, "consumers": 1, "payload": payload,
            "pinning": {"mode": "none", "requested": "none", "cpus": None},
            "msgs_per_s": {"median": statistics.median(runs), "min": min(runs),
                           "max": max(runs), "runs": runs}}


def test_verdict_on_synthetic_runs():
    doc = {"transports": [{"name": n} for n in ("vringipc.Channel", "vringipc.Queue",
                                                "mp.Queue")],
           "latency": [_lat("vringipc.Queue", "default", "none", [2, 2, 2], [4, 4, 4]),
                       _lat("mp.Queue", "block", "none", [60, 60, 200], [100, 100, 100]),
                       _lat("vringipc.Queue", "default", "same", [30, 30, 30], [50, 50, 50]),
                       _lat("mp.Queue", "block", "same", [15, 15, 15], [20, 20, 20])],
           "throughput": [_tp("vringipc.Queue", 64, [1e6, 1e6, 1e6]),
                          _tp("mp.Queue", 64, [1e5, 1e5, 1e5])],
           "oversub": [], "skipped": [{"transport": "pyzmq", "case": None, "reason": "missing"}]}
    v = R.verdict(doc)
    assert v["subjects"] == ["vringipc.Queue"]           # Channel not measured: no line
    assert [c["key"] for c in v["columns"]] == ["tp_64", "rtt_p50", "rtt_p99", "same_cpu_p50"]
    (row,) = v["rows"]
    assert row["baseline"] == "mp.Queue"
    r = row["ratios"]["vringipc.Queue"]
    assert r["tp_64"] == pytest.approx(10)                # msgs/s: vringipc / baseline
    assert r["rtt_p50"] == pytest.approx(30)              # time: baseline / vringipc
    assert r["rtt_p99"] == pytest.approx(25)
    assert r["same_cpu_p50"] == pytest.approx(0.5)        # slower on one CPU
    assert row["flags"]["vringipc.Queue/rtt_p50"] is True  # mp.Queue's p50 runs 60..200
    assert row["flags"]["vringipc.Queue/tp_64"] is False
    text = R.verdict_text(v)
    line = text.splitlines()[text.splitlines().index(next(
        x for x in text.splitlines() if x.startswith("mp.Queue"))) + 1]
    assert "10x faster" in line and "30x faster!" in line and "0.5x: slower" in line
    assert "pyzmq (missing)" in text
    dis = R.disagreements(doc)
    assert [(d["case"], d["figure"]) for d in dis] == [
        ("latency mp.Queue block 64 B pinning none", "p50 us")]
    assert "60, 60, 200" in R.disagreements_text(dis)


def test_verdict_needs_a_baseline():
    doc = {"latency": [_lat("vringipc.Queue", "default", "none", [2], [4])], "throughput": [],
           "oversub": []}
    assert "Verdict: none" in R.verdict_text(R.verdict(doc))


def test_quick_is_sized_to_its_stated_time():
    d = {"duration": 0.1, "warmup": 0.03, "tp_duration": 0.12, "os_duration": 0.25}
    for n_lat, n_tp, procs in ((16, 24, [2, 8, 32] * 4), (8, 12, [2, 8, 32] * 4)):
        f = C._fit_to(C.QUICK_SECONDS, 3, n_lat, n_tp, procs, d)
        est = C.estimate_seconds(3, n_lat, n_tp, procs, d["duration"] * f,
                                 d["tp_duration"] * f, d["os_duration"] * f, d["warmup"] * f)
        assert est == pytest.approx(C.QUICK_SECONDS, rel=0.01)


def test_readme_and_docs_state_the_tools_quick_time():
    with open(os.path.join(REPO, "README.md")) as f:
        first = f.read().split("\n\n", 2)[1]
    assert "vringipc bench compare --quick" in first
    assert f"~{C.QUICK_SECONDS} s" in first
    with open(DOCS) as f:
        assert f"about {C.QUICK_SECONDS} s" in f.read()


@needs_hdrh
@pytest.mark.timeout(60)
def test_oversub_mode(tmp_path):
    code, out, err = run_cli(["bench", "oversub", "-t", "vringipc.Queue,mp.Queue",
                              "--pairs", "1,3", "--out", str(tmp_path), "--no-plots"] + TINY)
    assert code == 0, out + err
    doc = json.loads((tmp_path / "oversub.json").read_text())
    assert R.validate(doc, documented_fields()) == []
    got = {(r["transport"], r["policy"], r["pairs"], r["processes"]) for r in doc["oversub"]}
    assert got == {("vringipc.Queue", "default", 1, 2), ("vringipc.Queue", "default", 3, 6),
                   ("mp.Queue", "block", 1, 2), ("mp.Queue", "block", 3, 6)}
    assert all(r["rt_per_s"]["median"] > 0 for r in doc["oversub"])
    assert "Oversubscription:" in out


@needs_hdrh
@pytest.mark.timeout(60)
def test_missing_optional_peers_are_skipped(tmp_path, monkeypatch):
    # an installed package made unimportable: sys.modules[name] = None
    for mod in ("zmq", "faster_fifo", "iceoryx2"):
        monkeypatch.setitem(sys.modules, mod, None)
    code, out, err = run_cli(["bench", "compare", "-t", "pyzmq,faster-fifo,iceoryx2,os.pipe",
                              "--payload", "64", "--tp-payload", "64", "--policy", "block",
                              "--pairs", "1", "--out", str(tmp_path), "--no-plots"]
                             + TINY + TINY_TP)
    assert code == 0, out + err
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert R.validate(doc, documented_fields()) == []
    assert doc["errors"] == []
    skipped = {s["transport"]: s["reason"] for s in doc["skipped"] if s["case"] is None}
    assert set(skipped) == {"pyzmq", "faster-fifo", "iceoryx2"}
    assert "pip install pyzmq" in skipped["pyzmq"]
    assert "pip install faster-fifo" in skipped["faster-fifo"]
    avail = {t["name"]: t["available"] for t in doc["transports"]}
    assert avail == {"pyzmq": False, "faster-fifo": False, "iceoryx2": False, "os.pipe": True}
    assert {r["transport"] for r in doc["latency"] + doc["throughput"]} == {"os.pipe"}
    assert "skipped pyzmq" in out


@needs_hdrh
@pytest.mark.timeout(60)
def test_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run_cli(["bench", "latency", "--payload", "64", "--policy", "block",
                              "--out", str(tmp_path)] + TINY)
    assert code == 0, out + err
    assert "pip install" in out and "matplotlib" in out
    assert not list(tmp_path.glob("*.png"))
    doc = json.loads((tmp_path / "latency.json").read_text())
    assert doc["files"]["plots"] == [] and doc["latency"]


@needs_hdrh
@pytest.mark.timeout(60)
def test_user_adapter_plugin(tmp_path):
    plugin = tmp_path / "my_transports.py"
    plugin.write_text(textwrap.dedent('''
        import multiprocessing as mp
        from vringipc.benchtool.transports import Endpoint, Transport, register

        @register
        class MyFifo(Transport):
            name = "test.simplequeue"
            def __init__(self, max_msg, policy, depth):
                self.q = mp.get_context("fork").SimpleQueue()
            def sender(self):
                return Endpoint(send=self.q.put, close=self.q.close)
            def receiver(self):
                return Endpoint(recv=self.q.get, close=self.q.close)
    '''))
    try:
        code, out, err = run_cli(["bench", "compare", "--plugin", str(plugin),
                                  "-t", "test.simplequeue,vringipc.Channel", "--payload", "64",
                                  "--tp-payload", "64", "--policy", "block", "--pairs", "1",
                                  "--out", str(tmp_path), "--no-plots"] + TINY + TINY_TP)
    finally:
        T.unregister("test.simplequeue")
    assert code == 0, out + err
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert {r["transport"] for r in doc["latency"]} == {"test.simplequeue", "vringipc.Channel"}
    assert any(r["transport"] == "test.simplequeue" for r in doc["throughput"])


@needs_hdrh
@pytest.mark.timeout(60)
def test_python_dash_m_vringipc(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "vringipc", "bench", "latency", "--payload", "64",
                        "--policy", "spin", "--out", str(tmp_path), "--no-plots"] + TINY,
                       capture_output=True, text=True, timeout=50, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert R.validate(json.loads((tmp_path / "latency.json").read_text()),
                      documented_fields()) == []
    r = subprocess.run([sys.executable, "-m", "vringipc", "bench", "list"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0 and "vringipc.Channel" in r.stdout and "os.pipe" in r.stdout


def test_bench_without_hdrhistogram_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hdrh", None)
    assert cli.main(["bench", "latency", "--out", ""]) == 2
    assert "pip install" in capsys.readouterr().err


def test_progress_line_on_stderr():
    err = io.StringIO()
    p = R.Progress(3, stream=err, every=0)
    for i in range(3):
        p.step(f"case {i}")
    p.done()
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("[1/3]") and lines[-1].startswith("[3/3]") and "left" in lines[-1]


# --- every adapter moves messages ------------------------------------------------------------

def _transports():
    return [pytest.param(cls, id=cls.name) for cls in T.all_transports()]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tcls", _transports())
def test_adapter_pingpong_and_throughput(tcls):
    why = T.check_available(tcls)
    if why:
        pytest.skip(why)
    cfg = L.LatencyConfig(duration=0.01, warmup=0.0, runs=1, max_samples=200)
    policy = "block" if "block" in tcls.policies else tcls.policies[0]
    res = L.pingpong_once(tcls, 300, policy, cfg)
    assert res["samples"].size >= 1 and (res["samples"] > 0).all()
    tcfg = TP.ThroughputConfig(duration=0.02, warmup=0.0, runs=1)
    r = TP.throughput_once(tcls, 100, policy, "single", 1, 1, tcfg)
    assert r["messages"] > 0          # throughput_once itself checks sent == received


@pytest.mark.timeout(60)
def test_throughput_shapes_shared_and_sharded():
    cfg = TP.ThroughputConfig(duration=0.02, warmup=0.0, runs=1)
    # MPMC: one shared queue, 2 producers x 1 consumer and 1 x 2
    for n, m in ((2, 1), (1, 2)):
        r = TP.throughput_once(T.VringQueue, 64, "block", "single", n, m, cfg)
        assert len(r["producers_raw"]) == n and len(r["consumers_raw"]) == m
    # SPSC: 2 x 2 as two links; 2 x 1 refused
    r = TP.throughput_once(T.OsPipe, 64, "block", "single", 2, 2, cfg)
    assert all(c["received"] > 0 for c in r["consumers_raw"])
    assert TP.supports(T.OsPipe, "single", 2, 1)
    with pytest.raises(ValueError):
        TP.throughput_once(T.OsPipe, 64, "block", "single", 2, 1, cfg)
    # batch API with two consumers on a shared queue: end markers a consumer
    # took for the other are put back
    if T.check_available(T.FasterFifo) is None:
        r = TP.throughput_once(T.FasterFifo, 64, "block", "batch", 1, 2, cfg)
        assert r["messages"] > 0


# --- ls / inspect / gc ------------------------------------------------------------------------

def _dead_creator_segment() -> str:
    """A named segment whose creator (a forked child) exited without unlinking."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from vringipc.ring import SharedRing
            ring = SharedRing.create(num=8, slot_size=64, backend="shm")
            os.write(w, ring.name.encode())
            code = 0
        finally:
            os._exit(code)                 # no close, no unlink
    os.close(w)
    try:
        name = os.read(r, 100).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert name.startswith("/vr_")
    return name


@pytest.mark.timeout(30)
def test_ls_inspect_gc():
    import vringipc
    live = vringipc.Channel(capacity=1 << 16, backend="shm")
    dead = _dead_creator_segment()
    try:
        live.send(b"hello")                       # we are the producer; one message in flight
        code, out, _ = run_cli(["ls", "--json"])
        assert code == 0
        infos = {i["name"]: i for i in json.loads(out)}
        li, di = infos[live.name], infos[dead]
        assert li["app_kind"] == "channel" and li["creator_pid"] == os.getpid()
        assert li["creator_alive"] is True
        assert li["driver"]["pid"] == os.getpid() and li["driver"]["alive"]
        assert li["device"]["pid"] is None
        assert li["rings"][0]["avail_idx"] == 1 and li["rings"][0]["used_idx"] == 0
        assert di["app_kind"] == "raw ring" and di["creator_alive"] is False
        code, out, _ = run_cli(["ls"])
        assert live.name in out and dead in out and "dead" in out

        code, out, _ = run_cli(["inspect", live.name])
        assert code == 0 and "producer (driver): pid" in out and "in flight 1" in out
        code, out, _ = run_cli(["inspect", "/vr_0_000000000000"])
        assert code == 1

        names = [live.name, dead]
        code, out, _ = run_cli(["gc", "--dry-run", "--json"] + names)
        verdict = {x["name"]: x for x in json.loads(out)}
        assert verdict[dead]["remove"] and not verdict[dead]["removed"]
        assert not verdict[live.name]["remove"]
        assert os.path.exists(S.SHM_DIR + dead)              # dry run: nothing removed

        code, out, _ = run_cli(["gc"] + names)
        assert code == 0 and "removed" in out
        assert not os.path.exists(S.SHM_DIR + dead)
        assert os.path.exists(S.SHM_DIR + live.name)          # live creator: kept
    finally:
        live.close()
        if os.path.exists(S.SHM_DIR + dead):
            os.unlink(S.SHM_DIR + dead)


@pytest.mark.timeout(30)
def test_gc_keeps_dead_creator_segment_still_attached():
    from vringipc.segment import Segment
    dead = _dead_creator_segment()
    try:
        seg = Segment.attach(dead)                # a live process (us) maps it
        try:
            (v,) = S.gc(dry_run=False, names=[dead])
            assert not v["remove"] and str(os.getpid()) in v["reason"]
            assert os.path.exists(S.SHM_DIR + dead)
        finally:
            seg.close()
        (v,) = S.gc(dry_run=False, names=[dead])
        assert v["removed"]
        assert not os.path.exists(S.SHM_DIR + dead)
    finally:
        if os.path.exists(S.SHM_DIR + dead):
            os.unlink(S.SHM_DIR + dead)


def test_ls_reports_foreign_files(tmp_path):
    bogus = tmp_path / "vr_1_0123456789ab"
    bogus.write_bytes(b"x" * 100)
    (info,) = S.scan(shm_dir=str(tmp_path))
    assert not info["valid"] and "smaller than" in info["error"]
    assert S.gc_verdict({"creator_pid": None})[0] is False


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(r"vringipc \d+\.\d+\.\d+\S*", out), out
    import vringipc
    assert out.split()[1] == cli.version()
    assert vringipc.__version__ == cli.version() or "dev" in cli.version()


def _columns(header: str) -> list[tuple[int, int]]:
    """(start, end) of each header cell (cells are separated by 2+ spaces)."""
    return [m.span() for m in re.finditer(r"\S+(?: \S+)*", header)]


def test_ls_columns_line_up():
    # long cells: a queue with many users, dead and detached peers, a big pid
    queue = {"name": "/vr_3fffff_0123456789ab", "size": 64 << 20, "valid": True,
             "creator_pid": 4194303, "creator_alive": False, "app_kind": "queue",
             "rings": [{"avail_idx": 65535, "used_idx": 65530}], "created": "2026-01-01T00:00:00",
             "queue_users": [{"pid": p, "alive": p % 2 == 0} for p in range(1000, 1012)],
             "driver": None, "device": None}
    chan = dict(queue, name="/vr_1_0123456789ab", app_kind="channel", queue_users=None,
                creator_alive=True,
                driver={"pid": 4194302, "alive": False, "state": "detached"},
                device={"pid": 4194301, "alive": True, "state": "attached"})
    bad = {"name": "/vr_2_0123456789ab", "size": 100, "valid": False, "creator_pid": 2,
           "creator_alive": False, "error": "smaller than a header"}
    text = S.ls_table([queue, chan, bad])
    lines = text.splitlines()
    head = lines[0]
    spans = _columns(head)
    assert [head[a:b] for a, b in spans] == list(S.LS_COLUMNS)
    rows = S.ls_rows([queue, chan, bad])
    assert rows[0]["queue users"] == "6 live of 12"
    assert rows[0]["producer"] == rows[0]["consumer"] == "-"     # a queue has no single one
    assert rows[1]["producer"] == "4194302 dead detached"
    for line, row in zip(lines[2:], rows):
        # each cell starts where its header starts (ends there, for the
        # right-aligned size and avail/used), with a gap of 2+ spaces around it
        for (a, b), col in zip(spans, S.LS_COLUMNS):
            v = row[col]
            start = a if col not in ("size", "avail/used") else b - len(v)
            assert line[start:start + len(v)] == v, (col, line)
            assert start == 0 or line[start - 2:start] == "  ", (col, line)
            after = line[start + len(v):start + len(v) + 2]
            assert after in ("  ", ""), (col, line)
    assert lines[4].endswith("(smaller than a header)")


@pytest.mark.skipif(not has_matplotlib(), reason="matplotlib not installed")
def test_plots_from_synthetic_results(tmp_path):
    from vringipc.benchtool import plots
    lat = [_lat(t, "block", pin, [10.0 * k, 11.0 * k], [20.0 * k, 30.0 * k], payload=size)
           for t in ("vringipc.Queue", "mp.Queue") for pin in ("none", "same")
           for k, size in ((1, 64), (2, 4096), (4, 65536))]
    for r in lat:          # the percentile plot needs every percentile
        for k in L.PCT_KEYS:
            if r["percentiles"][k]["median"] is None:
                r["percentiles"][k] = dict(r["percentiles"]["p99"])
    doc = {"machine": {"cpu_model": "Test CPU", "cores_online": 2, "kernel": "6", "python": "3"},
           "load": {"others_cpus": 0.1}, "latency": lat,
           "throughput": [_tp("vringipc.Queue", s, [1e5, 2e5]) for s in (64, 4096)],
           "oversub": [{"transport": "mp.Queue", "policy": "block", "pairs": p,
                        "rt_per_s": {"median": 1e4, "min": 9e3, "max": 1.1e4, "runs": [9e3, 1.1e4]}}
                       for p in (1, 4, 16)]}
    paths = plots.plot_all(doc, str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["latency_percentiles_4096B.png", "latency_percentiles_64B.png",
                     "latency_percentiles_65536B.png", "latency_vs_payload.png", "oversub.png",
                     "throughput_vs_payload.png"]
    assert all(os.path.getsize(p) > 1000 for p in paths)
