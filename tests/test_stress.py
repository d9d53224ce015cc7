"""Two-process stress tests of the ring core.

* ``test_parallel`` follows tools/virtio/vringh_test.c --parallel: the driver
  (parent) and the host (child) map the segment at different addresses (the
  child re-attaches by name), transfers alternate between readable chains
  (driver -> host) and writable chains (host echoes the last value back), the
  chain shape cycles through 1+2+1, 1+3, 4 and 1+1+1+1 bytes, and the driver
  checks data and in-order completion.  Peers run on different CPUs.  With and
  without EVENT_IDX and INDIRECT; over a million transfers in all.
* ``test_no_lost_wakeup`` follows ringtest --sleep: both sides always sleep on
  their eventfd (no spinning), with several batch sizes.  A lost wake-up shows
  up as a wait that times out while the peer has work pending.

Scale with VRINGIPC_STRESS_SCALE (default 1)."""

import array
import multiprocessing as mp
import os
import traceback

import pytest

from vringipc import Iov
from vringipc.ring import SharedRing

SCALE = float(os.environ.get("VRINGIPC_STRESS_SCALE", "1"))
SHAPES = [(1, 2, 1), (1, 3), (4,), (1, 1, 1, 1)]
WAIT = 10.0     # seconds: far longer than any legitimate wait; a timeout means a lost wake-up


def _pin(cpu):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def _addr(buf):
    import ctypes
    c = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(c)
    finally:
        del c


def _run_child(target, *args):
    """Run target(*args) in a forked child; returns the Process."""
    def wrapper(*a):
        try:
            target(*a)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    p = mp.get_context("fork").Process(target=wrapper, args=args, daemon=True)
    p.start()
    return p


def _join(p, timeout):
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join(5)
        raise AssertionError("child did not finish in time")
    assert p.exitcode == 0, f"child failed with exit code {p.exitcode}"


def _host_side(name, kick_fd, call_fd, total, parent_addr, spin):
    _pin(1)
    ring = SharedRing.attach(name, [kick_fd], [call_fd])   # a second, separate mapping
    try:
        assert _addr(ring.segment.buf) != parent_addr
        host = ring.host()
        riov, wiov = Iov(), Iov()
        last = b"\0\0\0\0"
        done = 0
        while done < total:
            head = host.getdesc(riov, wiov)
            if head is None:
                host.notify()
                if not host.wait(timeout=WAIT, spin=spin):
                    raise AssertionError(f"host: no chain for {WAIT}s after {done} (lost kick?)")
                continue
            if riov.nsegs:
                assert wiov.nsegs == 0
                data = riov.pull(5)
                assert len(data) == 4 and riov.remaining == 0
                last = data
                written = 0
            else:
                written = wiov.push(last)
                assert written == 4 and wiov.remaining == 0
            host.complete(head, written)
            done += 1
        host.notify()
    finally:
        ring.close()


def _driver_side(ring, total, spin):
    drv = ring.driver()
    r = ring.layout.rings[0]
    num = r.num
    stride = 16
    started = finished = 0
    while finished < total:
        progressed = False
        while started < total and started - finished < num:
            shape = SHAPES[(started // 4) % 4]
            base = r.win_off + (started % num) * stride
            segs, pos = [], base
            for ln in shape:
                segs.append((pos, ln))
                pos += ln
            if started % 2 == 0:
                ring.segment.buf[base:base + 4] = started.to_bytes(4, "little")
                head = drv.add(readable=segs, token=started)
            else:
                ring.segment.buf[base:base + 4] = b"\xff\xff\xff\xff"
                head = drv.add(writable=segs, token=started)
            if head is None:
                break
            started += 1
            progressed = True
        drv.kick()
        while True:
            got = drv.get_buf()
            if got is None:
                break
            token, ln = got
            assert token == finished, f"completed out of order: {token} != {finished}"
            base = r.win_off + (token % num) * stride
            if token % 2:
                assert ln == 4
                val = int.from_bytes(ring.segment.buf[base:base + 4], "little")
                assert val == token - 1, f"echo {val} != {token - 1}"
            else:
                assert ln == 0
            finished += 1
            progressed = True
        if not progressed and finished < total:
            if not drv.wait_used(timeout=WAIT, spin=spin):
                raise AssertionError(f"driver: nothing used for {WAIT}s at {finished} (lost call?)")
    return drv


@pytest.mark.timeout(240)
@pytest.mark.parametrize("event_idx", [True, False], ids=["eventidx", "flags"])
@pytest.mark.parametrize("indirect", [True, False], ids=["indirect", "direct"])
def test_parallel(event_idx, indirect):
    total = int(1_000_000 * SCALE)
    with SharedRing.create(num=256, arena_size=256 * 16 + 256 * 16 * 16, event_idx=event_idx,
                           indirect=indirect) as ring:
        child = _run_child(_host_side, ring.name, ring.kick_fds[0], ring.call_fds[0], total,
                           _addr(ring.segment.buf), 20e-6)
        try:
            _pin(0)
            drv = _driver_side(ring, total, 20e-6)
            assert drv.num_free == 256 and drv.in_flight == 0
        finally:
            os.sched_setaffinity(0, set(range(os.cpu_count())))
            _join(child, 60)


def _sleepy_host(name, kick_fd, call_fd, total, batch):
    _pin(1)
    ring = SharedRing.attach(name, [kick_fd], [call_fd])
    try:
        host = ring.host()
        dst = bytearray(8 * batch)
        lens = array.array("I", [0] * batch)
        expect = 0
        while expect < total:
            n = host.pull_many(dst, lens, batch)
            if n == 0:
                if not host.wait(timeout=WAIT, spin=0):
                    raise AssertionError(f"host: lost wake-up at {expect}")
                continue
            for i in range(n):
                assert lens[i] == 8
                assert int.from_bytes(dst[8 * i:8 * i + 8], "little") == expect
                expect += 1
    finally:
        ring.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("event_idx", [True, False], ids=["eventidx", "flags"])
def test_no_lost_wakeup(event_idx, batch):
    total = int(200_000 * SCALE)
    num = 64
    with SharedRing.create(num=num, slot_size=8, event_idx=event_idx, indirect=False) as ring:
        child = _run_child(_sleepy_host, ring.name, ring.kick_fds[0], ring.call_fds[0], total, batch)
        try:
            _pin(0)
            drv = ring.driver(slot_size=8)
            sent = 0
            src = bytearray(8 * batch)
            lens = array.array("I", [8] * batch)
            while sent < total:
                k = min(batch, total - sent)
                for i in range(k):
                    src[8 * i:8 * i + 8] = (sent + i).to_bytes(8, "little")
                n = drv.add_many_slots(src, lens, k)
                sent += n
                if n < k:
                    # ring full: must be woken by the host's call
                    if drv.reclaim() == 0:
                        if not drv.wait_used(timeout=WAIT, spin=0, delayed=True):
                            raise AssertionError(f"driver: lost wake-up at {sent}")
                        drv.reclaim()
            while drv.in_flight:
                if drv.reclaim() == 0 and not drv.wait_used(timeout=WAIT, spin=0):
                    raise AssertionError("driver: lost wake-up while draining")
        finally:
            os.sched_setaffinity(0, set(range(os.cpu_count())))
            _join(child, 60)
