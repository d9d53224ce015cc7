"""Ctrl-C gets through every blocking wait: spinning (GIL released, checked
between spin slices) and sleeping on an eventfd (poll returns EINTR and the
signal handler runs)."""

import signal
import subprocess
import sys
import textwrap

import pytest

CHILD = """
import sys, vringipc
what, spin = sys.argv[1], float(sys.argv[2])
if what == "channel":
    ch = vringipc.Channel(spin=spin)
    wait = ch.recv
elif what == "queue":
    q = vringipc.Queue(spin=spin)
    wait = q.get
else:
    from vringipc.ring import SharedRing
    ring = SharedRing.create(num=8, slot_size=8, backend="memfd")
    host = ring.host()
    wait = lambda: host.wait(spin=spin)
print("ready", flush=True)
try:
    wait()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(0)
print("returned?!", flush=True)
sys.exit(3)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["ring", "channel", "queue"])
@pytest.mark.parametrize("spin", [0.0, 30.0], ids=["sleeping", "spinning"])
def test_ctrl_c_interrupts_a_blocked_wait(what, spin):
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), what, str(spin)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        import time
        time.sleep(0.3)                      # let it reach the wait
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, (out, err)
    assert out.strip() == "interrupted"
