"""A short two-process demo of the ring core, with a raw os.pipe baseline
measured in the same run.  ``python -m vringipc demo``.

It moves 64-byte messages producer -> consumer through a split ring in shared
memory (batch API, EVENT_IDX, eventfd wake-ups), then through a pipe, and does
a 64-byte ping-pong both ways.  The numbers are indicative; bench/ has the
careful versions (repeats, medians, pinning options)."""

from __future__ import annotations

import array
import os
import time

from vringipc.ring import SharedRing

MSG = 64


def _pin(i: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[i % len(cpus)]})


def _fork(fn, *args) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        finally:
            os._exit(code)
    return pid


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("demo child failed")


# --- throughput -------------------------------------------------------------------

def _ring_consumer(ring: SharedRing, total: int) -> None:
    _pin(1)
    host = ring.host()
    batch = ring.layout.rings[0].num
    dst = bytearray(MSG * batch)
    lens = array.array("I", [0] * batch)
    got = 0
    while got < total:
        n = host.pull_many(dst, lens, batch)
        if n == 0:
            host.wait(timeout=10)
            continue
        # check the sequence numbers in the first and last message of the batch
        first = int.from_bytes(dst[:8], "little")
        lastm = int.from_bytes(dst[MSG * (n - 1):MSG * (n - 1) + 8], "little")
        if first != got or lastm != got + n - 1:
            raise AssertionError(f"out of sequence at {got}")
        got += n


def ring_throughput(total: int = 2_000_000, num: int = 1024) -> float:
    with SharedRing.create(num=num, slot_size=MSG, indirect=False) as ring:
        pid = _fork(_ring_consumer, ring, total)
        _pin(0)
        drv = ring.driver(slot_size=MSG)
        batch = num // 2
        src = bytearray(MSG * batch)
        lens = array.array("I", [MSG] * batch)
        seq = memoryview(src).cast("Q")      # each message starts with its sequence number
        sent = 0
        t0 = time.perf_counter()
        while sent < total:
            k = min(batch, total - sent)
            seq[0:k * (MSG // 8):MSG // 8] = array.array("Q", range(sent, sent + k))
            n = drv.add_many_slots(src, lens, k)
            sent += n
            # ring full: reclaim, or sleep until the consumer frees 3/4 of it
            if n < k and drv.reclaim() == 0:
                drv.wait_used(timeout=10, delayed=True)
            drv.reclaim()
        while drv.in_flight:
            if drv.reclaim() == 0:
                drv.wait_used(timeout=10)
        dt = time.perf_counter() - t0
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        _reap(pid)
    return total / dt


def _pipe_consumer(r: int, total: int) -> None:
    _pin(1)
    want = total * MSG
    got = 0
    while got < want:
        b = os.read(r, min(1 << 16, want - got))
        if not b:
            raise EOFError
        got += len(b)


def pipe_throughput(total: int = 300_000) -> float:
    r, w = os.pipe()
    pid = _fork(_pipe_consumer, r, total)
    os.close(r)
    _pin(0)
    msg = bytes(MSG)
    t0 = time.perf_counter()
    for _ in range(total):
        os.write(w, msg)
    os.close(w)
    _reap(pid)
    dt = time.perf_counter() - t0
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return total / dt


# --- ping-pong ----------------------------------------------------------------------

def _ring_echo(ring: SharedRing, n: int, spin: float) -> None:
    _pin(1)
    host = ring.host(0)
    back = ring.driver(1, slot_size=MSG)
    from vringipc import Iov
    riov = Iov()
    for _ in range(n):
        while True:
            head = host.getdesc(riov)
            if head is not None:
                break
            host.wait(timeout=10, spin=spin)
        data = riov.pull()
        host.complete(head)
        back.reclaim()
        back.add_slot(data)
        back.kick()


def ring_pingpong(n: int = 20_000, spin: float = 1.0) -> list[float]:
    from vringipc import Iov
    with SharedRing.create(num=64, slot_size=MSG, nrings=2, indirect=False) as ring:
        pid = _fork(_ring_echo, ring, n, spin)
        _pin(0)
        out = ring.driver(0, slot_size=MSG)
        host = ring.host(1)
        riov = Iov()
        msg = bytes(MSG)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            out.reclaim()
            out.add_slot(msg)
            out.kick()
            while True:
                head = host.getdesc(riov)
                if head is not None:
                    break
                host.wait(timeout=10, spin=spin)
            riov.pull()
            host.complete(head)
            host.notify()
            samples.append(time.perf_counter_ns() - t0)
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        _reap(pid)
    return samples


def _pipe_echo(r: int, w: int, n: int) -> None:
    _pin(1)
    for _ in range(n):
        os.write(w, os.read(r, MSG))


def pipe_pingpong(n: int = 20_000) -> list[float]:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = _fork(_pipe_echo, r1, w2, n)
    _pin(0)
    msg = bytes(MSG)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        os.write(w1, msg)
        os.read(r2, MSG)
        samples.append(time.perf_counter_ns() - t0)
    _reap(pid)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    return samples


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0


def main(quick: bool = False) -> int:
    scale = 0.1 if quick else 1.0
    print(f"vringipc demo: two processes, {MSG}-byte messages, {os.cpu_count()} CPUs")
    ring_tp = ring_throughput(int(2_000_000 * scale))
    pipe_tp = pipe_throughput(int(300_000 * scale))
    print(f"  throughput  ring (batch API)   {ring_tp / 1e6:8.2f} M msg/s")
    print(f"  throughput  os.pipe            {pipe_tp / 1e6:8.2f} M msg/s   "
          f"(ring is {ring_tp / pipe_tp:.1f}x)")
    n = int(20_000 * scale)
    spin = ring_pingpong(n, spin=1.0)
    block = ring_pingpong(max(n // 4, 500), spin=0.0)
    pipe = pipe_pingpong(max(n // 4, 500))
    print("  round trip (p50 / p99, us):")
    print(f"    ring busy-poll              {_pct(spin, .5):8.2f} / {_pct(spin, .99):8.2f}")
    print(f"    ring blocking (eventfd)     {_pct(block, .5):8.2f} / {_pct(block, .99):8.2f}")
    print(f"    os.pipe blocking            {_pct(pipe, .5):8.2f} / {_pct(pipe, .99):8.2f}")
    return 0
