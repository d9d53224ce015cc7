"""The hand-written stubs (vringipc/_ring.pyi) parse, and the examples
type-check against the package as a user's code would (mypy, when installed)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def test_stub_and_marker_are_shipped():
    assert (ROOT / "vringipc" / "py.typed").exists()
    stub = (ROOT / "vringipc" / "_ring.pyi").read_text()
    import vringipc._ring as ext
    # every public class of the extension has a stub
    for name in ("VringHost", "VringDriver", "Iov", "ChannelSender", "ChannelReceiver",
                 "MessageView", "Loan", "QueueCore", "HeldMessage", "SharedWords"):
        assert hasattr(ext, name) and f"class {name}" in stub, name


@pytest.mark.timeout(180)
def test_examples_typecheck():
    pytest.importorskip("mypy")
    res = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports",
                          "--follow-imports=silent", "--no-error-summary",
                          str(ROOT / "examples"), str(ROOT / "vringipc" / "_ring.pyi")],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
