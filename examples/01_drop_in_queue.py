"""The drop-in swap: a multiprocessing worker pool fed by vringipc.Queue.

Change `from multiprocessing import Queue` to `from vringipc import Queue`,
nothing else.  Works with fork, spawn and forkserver.
"""

import multiprocessing as mp
import sys
from typing import Any

from vringipc import Queue  # was: from multiprocessing import Queue


def worker(tasks, results):
    while True:
        item = tasks.get()
        if item is None:
            break
        results.put((item, item * item))


def main(method: str = "spawn") -> None:
    ctx: Any = mp.get_context(method)      # typeshed says BaseContext, which lacks .Process
    tasks, results = Queue(), Queue()
    procs = [ctx.Process(target=worker, args=(tasks, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for i in range(1000):
        tasks.put(i)
    for _ in procs:
        tasks.put(None)
    squares = dict(results.get(timeout=30) for _ in range(1000))
    for p in procs:
        p.join()
    assert squares == {i: i * i for i in range(1000)}
    print(f"{method}: 1000 squares computed by {len(procs)} workers through vringipc.Queue")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "spawn")
