"""Two unrelated processes (no fork, no common multiprocessing parent) share a
Channel: the descriptors travel over a Unix socket (SCM_RIGHTS), as vhost-user
does.  This script starts the second process with subprocess to show it.
"""

import os
import subprocess
import sys
import tempfile

import vringipc
from vringipc import handoff

CONSUMER = """
import sys, vringipc.handoff as h
ch = h.connect(sys.argv[1])
n = 0
while True:
    try:
        ch.recv(timeout=30)
    except EOFError:          # vringipc.ChannelClosed: the producer closed
        break
    n += 1
print(n)
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "demo.sock")
        ch = vringipc.Channel()
        with handoff.Offer(ch, path) as offer:
            child = subprocess.Popen([sys.executable, "-c", CONSUMER, path], stdout=subprocess.PIPE)
            offer.serve(count=1, timeout=30)
        for i in range(10_000):
            ch.send(b"record %d" % i)
        ch.close()
        out, _ = child.communicate(timeout=60)
    print(f"the unrelated process received {int(out)} messages")


if __name__ == "__main__":
    main()
