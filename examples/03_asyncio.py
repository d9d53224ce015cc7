"""vringipc + asyncio: await messages from other processes without blocking
the event loop.

Two things happen at once on one event loop (uvloop if installed):

* a producer process streams 1 KiB frames through a Channel; the loop reads
  them zero-copy with ``await AsyncChannel.recv_view()`` until the producer
  closes the channel (ChannelClosed);
* the loop hands jobs to a worker process through a bounded Queue
  (``await AsyncQueue.put``, which waits asynchronously while the queue is
  full) and collects the results from a second Queue (``await get()``);

while a heartbeat coroutine ticks every 10 ms: its count shows that the loop
stayed responsive the whole time.  Finishes in a few seconds.

    python examples/03_asyncio.py
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import struct
import time
import zlib

from vringipc import Channel, ChannelClosed, Queue
from vringipc.aio import AsyncChannel, AsyncQueue

FRAMES = 20_000
FRAME_SIZE = 1024
JOBS = 2_000
HEADER = struct.Struct("<II")          # frame number, crc32 of the payload


def frame_producer(ch: Channel, n: int) -> None:
    """Child process: send n frames (blocking API), then close."""
    for i in range(n):
        payload = bytes([i & 0xFF]) * (FRAME_SIZE - HEADER.size)
        ch.send(HEADER.pack(i, zlib.crc32(payload)) + payload)
    ch.close()


def square_worker(jobs: Queue, results: Queue) -> None:
    """Child process: square numbers until None arrives."""
    for x in iter(jobs.get, None):
        results.put((x, x * x))


async def heartbeat(state: dict) -> None:
    while True:
        state["beats"] += 1
        await asyncio.sleep(0.01)


async def read_frames(ach: AsyncChannel) -> tuple[int, int]:
    frames = nbytes = 0
    while True:
        try:
            msg = await ach.recv_view()
        except ChannelClosed:
            return frames, nbytes
        with msg:
            mv = memoryview(msg)
            seq, crc = HEADER.unpack_from(mv)
            assert seq == frames, f"frame {seq} out of order (expected {frames})"
            assert zlib.crc32(mv[HEADER.size:]) == crc, f"frame {seq} corrupted"
            frames += 1
            nbytes += len(mv)
            mv.release()


async def run_jobs(jobs: AsyncQueue, results: AsyncQueue) -> int:
    async def feed():
        for x in range(JOBS):
            await jobs.put(x)            # waits (asynchronously) while 64 are queued
        await jobs.put(None)

    feeder = asyncio.create_task(feed())
    total = 0
    for _ in range(JOBS):
        x, sq = await results.get()
        assert sq == x * x
        total += sq
    await feeder
    return total


async def main_async(ch: Channel, jobs: Queue, results: Queue) -> None:
    state = {"beats": 0}
    beat = asyncio.create_task(heartbeat(state))
    t0 = time.perf_counter()
    async with AsyncChannel(ch) as ach, AsyncQueue(jobs) as ajobs, \
            AsyncQueue(results) as aresults:
        (frames, nbytes), total = await asyncio.wait_for(
            asyncio.gather(read_frames(ach), run_jobs(ajobs, aresults)), timeout=60)
    dt = time.perf_counter() - t0
    beat.cancel()
    print(f"channel: {frames} frames, {nbytes / 1e6:.1f} MB received zero-copy, "
          f"all in order with valid checksums")
    print(f"queue:   {JOBS} jobs squared by a worker process, sum of squares {total} "
          f"(expected {sum(x * x for x in range(JOBS))})")
    print(f"loop:    {type(asyncio.get_running_loop()).__module__} loop, heartbeat ticked "
          f"{state['beats']} times in {dt:.2f} s (every 10 ms => never blocked)")


def main() -> None:
    ch = Channel(capacity=1 << 20)
    jobs = Queue(maxsize=64)
    results = Queue()
    procs = [mp.Process(target=frame_producer, args=(ch, FRAMES)),
             mp.Process(target=square_worker, args=(jobs, results))]
    for p in procs:
        p.start()
    try:
        try:
            import uvloop
            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            runner.run(main_async(ch, jobs, results))
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    print("children exit codes:", [p.exitcode for p in procs])


if __name__ == "__main__":
    main()
