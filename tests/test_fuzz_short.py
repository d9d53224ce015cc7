"""CI-sized pass of the fuzz harness (tools/fuzz_host.py); no atheris or ASAN needed.

(a) every input in tests/fuzz_corpus/<target>/ is replayed through the harness.
    Files named ``bug-<id>--*.bin`` reproduce an open bug from KNOWN_BUGS and are
    strict xfails until it is fixed (then they XPASS and fail: drop the xfail by
    renaming the file to ``reg-...``).  ``reg-*`` and ``asan-*`` files must pass
    (an ``asan-*`` bug shows only under AddressSanitizer, see test_asan_replay).
(b) hypothesis drives the same harness with arbitrary bytes.
(c) if atheris is installed, a few seconds of real coverage-guided fuzzing in a
    subprocess.

See tools/README.md (Fuzzing) for the long ASAN runs.
"""

from __future__ import annotations

import gc
import importlib.util
import mmap
import os
import random
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "tests", "fuzz_corpus")
TOOL = os.path.join(ROOT, "tools", "fuzz_host.py")


def _load_harness():
    spec = importlib.util.spec_from_file_location("fuzz_host", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fh = _load_harness()

# mapped-gc-clear depends on the order the cyclic GC clears objects, so a replay
# could hit it anywhere; it has its own deterministic test below.
LENIENT = ("mapped-gc-clear",)


def _corpus():
    out = []
    for target in fh.TARGETS:
        d = os.path.join(CORPUS, target)
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            m = re.match(r"bug-([a-z0-9-]+?)--", name)
            bug = m.group(1) if m else None
            marks = ()
            if bug:
                assert bug in fh.KNOWN_BUGS, f"{name}: unknown bug id {bug}"
                marks = pytest.mark.xfail(strict=True, raises=fh.KnownBug, reason=fh.KNOWN_BUGS[bug])
            out.append(pytest.param(target, os.path.join(d, name), bug, marks=marks, id=f"{target}/{name}"))
    return out


@pytest.mark.parametrize("target,path,bug", _corpus())
def test_replay_corpus(target, path, bug):
    with open(path, "rb") as f:
        data = f.read()
    try:
        fh.one_input(data, target, "raise", None, LENIENT)
    except fh.KnownBug as e:
        # a bug-* file must reproduce exactly its own bug, nothing else
        assert e.bug == bug, f"{os.path.basename(path)} reached {e.bug}, expected {bug}"
        raise


def test_corpus_is_not_vacuous():
    """The regression inputs really drive the rings: chains are fetched, data
    pulled and pushed, completions written, the driver reclaims buffers."""
    stats: dict = {}
    for p in _corpus():
        target, path, _bug = p.values
        if target == "header":
            continue
        with open(path, "rb") as f:
            data = f.read()
        fh.one_input(data, target, "skip", stats)
    for key in ("getdesc:ok", "getdesc:desc", "getdesc:ring", "getdesc:empty", "op_pull", "op_push",
                "op_complete", "op_complete_multi", "op_pull_many", "op_abandon", "op_notify", "drv_add",
                "drv_get", "drv_device"):
        assert stats.get(key, 0) > 0, f"corpus never reaches {key}: {stats}"


def test_harness_detects_a_wrong_model(monkeypatch):
    """Sanity of the oracle: break one rule of the reference model and the
    corpus must produce a Finding."""
    monkeypatch.setattr(fh, "_need_event", lambda e, n, o: not ((n - e - 1) & 0xFFFF) < ((n - o) & 0xFFFF))
    with pytest.raises(fh.Finding):
        for p in _corpus():
            target, path, _bug = p.values
            if target != "header":
                with open(path, "rb") as f:
                    fh.one_input(f.read(), target, "skip", None)


HYP = dict(deadline=None, database=None, derandomize=True,
           suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _mutate(seed: bytes, edits) -> bytes:
    b = bytearray(seed)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


def _inputs(target, max_size):
    """Hypothesis's own bytes (small, zero-heavy: they mostly end in setup), plain
    random bytes of a useful size, and corpus inputs with a few bytes changed
    (these get past setup into long operation sequences)."""
    seeds = []
    d = os.path.join(CORPUS, target)
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
        with open(os.path.join(d, name), "rb") as f:
            seeds.append(f.read())
    strategies = [
        st.binary(min_size=0, max_size=max_size),
        st.builds(lambda seed, n: random.Random(seed).randbytes(n), st.integers(0, 2**32 - 1),
                  st.integers(32, max_size)),
    ]
    if seeds:
        strategies.append(st.builds(_mutate, st.sampled_from(seeds),
                                    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                                             min_size=1, max_size=8)))
    return st.one_of(strategies)


@settings(max_examples=200, **HYP)
@given(_inputs("host", 3000))
def test_hypothesis_host(data):
    fh.one_input(data, "host", "skip", None)


@settings(max_examples=150, **HYP)
@given(_inputs("driver", 2000))
def test_hypothesis_driver(data):
    fh.one_input(data, "driver", "skip", None)


@settings(max_examples=100, **HYP)
@given(_inputs("header", 4200))
def test_hypothesis_header(data):
    fh.one_input(data, "header", "skip", None)


def test_gc_of_ring_and_iov_releases_the_buffer():
    from vringipc import layout
    from vringipc._ring import Iov, VringHost

    lay = layout.SegmentLayout.build([8], [4096])
    m = mmap.mmap(-1, lay.seg_size)
    try:
        gc.collect()
        h = VringHost(m, *lay.rings[0].ring_args())
        riov = Iov()
        assert h.getdesc(riov) is None       # riov now shares the host's mapping
        cycle = [h, riov]
        cycle.append(cycle)                  # a cycle, as an exception traceback makes
        del h, riov, cycle
        gc.collect()
    finally:
        m.close()                            # BufferError while the export is leaked


# Under an ASAN build (VRINGIPC_FUZZ_ASAN_BUILD=<dir with an ASAN vringipc>, see
# tools/README.md) these inputs, replayed with --known ignore, make the bad call
# and must produce an AddressSanitizer report until the bug is fixed.
# Inputs that crashed an ASAN build before their bug was fixed (all fixed now:
# the bug-* files were renamed reg-*); an entry here makes its replay an xfail.
ASAN_CRASHERS: dict = {}
ASAN_BUILD = os.environ.get("VRINGIPC_FUZZ_ASAN_BUILD")


def _asan_params():
    out = []
    for p in _corpus():
        target, path, _bug = p.values
        key = f"{target}/{os.path.basename(path)}"
        marks = ()
        if key in ASAN_CRASHERS:
            marks = pytest.mark.xfail(strict=True, reason=f"ASAN {ASAN_CRASHERS[key]}")
        out.append(pytest.param(target, path, marks=marks, id=key))
    return out


@pytest.mark.skipif(not ASAN_BUILD, reason="set VRINGIPC_FUZZ_ASAN_BUILD to an ASAN build of vringipc")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("target,path", _asan_params())
def test_asan_replay(target, path):
    out = subprocess.run([sys.executable, TOOL, "--replay", path, "--target", target, "--known", "ignore",
                          "--build", ASAN_BUILD], capture_output=True, text=True, timeout=100)
    report = out.stdout + out.stderr
    assert "AddressSanitizer" not in report and out.returncode == 0, report[-3000:]


@pytest.mark.timeout(180)
def test_atheris_short_run(tmp_path):
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris not installed")
    out = subprocess.run(
        [sys.executable, TOOL, "--seconds", "4", "--target", "host", "--corpus", str(tmp_path / "corpus"),
         "--random-seeds", "16", "--build", ROOT],
        capture_output=True, text=True, timeout=150)
    m = re.search(r"RESULT target=host .* execs=(\d+) cov=(\d+) .* crashes=(\d+)", out.stdout)
    assert m, out.stdout + out.stderr
    execs, cov, crashes = map(int, m.groups())
    assert crashes == 0, out.stdout
    assert execs > 0 and cov > 0, out.stdout
