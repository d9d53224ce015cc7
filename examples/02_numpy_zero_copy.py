"""A zero-copy NumPy pipeline: camera-sized frames from a producer process to
a consumer through a Channel, written in place (loan) and read in place
(recv_view): no copy on either side.
"""

import os

import numpy as np

import vringipc

SHAPE, DTYPE, FRAMES = (480, 640, 3), np.uint8, 200


def produce(ch: vringipc.Channel) -> None:
    nbytes = int(np.prod(SHAPE)) * np.dtype(DTYPE).itemsize
    for i in range(FRAMES):
        with ch.loan(nbytes) as buf:                  # shared memory, writable
            frame = np.frombuffer(buf, DTYPE).reshape(SHAPE)
            frame[...] = i % 256                      # "capture" straight into the ring
            del frame                                 # views must go before the commit
    ch.close()


def main() -> None:
    ch = vringipc.Channel(capacity=16 << 20)
    pid = os.fork()
    if pid == 0:
        try:
            produce(ch)
        finally:
            os._exit(0)
    total = 0
    for i in range(FRAMES):
        with ch.recv_view(timeout=30) as msg:         # read-only view of shared memory
            frame = np.frombuffer(msg, DTYPE).reshape(SHAPE)
            assert frame[0, 0, 0] == i % 256 and not frame.flags.writeable
            total += frame.nbytes
            del frame
    os.waitpid(pid, 0)
    ch.close()
    print(f"received {FRAMES} frames of {SHAPE} ({total / 1e6:.0f} MB) without copying")


if __name__ == "__main__":
    main()
