"""A three-stage NumPy pipeline whose middle stage runs "on another host",
behind a pair of ZeroMQ bridges (vringipc.bridge; pip install "vringipc[bridge]").

    host A: stage 1 (make frames) -> q_a_out -> [sender bridge] --tcp-->
    host B:                 [receiver bridge] -> q_b_in -> stage 2 (normalise)
            stage 2 -> q_b_out -> [sender bridge] --tcp-->
    host A:                 [receiver bridge] -> q_a_in -> stage 3 (check, sum)

Every stage only calls put()/get() on a local Queue; the bridges carry the
messages as they lie in shared memory (pickle bytes and the arrays as
out-of-band buffers) and never unpickle.  Here both "hosts" are processes on
127.0.0.1.  Between machines, run the bridges with the CLI instead:

    vringipc bridge --from queue:NAME --to tcp://hostB:5555                  # on A
    vringipc bridge --from tcp://0.0.0.0:5555 --allow-remote --to queue:NAME   # on B
"""

import os
import signal
import socket
import threading

import numpy as np

import vringipc
from vringipc import bridge

SHAPE, FRAMES = (128, 128), 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def in_child(fn, *args) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        finally:
            os._exit(code)
    return pid


def run_bridge(kind: str, local, endpoint: str) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    b = (bridge.Sender(local, endpoint) if kind == "send" else bridge.Receiver(local, endpoint))
    try:
        b.run(stop)
    finally:
        b.close()


def stage1(out: vringipc.Queue) -> None:               # host A: the source
    for i in range(FRAMES):
        out.put({"i": i, "frame": np.full(SHAPE, i, dtype=np.float32)})


def stage2(inp: vringipc.Queue, out: vringipc.Queue) -> None:        # host B
    for _ in range(FRAMES):
        item = inp.get(timeout=30)
        frame = item["frame"]
        item["frame"] = (frame - frame.mean()) + frame[0, 0] * 2     # "work"
        out.put(item)


def main() -> None:
    a_out, b_in, b_out, a_in = (vringipc.Queue() for _ in range(4))
    ep_ab = f"tcp://127.0.0.1:{free_port()}"          # A -> B
    ep_ba = f"tcp://127.0.0.1:{free_port()}"          # B -> A
    bridges = [in_child(run_bridge, "recv", b_in, ep_ab),     # on B
               in_child(run_bridge, "send", a_out, ep_ab),    # on A
               in_child(run_bridge, "recv", a_in, ep_ba),     # on A
               in_child(run_bridge, "send", b_out, ep_ba)]    # on B
    stages = [in_child(stage1, a_out), in_child(stage2, b_in, b_out)]
    total = 0.0
    try:
        for i in range(FRAMES):                       # stage 3, host A
            item = a_in.get(timeout=30)
            assert item["i"] == i and item["frame"][0, 0] == 2 * i, (i, item["i"])
            total += float(item["frame"].sum())
        for pid in stages:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "a stage failed"
    finally:
        for pid in bridges:
            os.kill(pid, signal.SIGTERM)
        for pid in bridges:
            os.waitpid(pid, 0)
        for q in (a_out, b_in, b_out, a_in):
            q.close()
    nbytes = FRAMES * int(np.prod(SHAPE)) * 4
    print(f"{FRAMES} frames of {SHAPE} float32 went A -> B -> A through two bridge pairs "
          f"({2 * nbytes / 1e6:.0f} MB over tcp://127.0.0.1), in order; checksum {total:.0f}")


if __name__ == "__main__":
    main()
