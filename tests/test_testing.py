"""The test suite's own guards (vringipc.testing): the /dev/shm leak check
counts only segments made by the checking process's tree."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from vringipc.segment import SHM_DIR, Segment, name_pid
from vringipc.testing import in_tree, shm_leak_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An unrelated program sharing /dev/shm: not forked by the test (started with
# exec before the check begins), it has a child create a named segment and
# exit without unlinking it, then removes the segment itself on request.
_OTHER_PROGRAM = textwrap.dedent("""
    import os, sys
    from vringipc.segment import Segment
    assert sys.stdin.readline() == "go\\n"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        seg = Segment.create(4096, backend="shm")
        os.write(w, seg.name.encode())
        os._exit(0)                      # its creator is gone; the segment stays
    os.close(w)
    name = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    print(name, flush=True)
    assert sys.stdin.readline() == "rm\\n"
    os.unlink("/dev/shm" + name)
    print("removed", flush=True)
""")


@pytest.mark.timeout(30)
def test_leak_check_ignores_an_unrelated_programs_segment():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    other = subprocess.Popen([sys.executable, "-c", _OTHER_PROGRAM], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        with shm_leak_check():                     # must not fail, nor remove it
            other.stdin.write("go\n")
            other.stdin.flush()
            name = other.stdout.readline().strip()
            assert os.path.exists(SHM_DIR + name)
            creator = name_pid(name)
            assert creator not in (os.getpid(), other.pid)
        assert os.path.exists(SHM_DIR + name)      # still there: not ours to clean up
        other.stdin.write("rm\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "removed"
    finally:
        other.kill()
        other.wait()
    assert not os.path.exists(SHM_DIR + name)


def _leak_in_forked_child() -> str:
    """A child of this process creates a named segment and exits."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # pragma: no cover - child
        try:
            seg = Segment.create(4096, backend="shm")
            os.write(w, seg.name.encode())
        finally:
            os._exit(0)
    os.close(w)
    name = os.read(r, 100).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return name


@pytest.mark.timeout(30)
def test_leak_check_catches_a_dead_childs_segment():
    name = None
    with pytest.raises(AssertionError, match="leaked shared-memory segments"):
        with shm_leak_check():
            name = _leak_in_forked_child()
            assert os.path.exists(SHM_DIR + name)
    assert name and not os.path.exists(SHM_DIR + name)   # the check removed it


@pytest.mark.timeout(30)
def test_leak_check_catches_own_segment():
    seg = None
    try:
        with pytest.raises(AssertionError, match="leaked"):
            with shm_leak_check():
                seg = Segment.create(4096, backend="shm")
        assert not os.path.exists(SHM_DIR + seg.name)
    finally:
        if seg is not None:
            seg.close()


def test_in_tree():
    me = os.getpid()
    assert in_tree(me, me, 0, set())
    assert in_tree(12345678, me, 0, {12345678})          # logged descendant, gone since
    assert not in_tree(12345678, me, 0, set())           # no such process, not logged
    assert not in_tree(1, me, 0, set())                  # init is nobody's descendant
    assert not in_tree(os.getppid(), me, 0, set())       # our parent is not in our tree
