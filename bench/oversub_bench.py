"""Waits when processes outnumber cores (issue 10): four measurements.

  same   64 B ping-pong, both processes pinned to ONE CPU: os.pipe,
         mp.SimpleQueue, mp.Queue, vringipc.Queue / SimpleQueue / Channel
  split  64 B ping-pong, one process per CPU: vringipc.Queue / SimpleQueue /
         Channel (and Queue[block], spin=0, in both sections: the two modes
         of a blocking round trip)
  pairs  P request/response pairs (2P processes, unpinned), a small object
         (an int) through two queues per pair, round trips/s summed over the
         pairs, for P in 1, 2, 4, 8, 16: mp.Queue, mp.SimpleQueue,
         vringipc.Queue, vringipc.SimpleQueue
  idle   CPU used by a consumer blocked in get()/recv() with nothing
         arriving for ~2 s (its own /proc/self/schedstat run time)

Every figure is the median over --runs runs; within a run the cases are
interleaved (round r measures every case once).  Waits use each transport's
defaults (vringipc: spin=50e-6).  /proc/loadavg is recorded before every run.

Comparing code trees in the same run (baseline vs change), interleaved::

    python bench/oversub_bench.py --trees /path/base /path/new --runs 5 --json out.json

re-runs this script once per (round, section, tree) with the tree first on
sys.path (its own built vringipc._ring), alternating the trees.

Nothing here is a test: no timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PAYLOAD = 64
SECTIONS = ("same", "split", "pairs", "idle")
SAME_KINDS = ("os.pipe", "mp.SimpleQueue", "mp.Queue", "vringipc.Queue",
              "vringipc.SimpleQueue", "vringipc.Channel", "vringipc.Queue[block]")
SPLIT_KINDS = ("vringipc.Queue", "vringipc.SimpleQueue", "vringipc.Channel",
               "vringipc.Queue[block]")
PAIR_KINDS = ("mp.Queue", "mp.SimpleQueue", "vringipc.Queue", "vringipc.SimpleQueue")
IDLE_KINDS = ("vringipc.Queue", "vringipc.Channel")
PAIRS = (1, 2, 4, 8, 16)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --- links: (send, recv) per end, created before fork ---------------------------------

class _PipeLink:
    def __init__(self):
        self.r, self.w = os.pipe()

    def ends(self):
        r, w = self.r, self.w
        return (lambda m: os.write(w, m)), (lambda: os.read(r, PAYLOAD))


class _QLink:
    def __init__(self, q):
        self.q = q

    def ends(self):
        return self.q.put, self.q.get

    def flush(self):
        # mp.Queue: the feeder thread must deliver the last put before the
        # process leaves with os._exit
        if hasattr(self.q, "join_thread"):
            self.q.close()
            self.q.join_thread()


class _ChanLink:
    def __init__(self):
        from vringipc import Channel
        self.ch = Channel()

    def ends(self):
        ch = self.ch
        return (lambda m: ch.send(m)), (lambda: ch.recv())


def make_link(kind: str):
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    if kind == "os.pipe":
        return _PipeLink()
    if kind == "mp.SimpleQueue":
        return _QLink(ctx.SimpleQueue())
    if kind == "mp.Queue":
        return _QLink(ctx.Queue())
    if kind == "vringipc.Queue":
        from vringipc import Queue
        return _QLink(Queue())
    if kind == "vringipc.Queue[block]":         # spin=0: the two modes of a blocking wait
        from vringipc import Queue
        return _QLink(Queue(spin=0))
    if kind == "vringipc.SimpleQueue":
        from vringipc import SimpleQueue
        return _QLink(SimpleQueue())
    if kind == "vringipc.Channel":
        return _ChanLink()
    raise ValueError(kind)


def _fork(fn, *args, cpu=None):
    """Fork fn(wfd, *args); returns (pid, rfd) where the child writes JSON."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            out = fn(*args)
            data = json.dumps(out).encode()
            os.write(w, data)
            code = 0
        except BaseException:
            import traceback
            os.write(w, json.dumps({"error": traceback.format_exc()}).encode())
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _collect(pid, rfd, timeout=60.0):
    data = b""
    deadline = time.monotonic() + timeout
    import select
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([rfd], [], [], left)[0]:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(rfd)
            raise TimeoutError("benchmark child timed out")
        b = os.read(rfd, 1 << 16)
        if not b:
            break
        data += b
    os.close(rfd)
    os.waitpid(pid, 0)
    out = json.loads(data) if data else {"error": "no output"}
    if isinstance(out, dict) and "error" in out:
        raise RuntimeError(out["error"])
    return out


