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

import multiprocessing
import socket

import numpy as np

import vringipc
from vringipc import bridge

SHAPE, FRAMES = (128, 128), 300
FORK = multiprocessing.get_context("fork")     # the Queues reach the children by fork


def start(fn, *args):
    p = FORK.Process(target=fn, args=args)
    p.start()
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_bridge(kind: str, local, endpoint: str) -> None:
    b = bridge.Sender(local, endpoint) if kind == "send" else bridge.Receiver(local, endpoint)
    bridge.run_until_signal(b)                  # until SIGTERM


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
    bridges = [start(run_bridge, "recv", b_in, ep_ab),        # on B
               start(run_bridge, "send", a_out, ep_ab),       # on A
               start(run_bridge, "recv", a_in, ep_ba),        # on A
               start(run_bridge, "send", b_out, ep_ba)]       # on B
    stages = [start(stage1, a_out), start(stage2, b_in, b_out)]
    total = 0.0
    try:
        for i in range(FRAMES):                       # stage 3, host A
            item = a_in.get(timeout=30)
            assert item["i"] == i and item["frame"][0, 0] == 2 * i, (i, item["i"])
            total += float(item["frame"].sum())
        for p in stages:
            p.join(30)
            assert p.exitcode == 0, "a stage failed"
    finally:
        for p in bridges + stages:
            p.terminate()                             # SIGTERM: the bridges stop cleanly
        for p in bridges + stages:
            p.join(30)
        for q in (a_out, b_in, b_out, a_in):
            q.close()
    nbytes = FRAMES * int(np.prod(SHAPE)) * 4
    print(f"{FRAMES} frames of {SHAPE} float32 went A -> B -> A through two bridge pairs "
          f"({2 * nbytes / 1e6:.0f} MB over tcp://127.0.0.1), in order; checksum {total:.0f}")


if __name__ == "__main__":
    main()
