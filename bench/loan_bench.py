#!/usr/bin/env python3
"""1 MiB messages through a Channel with no copy on the receiving side and no
intermediate buffer on the sending side: the producer writes the payload
straight into a loan (one memcpy into shared memory, as iceoryx2's benchmark
writes its payload into a loaned sample), the consumer reads a MessageView
(touching the first and last byte) and releases it.  Compared with the copying
send()/recv() of the same Channel in the same run.

    python bench/loan_bench.py [--seconds 2] [--runs 5] [--size 1048576]
"""

import argparse
import os
import statistics
import time

import vringipc


def _pin(cpu):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[cpu % len(cpus)]})


def one_run(size, seconds, zero_copy):
    ch = vringipc.Channel(capacity=16 * size, num=64, spin=1e-3)
    payload = os.urandom(size)
    pid = os.fork()
    if pid == 0:                                     # consumer
        code = 1
        try:
            _pin(1)
            while True:
                try:
                    if zero_copy:
                        with ch.recv_view(timeout=10) as v:
                            mv = memoryview(v)
                            _ = mv[0] + mv[-1]
                            mv.release()
                    else:
                        data = ch.recv(timeout=10)
                        _ = data[0] + data[-1]
                except vringipc.ChannelClosed:
                    break
            code = 0
        finally:
            os._exit(code)
    _pin(0)
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        if zero_copy:
            with ch.loan(size) as buf:
                buf[:] = payload                     # the one copy: into shared memory
        else:
            ch.send(payload)
        n += 1
    dt = time.perf_counter() - t0
    ch.close()                                       # consumer drains, then ChannelClosed
    os.waitpid(pid, 0)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return n / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    res = {"loan+view": [], "send+recv": []}
    for _ in range(a.runs):                          # interleaved runs
        res["loan+view"].append(one_run(a.size, a.seconds, True))
        res["send+recv"].append(one_run(a.size, a.seconds, False))
    for k, v in res.items():
        print(f"{k:10s} {a.size} B: {statistics.median(v) / 1e3:8.2f} k msg/s "
              f"[{min(v) / 1e3:.2f}-{max(v) / 1e3:.2f}]  "
              f"{statistics.median(v) * a.size / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
