"""Test helpers shipped with the package (as iceoryx2's testing module does):
unique names, a /dev/shm leak check, and process-cleanup checks.

Not part of the stable API; used by vringipc's own test suite."""

from __future__ import annotations

import contextlib
import os
import secrets

from vringipc.segment import NAME_PREFIX, SHM_DIR, name_pid

__all__ = ["unique_name", "shm_entries", "shm_leak_check", "live_children"]


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def shm_leak_check():
    """Fail if the block leaves new vringipc entries in /dev/shm (removing them).

    Only entries this process (or a process that has since exited) created
    count, so tests of other processes running at the same time are ignored."""
    me = os.getpid()
    before = shm_entries()
    yield
    leaked = set()
    for name in shm_entries() - before:
        pid = name_pid(name)
        # Names not in the generated format belong to some other program
        # sharing /dev/shm; ours always carry the creator's pid.
        if pid is not None and (pid == me or not _pid_alive(pid)):
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
