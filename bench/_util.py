"""Shared helpers of the benchmark scripts: a fork-based process pair with a
control channel, CPU pinning, statistics over repeated runs, machine info,
and compiling the C baselines.

Nothing here is timed: the measured loops live in the scripts themselves.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- pinning --------------------------------------------------------------------

def pick_cpus(pin: bool):
    """(cpu_parent, cpu_child) to pin the two processes to, or None.

    The first two CPUs of this process's affinity mask: on a 2-vCPU machine
    that is simply "one process per CPU"."""
    if not pin:
        return None
    avail = sorted(os.sched_getaffinity(0))
    if len(avail) < 2:
        return None
    return (avail[0], avail[1])


def pin_self(cpu) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


# --- a forked peer with a control channel ----------------------------------------

class Chan:
    """Length-prefixed JSON messages over a pair of pipe fds (control only:
    "go", results; never on a measured path)."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd

    def send(self, obj) -> None:
        data = json.dumps(obj).encode()
        buf = struct.pack("<I", len(data)) + data
        mv = memoryview(buf)
        while mv:
            mv = mv[os.write(self.wfd, mv):]

    def _readn(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = os.read(self.rfd, n - len(out))
            if not b:
                raise EOFError("peer closed the control channel")
            out += b
        return bytes(out)

    def recv(self):
        (n,) = struct.unpack("<I", self._readn(4))
        return json.loads(self._readn(n))

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout("benchmark step timed out")


class Pair:
    """Fork a child that runs ``child_main(chan)`` pinned to cpus[1]; the
    parent (already pinned to cpus[0] by the caller) talks to it through
    ``self.chan``.  Use as a context manager: on exit the child is told to
    stop (None), waited for, killed if it does not exit in time, and always
    reaped.  A watchdog alarm bounds the whole pair (parent and child)."""

    def __init__(self, child_main, cpus, timeout: int = 120):
        self.child_main = child_main
        self.cpus = cpus
        self.timeout = timeout
        self.pid = None
        self.chan = None

    def __enter__(self) -> "Pair":
        a2b_r, a2b_w = os.pipe()
        b2a_r, b2a_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child
            code = 70
            try:
                signal.signal(signal.SIGALRM, signal.SIG_DFL)   # watchdog kills us
                signal.alarm(self.timeout + 5)
                os.close(a2b_w)
                os.close(b2a_r)
                if self.cpus:
                    pin_self(self.cpus[1])
                self.child_main(Chan(a2b_r, b2a_w))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        self.pid = pid
        os.close(a2b_r)
        os.close(b2a_w)
        self.chan = Chan(b2a_r, a2b_w)
        self._old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(self.timeout)
        return self

    def __exit__(self, et, ev, tb) -> None:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self._old)
        try:
            if et is None:
                self.chan.send(None)
        except OSError:
            pass
        status = None
        try:
            deadline = time.monotonic() + (5 if et is None else 0.5)
            while time.monotonic() < deadline:
                pid, st = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    status = st
                    break
                time.sleep(0.005)
            if status is None:
                os.kill(self.pid, signal.SIGKILL)
                _, status = os.waitpid(self.pid, 0)
        finally:
            self.chan.close()
        if et is None and not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            raise RuntimeError(f"benchmark child failed (wait status {status})")


# --- statistics ---------------------------------------------------------------------

PCTS = (50, 90, 99, 99.9)


def spread(values):
    """median, min, max and all values of a list of per-run figures."""
    v = [float(x) for x in values]
    return {"median": float(np.median(v)), "min": min(v), "max": max(v), "runs": v}


def percentiles_ns(samples) -> dict:
    a = np.asarray(samples)
    out = {f"p{p:g}": float(np.percentile(a, p)) for p in PCTS}
    out["max"] = float(a.max())
    out["min"] = float(a.min())
    out["mean"] = float(a.mean())
    out["n"] = int(a.size)
    return out


def summarize_latency(runs) -> dict:
    """runs: list of per-run percentile dicts (ns).  Median and range of each
    percentile over runs, max over all runs."""
    out = {}
    for key in [f"p{p:g}" for p in PCTS] + ["mean", "min"]:
        out[key] = spread([r[key] for r in runs])
    out["max"] = {"median": float(np.median([r["max"] for r in runs])),
                  "min": min(r["max"] for r in runs), "max": max(r["max"] for r in runs),
                  "runs": [r["max"] for r in runs]}
    out["samples_per_run"] = runs[0]["n"]
    out["nruns"] = len(runs)
    return out


# --- machine --------------------------------------------------------------------------

def _cmd(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    model, flags, mhz = None, "", None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k == "model name" and model is None:
                    model = v.strip()
                elif k == "flags" and not flags:
                    flags = v
                elif k == "cpu MHz" and mhz is None:
                    mhz = float(v)
    except OSError:
        pass
    info = {
        "cpu_model": model,
        "cpu_mhz": mhz,
        "hypervisor": " hypervisor " in f" {flags} ",
        "cores_online": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        import Cython
        info["cython"] = Cython.__version__
    except ImportError:
        info["cython"] = None
    info["numpy"] = np.__version__
    gcc = shutil.which("gcc")
    info["gcc"] = _cmd([gcc, "--version"]).splitlines()[0] if gcc else None
    info["git_commit"] = _cmd(["git", "-C", REPO, "rev-parse", "HEAD"])
    info["git_dirty"] = bool(_cmd(["git", "-C", REPO, "status", "--porcelain",
                                   "--untracked-files=no"]))
    return info


# --- C baselines ---------------------------------------------------------------------

def compile_c(sources, outdir):
    """gcc -O2 each bench/c/*.c into outdir.  {name: path} or (None, reason)."""
    gcc = shutil.which("gcc")
    if not gcc:
        return None, "gcc not found: C baselines skipped"
    cdir = os.path.join(REPO, "bench", "c")
    out = {}
    for src in sources:
        exe = os.path.join(outdir, os.path.splitext(src)[0])
        r = subprocess.run([gcc, "-O2", "-Wall", "-o", exe, os.path.join(cdir, src)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"gcc failed on {src}: {r.stderr.strip()[:500]}"
        out[os.path.splitext(src)[0]] = exe
    return out, None


def run_c(exe, n, cpus, timeout=120) -> dict:
    args = [exe, str(n)] + ([str(cpus[0]), str(cpus[1])] if cpus else ["-1", "-1"])
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- how busy the rest of the machine was ---------------------------------------------

def cpu_snapshot() -> dict:
    """/proc/stat CPU times (seconds) + this process's and its reaped
    children's CPU time + wall clock."""
    tck = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    t = os.times()
    return {"busy": (user + nice + system + irq + softirq) / tck, "steal": steal / tck,
            "ours": t.user + t.system + t.children_user + t.children_system,
            "wall": time.monotonic()}


def cpu_load(a: dict, b: dict) -> dict:
    """CPUs kept busy by other processes between two snapshots (total busy
    time minus ours), and steal time, as average CPU counts."""
    wall = b["wall"] - a["wall"]
    others = (b["busy"] - a["busy"]) - (b["ours"] - a["ours"])
    return {"wall_s": round(wall, 2), "ncpu": os.cpu_count(),
            "ours_cpus": round((b["ours"] - a["ours"]) / wall, 3),
            "others_cpus": round(max(others, 0.0) / wall, 3),
            "steal_cpus": round((b["steal"] - a["steal"]) / wall, 3)}
