"""Helpers shared by the fork-based tests: forked children that are always
reaped, one-byte pipe signals between parent and child, and a polling wait.

Imported as a plain module (``from forking import Forked, Gate``): tests/ has
no __init__.py, so pytest's default "prepend" import mode puts tests/ on
sys.path (as for ring_model), and spawn/forkserver children inherit it.

Failures raise AssertionError explicitly rather than using ``assert``: pytest
rewrites asserts only in test modules and conftest, and ``-O`` strips them."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
import traceback

JOIN_TIMEOUT = 20.0      # Forked.join default
GATE_TIMEOUT = 10.0      # Gate.wait default
PIPE_TIMEOUT = 20.0      # Pipe.recv default
WAIT_FOR_TIMEOUT = 20.0  # wait_for default


class Forked:
    """fn(*args) in a forked child: exit status 0 if it returned, 1 if it raised
    (traceback on stderr).  Always reaped: join(), or kill+reap in kill() and
    on __exit__."""

    def __init__(self, fn, *args):
        self.status = None
        self.pid = os.fork()
        if self.pid == 0:                      # pragma: no cover - child
            code = 1
            try:
                fn(*args)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)

    def join(self, timeout: float = JOIN_TIMEOUT) -> int:
        """Exit code (or -signal) once the child is gone; kills it and fails after timeout."""
        if self.status is None:
            end = time.monotonic() + timeout
            while True:
                pid, st = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.status = st
                    break
                if time.monotonic() > end:
                    self.kill()
                    raise AssertionError(f"child {self.pid} did not finish within {timeout}s")
                select.select([], [], [], 0.005)
        return os.waitstatus_to_exitcode(self.status)

    def wait_exited_no_reap(self) -> None:
        """Block until the child has exited, leaving it a zombie (pid not recycled)."""
        os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)

    def kill(self) -> None:
        """SIGKILL and reap at once (a dead owner is recognised once reaped)."""
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            _, self.status = os.waitpid(self.pid, 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


@contextlib.contextmanager
def reaped():
    """Collects Forked children; kills and reaps whatever is left on exit."""
    kids: list[Forked] = []
    try:
        yield kids
    finally:
        for k in kids:
            k.kill()


class Gate:
    """A pipe for one-byte signals between parent and forked child."""

    def __init__(self):
        self.r, self.w = os.pipe()

    def set(self, b: bytes = b"x") -> None:
        os.write(self.w, b)

    def wait(self, timeout: float = GATE_TIMEOUT) -> bytes:
        """The byte sent by set(); fails if none arrives within timeout."""
        return self._read(timeout, "gate not set in time")

    def is_set(self) -> bool:
        """True if a byte is waiting (does not consume it)."""
        return bool(select.select([self.r], [], [], 0)[0])

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _read(self, timeout: float, missing: str) -> bytes:
        if not select.select([self.r], [], [], timeout)[0]:
            raise AssertionError(missing)
        return os.read(self.r, 1)


class Pipe(Gate):
    """A Gate spelled send()/recv() for one-byte messages (20 s default wait)."""

    def send(self, b: bytes) -> None:
        self.set(b)

    def recv(self, timeout: float = PIPE_TIMEOUT) -> bytes:
        return self._read(timeout, "no message from the other side")


def wait_for(cond, what: str, timeout: float = WAIT_FOR_TIMEOUT) -> None:
    """Poll cond() every millisecond; fails with `what` if still false after timeout."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def words(buf, fmt: str = "I") -> memoryview:
    """`buf` (shared memory) as an array of machine words: storing one item is
    one aligned store, so another process never reads half of it and a SIGKILL
    never leaves half of it.  struct.pack_into is not: it zeroes the field and
    then writes it a byte at a time, and a child killed in between leaves 0
    behind (a consumer's whole log lost that way was once taken for lost
    messages).  Native byte order, which the ring format already assumes."""
    return memoryview(buf).cast(fmt)
