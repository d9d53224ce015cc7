"""A three-stage NumPy pipeline whose middle stage runs "on another host",
behind a pair of ZeroMQ bridges (vringipc.bridge; pip install "vringipc[bridge]").

    host A: stage 1 (make frames) -> ch_a_out -> [sender bridge] --tcp-->
    host B:                 [receiver bridge] -> ch_b_in -> stage 2 (normalise)
            stage 2 -> ch_b_out -> [sender bridge] --tcp-->
    host A:                 [receiver bridge] -> ch_a_in -> stage 3 (check, sum)

Every stage only calls send()/recv() on a local Channel; the bridges carry the
messages.  Here both "hosts" are processes on 127.0.0.1.  Between machines,
run the bridges with the CLI instead:

    vringipc bridge --from channel:NAME --to tcp://hostB:5555            # on A
    vringipc bridge --from tcp://0.0.0.0:5555 --allow-remote --to channel:NAME  # on B
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


def stage1(out: vringipc.Channel) -> None:             # host A: the source
    for i in range(FRAMES):
        frame = np.full(SHAPE, i, dtype=np.float32)
        out.send(frame)                               # one copy, into shared memory


def stage2(inp: vringipc.Channel, out: vringipc.Channel) -> None:    # host B
    for _ in range(FRAMES):
        with inp.recv_view(timeout=30) as msg:        # no copy out of shared memory
            frame = np.frombuffer(msg, np.float32).reshape(SHAPE)
            result = (frame - frame.mean()) + frame[0, 0] * 2   # "work"
            del frame
        out.send(result)


def main() -> None:
    cap = 4 << 20
    a_out, b_in = vringipc.Channel(cap), vringipc.Channel(cap)
    b_out, a_in = vringipc.Channel(cap), vringipc.Channel(cap)
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
            with a_in.recv_view(timeout=30) as msg:
                frame = np.frombuffer(msg, np.float32)
                assert frame[0] == 2 * i, (i, frame[0])
                total += float(frame.sum())
                del frame
        for pid in stages:
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "a stage failed"
    finally:
        for pid in bridges:
            os.kill(pid, signal.SIGTERM)
        for pid in bridges:
            os.waitpid(pid, 0)
        for ch in (a_out, b_in, b_out, a_in):
            ch.close()
    nbytes = FRAMES * int(np.prod(SHAPE)) * 4
    print(f"{FRAMES} frames of {SHAPE} float32 went A -> B -> A through two bridge pairs "
          f"({2 * nbytes / 1e6:.0f} MB over tcp://127.0.0.1), in order; checksum {total:.0f}")


if __name__ == "__main__":
    main()