# --- ping-pong ---------------------------------------------------------------------------

def _ping(l1, l2, warm_s, dur_s, max_n):
    send, _ = l1.ends()
    _, recv = l2.ends()
    msg = bytes(range(PAYLOAD))
    pc = time.perf_counter_ns
    stop = pc() + int(warm_s * 1e9)
    k = 0
    while k < 20 or pc() < stop:
        send(msg)
        recv()
        k += 1
    samples = []
    app = samples.append
    t_stop = pc() + int(dur_s * 1e9)
    while len(samples) < max_n:
        t0 = pc()
        send(msg)
        recv()
        t1 = pc()
        app(t1 - t0)
        if t1 >= t_stop and len(samples) >= 50:
            break
    send(b"x")
    recv()
    getattr(l1, "flush", lambda: None)()
    samples.sort()
    n = len(samples)
    return {"p50": samples[n // 2] / 1e3, "p99": samples[min(n - 1, int(n * 0.99))] / 1e3, "n": n}


def _echo(inp, out, last):
    """Send back what arrives on inp over out until last(message) is true."""
    _, recv = inp.ends()
    send, _ = out.ends()
    while True:
        m = recv()
        send(m)
        if last(m):
            getattr(out, "flush", lambda: None)()
            return {}


def _pong(l1, l2):
    return _echo(l1, l2, lambda m: len(m) == 1)


def pingpong(kind, cpus, warm_s=0.1, dur_s=0.4, max_n=200_000):
    l1, l2 = make_link(kind), make_link(kind)
    pb, rb = _fork(_pong, l1, l2, cpu=cpus[1])
    pa, ra = _fork(_ping, l1, l2, warm_s, dur_s, max_n, cpu=cpus[0])
    try:
        res = _collect(pa, ra)
        _collect(pb, rb)
    finally:
        for l in (l1, l2):
            for a in ("q", "ch"):
                o = getattr(l, a, None)
                if o is not None and hasattr(o, "close"):
                    try:
                        o.close()
                    except Exception:
                        pass
            if isinstance(l, _PipeLink):
                os.close(l.r)
                os.close(l.w)
    return res


# --- P pairs -----------------------------------------------------------------------------

def _server(req, resp):
    return _echo(req, resp, lambda x: x is None)


def _client(req, resp, t_start, t_end):
    put, _ = req.ends()
    _, get = resp.ends()
    put(0)
    get()                         # connected
    while time.monotonic() < t_start:
        time.sleep(0.001)
    n = 0
    mono = time.monotonic
    while True:
        put(n)
        get()
        n += 1
        if (n & 15) == 0 and mono() >= t_end:
            break
    t = mono()
    put(None)
    get()
    getattr(req, "flush", lambda: None)()
    return {"n": n, "t": t - t_start}


def pairs(kind, p, dur_s=0.6):
    links = [(make_link(kind), make_link(kind)) for _ in range(p)]
    t_start = time.monotonic() + 0.3 + 0.03 * p
    procs = []
    for req, resp in links:
        procs.append(("s", *_fork(_server, req, resp)))
    for req, resp in links:
        procs.append(("c", *_fork(_client, req, resp, t_start, t_start + dur_s)))
    total = 0.0
    for role, pid, rfd in procs[p:]:
        r = _collect(pid, rfd)
        total += r["n"] / r["t"]
    for role, pid, rfd in procs[:p]:
        _collect(pid, rfd)
    for req, resp in links:
        for l in (req, resp):
            try:
                l.q.close()
            except Exception:
                pass
    return {"rt_per_s": total}


# --- idle CPU ----------------------------------------------------------------------------

def _ontime_ns() -> int:
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[0])


def _idle_consumer(link):
    _, recv = link.ends()
    t0, c0 = time.monotonic(), _ontime_ns()
    recv()
    t1, c1 = time.monotonic(), _ontime_ns()
    return {"cpu_pct": 100.0 * (c1 - c0) / 1e9 / (t1 - t0), "wall_s": t1 - t0}


def idle(kind, wait_s=2.0):
    link = make_link(kind)
    pid, rfd = _fork(_idle_consumer, link)
    time.sleep(wait_s)
    send, _ = link.ends()
    send(bytes(PAYLOAD))
    r = _collect(pid, rfd)
    try:
        (link.q if hasattr(link, "q") else link.ch).close()
    except Exception:
        pass
    return r


# --- one round of a section, and the driver ----------------------------------------------

def run_section(section: str, runs: int) -> dict:
    """{case: [per-run result, ...]} for `section`, cases interleaved per run."""
    cpus = sorted(os.sched_getaffinity(0))
    out: dict = {"loadavg": []}
    for _ in range(runs):
        out["loadavg"].append(loadavg())
        if section == "same":
            for k in SAME_KINDS:
                out.setdefault(k, []).append(pingpong(k, (cpus[0], cpus[0])))
        elif section == "split":
            for k in SPLIT_KINDS:
                out.setdefault(k, []).append(pingpong(k, (cpus[0], cpus[1 % len(cpus)])))
        elif section == "pairs":
            for p in PAIRS:
                for k in PAIR_KINDS:
                    out.setdefault(f"{k} P={p}", []).append(pairs(k, p))
        elif section == "idle":
            for k in IDLE_KINDS:
                out.setdefault(k, []).append(idle(k))
    return out


def _med(vals):
    return statistics.median(vals) if vals else None


def summarize(raw: dict) -> dict:
    """Medians of every numeric field per case."""
    summ = {}
    for sec, cases in raw.items():
        s = {}
        for case, runs in cases.items():
            if case == "loadavg":
                s[case] = runs
                continue
            keys = runs[0].keys()
            s[case] = {k: _med([r[k] for r in runs]) for k in keys}
        summ[sec] = s
    return summ


def print_summary(summ: dict, label: str = "") -> None:
    for sec, cases in summ.items():
        print(f"[{label}{sec}] loadavg {cases.get('loadavg')}")
        for case, v in cases.items():
            if case == "loadavg":
                continue
            print("   %-28s %s" % (case, "  ".join(f"{k}={x:.4g}" for k, x in v.items())))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--trees", nargs="+", help="code trees to compare, interleaved")
    ap.add_argument("--pairs", default=None, help="P values, e.g. 1,2,8")
    ap.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="import vringipc from this tree (default: this script's repo)")
    a = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(a.tree))
    global PAIRS
    if a.pairs:
        PAIRS = tuple(int(x) for x in a.pairs.split(","))
    sections = [s for s in a.only.split(",") if s]
    if not a.trees:
        import vringipc
        if not vringipc.__file__.startswith(os.path.abspath(a.tree) + os.sep):
            raise SystemExit(f"imported {vringipc.__file__}, not from {a.tree}")
        raw = {s: run_section(s, a.runs) for s in sections}
        res = {"tree": os.path.dirname(os.path.dirname(vringipc.__file__)), "raw": raw,
               "summary": summarize(raw)}
        print_summary(res["summary"])
    else:
        me = os.path.abspath(__file__)
        raw = {t: {s: {} for s in sections} for t in a.trees}
        for r in range(a.runs):
            for s in sections:
                order = a.trees if r % 2 == 0 else a.trees[::-1]
                for t in order:
                    tmp = f"/tmp/oversub_{os.getpid()}.json"
                    cmd = [sys.executable, me, "--only", s, "--runs", "1", "--json", tmp, "--tree", t]
                    if a.pairs:
                        cmd += ["--pairs", a.pairs]
                    env = dict(os.environ, PYTHONPATH=t)
                    p = subprocess.run(cmd, cwd=t, env=env, capture_output=True, text=True)
                    if p.returncode:
                        sys.stderr.write(p.stderr)
                        raise SystemExit(f"run failed in {t}")
                    with open(tmp) as f:
                        one = json.load(f)["raw"][s]
                    os.unlink(tmp)
                    for case, runs in one.items():
                        raw[t][s].setdefault(case, []).extend(runs)
                    print(f"round {r + 1}/{a.runs} {s} {t} done (load {loadavg()})",
                          file=sys.stderr, flush=True)
        res = {"trees": a.trees, "raw": raw, "summary": {t: summarize(raw[t]) for t in a.trees}}
        for t in a.trees:
            print_summary(res["summary"][t], label=f"{t} ")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
