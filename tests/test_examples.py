"""Every example runs end to end (in a subprocess, with a timeout) and says
what it did."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path):
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=110)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip(), "an example should print what it did"


def test_there_are_examples():
    assert len(EXAMPLES) >= 3
