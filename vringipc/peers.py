"""Process liveness: who is attached to a segment, and are they still alive.

A process is identified by (pid, start time), the start time being field 22 of
/proc/PID/stat (clock ticks since boot), so a recycled pid is never mistaken
for the original process.  Waiting code watches a peer with a pidfd
(``os.pidfd_open``), which becomes readable when the process exits: no busy
loop, no heartbeat needed.

Liveness blocks live in the segment header (vringipc.layout PEER_*); their
words are written with atomic stores through SharedWords.
"""

from __future__ import annotations

import os

from vringipc import layout as L

__all__ = ["start_time", "alive", "Identity", "claim", "read_peer", "open_pidfd"]


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    rest = stat[stat.rindex(b")") + 2:].split()
    if rest[0] in (b"Z", b"X"):           # zombie / dead: as good as gone
        return None
    return int(rest[19])                 # field 22 overall


def alive(pid: int, start: int | None = None) -> bool:
    """True if pid runs and (when given) started at `start`."""
    if pid <= 0:
        return False
    st = start_time(pid)
    if st is None:
        return False
    return start is None or start == 0 or st == start


class Identity:
    """(pid, start time) of the calling process, cached per process."""

    _cache: tuple[int, int] | None = None

    @classmethod
    def me(cls) -> tuple[int, int]:
        pid = os.getpid()
        if cls._cache is None or cls._cache[0] != pid:
            cls._cache = (pid, start_time(pid) or 0)
        return cls._cache


def claim(words, block_off: int) -> None:
    """Record this process in a liveness block (pid, start, epoch+1, ATTACHED)."""
    pid, st = Identity.me()
    words.store64(block_off + L.PEER_START, st)
    words.store32(block_off + L.PEER_STATE, L.PEER_ATTACHED)
    words.add32(block_off + L.PEER_EPOCH, 1)
    words.store32(block_off + L.PEER_PID, pid)


def release(words, block_off: int) -> None:
    """Mark a clean detach (state CLOSED)."""
    words.store32(block_off + L.PEER_STATE, L.PEER_CLOSED)


def read_peer(words, block_off: int) -> tuple[int, int, int]:
    """(pid, start time, state) of a liveness block."""
    return (words.load32(block_off + L.PEER_PID), words.load64(block_off + L.PEER_START),
            words.load32(block_off + L.PEER_STATE))


def open_pidfd(pid: int, start: int | None = None) -> int:
    """A pidfd for (pid, start), or -1 if that process is already gone."""
    if pid <= 0:
        return -1
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return -1
    # The pid might have been recycled between reading it and opening it.
    if not alive(pid, start):
        os.close(fd)
        return -1
    return fd
