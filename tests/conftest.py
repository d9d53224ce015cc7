import multiprocessing
import os
import time

import pytest

from vringipc.testing import live_children, shm_leak_check


@pytest.fixture(autouse=True)
def _no_leaks():
    """Every test: no new /dev/shm entries and no leftover child processes."""
    before = set(live_children())
    with shm_leak_check():
        yield
    deadline = time.monotonic() + 5
    while True:
        extra = [p for p in live_children() if p not in before]
        # multiprocessing's forkserver / resource tracker are long-lived helpers
        helpers = set()
        for p in extra:
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if b"forkserver" in cmd or b"resource_tracker" in cmd:
                helpers.add(p)
        extra = [p for p in extra if p not in helpers]
        if not extra or time.monotonic() > deadline:
            break
        multiprocessing.active_children()  # reaps finished mp children
        time.sleep(0.05)
    assert not extra, f"test left child processes running: {extra}"


def pytest_configure(config):
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
