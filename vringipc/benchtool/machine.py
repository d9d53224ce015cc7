"""What the figures were measured on: CPU, cores, kernel, Python, package
versions, how the extension was built, and how busy the machine was."""

from __future__ import annotations

import os
import platform
import sys
import sysconfig
import time

__all__ = ["machine_info", "package_versions", "build_info", "CpuMeter"]

_PACKAGES = ("vringipc", "numpy", "hdrhistogram", "matplotlib", "Cython", "posix_ipc",
             "pyzmq", "faster-fifo", "iceoryx2")


def _cpuinfo() -> dict:
    model, flags, mhz = None, "", None
    cores = set()
    try:
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                k, _, v = line.partition(":")
                k, v = k.strip(), v.strip()
                if k == "model name" and model is None:
                    model = v
                elif k == "flags" and not flags:
                    flags = v
                elif k == "cpu MHz" and mhz is None:
                    mhz = float(v)
                elif k == "physical id":
                    phys = v
                elif k == "core id":
                    core = v
                elif not k and phys is not None:
                    cores.add((phys, core))
                    phys = core = None
    except OSError:
        pass
    return {"cpu_model": model, "cpu_mhz": mhz, "physical_cores": len(cores) or None,
            "hypervisor": "hypervisor" in flags.split()}


def package_versions() -> dict:
    from importlib import metadata
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["vringipc"] is None:              # running from a source tree
        try:
            import vringipc
            out["vringipc"] = vringipc.__version__ + " (source tree)"
        except Exception:
            pass
    try:
        import zmq
        out["libzmq"] = zmq.zmq_version()
    except Exception:
        out["libzmq"] = None
    return out


def build_info() -> dict:
    """How this Python and the vringipc extension were built.  The extension's
    own flags are setup.py's (-O3 -std=gnu11 unless VRINGIPC_DEBUG=1 /
    VRINGIPC_ASAN=1 at build time); those variables, if set now, are shown."""
    info = {
        "python_cc": sysconfig.get_config_var("CC"),
        "python_cflags": sysconfig.get_config_var("CFLAGS"),
        "python_compiler": platform.python_compiler(),
        "build_env": {k: os.environ[k] for k in ("VRINGIPC_DEBUG", "VRINGIPC_ASAN", "CFLAGS")
                      if k in os.environ},
    }
    try:
        import vringipc._ring as ext
        st = os.stat(ext.__file__)
        info["extension"] = ext.__file__
        info["extension_mtime"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(st.st_mtime))
        info["default_spin_ns"] = getattr(ext, "DEFAULT_SPIN_NS", None)
    except Exception as e:
        info["extension"] = f"not importable: {e}"
    return info


def _git_commit() -> str | None:
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        r = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"],
                           capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    u = platform.uname()
    info = _cpuinfo()
    info.update({
        "cores_online": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "kernel": u.release,
        "os": f"{u.system} {u.version}",
        "arch": u.machine,
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "packages": package_versions(),
        "build": build_info(),
        "vringipc_git": _git_commit(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    })
    return info


class CpuMeter:
    """CPU time used by *other* processes on the machine during a run
    (system busy time from /proc/stat minus this process tree's), in CPUs."""

    def __init__(self):
        self.a = self._snap()

    @staticmethod
    def _snap() -> dict:
        tck = os.sysconf("SC_CLK_TCK")
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            v = [0] * 8
        user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
        t = os.times()
        return {"busy": (user + nice + system + irq + softirq) / tck, "steal": steal / tck,
                "ours": t.user + t.system + t.children_user + t.children_system,
                "wall": time.monotonic()}

    def read(self) -> dict:
        b = self._snap()
        a = self.a
        wall = max(b["wall"] - a["wall"], 1e-9)
        others = (b["busy"] - a["busy"]) - (b["ours"] - a["ours"])
        return {"wall_s": round(wall, 2), "ncpu": os.cpu_count(),
                "ours_cpus": round((b["ours"] - a["ours"]) / wall, 3),
                "others_cpus": round(max(others, 0.0) / wall, 3),
                "steal_cpus": round((b["steal"] - a["steal"]) / wall, 3),
                "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
