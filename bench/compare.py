#!/usr/bin/env python3
"""The comparison behind the README's Performance section (issue 4).

    python bench/compare.py              # full run: bench/results/compare.json + bench/results/*.png
    python bench/compare.py --quick      # about 45 s (the tool prints its estimate)
    python bench/compare.py --runs 5     # any `vringipc bench compare` option

A thin wrapper around `vringipc bench compare` (vringipc/benchtool/) that
writes into bench/results/.  The histograms are inside the JSON, so no .hgrm
files are committed (add --hgrm-dir DIR to get them).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))     # this checkout's vringipc first

from vringipc.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    os.chdir(os.path.dirname(HERE))           # paths in the JSON relative to the repository
    out = os.path.join("bench", "results")
    defaults = ["--out", out, "--json", os.path.join(out, "compare.json")]
    if "--hgrm-dir" not in args:
        defaults.append("--no-hgrm")
    sys.exit(main(["bench", "compare"] + defaults + args))
