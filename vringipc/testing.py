"""Test helpers shipped with the package (as iceoryx2's testing module does):
unique names, a /dev/shm leak check, and process-cleanup checks.

Not part of the stable API; used by vringipc's own test suite."""

from __future__ import annotations

import contextlib
import os
import secrets

from vringipc.segment import NAME_PREFIX, SHM_DIR, name_pid

__all__ = ["unique_name", "shm_entries", "shm_leak_check", "live_children", "track_descendants",
           "in_tree"]


def unique_name(tag: str = "t") -> str:
    """A segment name unique to this test run, in the generated format (so the
    leak check can tell which process made it).  `tag` is accepted for
    readability of call sites only."""
    return f"{NAME_PREFIX}{os.getpid():x}_{secrets.token_hex(6)}"


def shm_entries() -> set[str]:
    """vringipc's entries in /dev/shm (names as '/vr_...')."""
    try:
        return {"/" + n for n in os.listdir(SHM_DIR) if ("/" + n).startswith(NAME_PREFIX)}
    except FileNotFoundError:
        return set()


# --- the test's own process tree --------------------------------------------
#
# A segment name carries its creator's pid.  The leak check counts a new
# segment only when that pid belongs to the checking process's tree: the
# process itself, a process forked (at any depth) since the check began, or a
# process started since then that is still alive and descends from it.
# Forked descendants are recorded by an at-fork hook that appends the child's
# pid to a log file (they may be gone by the time the check runs); processes
# started with spawn / forkserver are recorded when their Process.start()
# returns.  A segment made by an unrelated program sharing /dev/shm, even one
# whose creator has exited, is none of the test's business.

_pidlog: str | None = None


def _log_pid(pid: int) -> None:
    if _pidlog is None:
        return
    try:
        fd = os.open(_pidlog, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return
    try:
        os.write(fd, b"%d\n" % pid)
    except OSError:
        pass
    finally:
        os.close(fd)


def _after_fork_in_child() -> None:
    _log_pid(os.getpid())


def _remove_pidlog(creator: int, path: str) -> None:
    if os.getpid() == creator:                # not in a forked child exiting normally
        with contextlib.suppress(OSError):
            os.unlink(path)


def track_descendants() -> None:
    """Start recording the pids of this process's descendants (idempotent)."""
    global _pidlog
    if _pidlog is not None:
        return
    import atexit
    import multiprocessing.process
    import tempfile
    fd, _pidlog = tempfile.mkstemp(prefix="vringipc-test-pids-")
    os.close(fd)
    atexit.register(_remove_pidlog, os.getpid(), _pidlog)
    os.register_at_fork(after_in_child=_after_fork_in_child)
    start = multiprocessing.process.BaseProcess.start

    def start_and_log(self):
        start(self)
        if self.pid is not None:
            _log_pid(self.pid)
    multiprocessing.process.BaseProcess.start = start_and_log


def _pidlog_size() -> int:
    try:
        return os.path.getsize(_pidlog) if _pidlog else 0
    except OSError:
        return 0


def _logged_pids(since: int) -> set[int]:
    if not _pidlog:
        return set()
    try:
        with open(_pidlog, "rb") as f:
            f.seek(since)
            return {int(x) for x in f.read().split()}
    except OSError:
        return set()


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19])


def _boot_ticks_now() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


def in_tree(pid: int, root: int, since_ticks: int, logged: set[int]) -> bool:
    """Whether `pid` is `root`, a logged descendant, or a live process started
    at or after `since_ticks` whose ancestors lead to `root`."""
    if pid == root or pid in logged:
        return True
    st = _stat(pid)
    if st is None or st[1] < since_ticks:
        return False
    for _ in range(64):                       # walk up the parents
        if st is None:
            return False
        if st[0] == root:
            return True
        if st[0] <= 1:
            return False
        st = _stat(st[0])
    return False


@contextlib.contextmanager
def shm_leak_check():
    """Fail if the block leaves new vringipc entries in /dev/shm (removing them).

    Only entries made by this process's own tree during the block count (see
    above); other programs' segments are left alone."""
    me = os.getpid()
    track_descendants()
    mark = _pidlog_size()
    since = _boot_ticks_now() - 1
    before = shm_entries()
    yield
    logged = _logged_pids(mark)
    leaked = set()
    for name in shm_entries() - before:
        pid = name_pid(name)
        # Names not in the generated format belong to some other program
        # sharing /dev/shm; ours always carry the creator's pid.
        if pid is not None and in_tree(pid, me, since, logged):
            leaked.add(name)
    for name in leaked:
        with contextlib.suppress(OSError):
            os.unlink(SHM_DIR + name)
    if leaked:
        raise AssertionError(f"leaked shared-memory segments: {sorted(leaked)}")


def live_children() -> list[int]:
    """Pids of this process's children that still exist (zombies included)."""
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:  # pragma: no cover - non-Linux
        return []
