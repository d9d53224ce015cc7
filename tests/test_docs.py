"""The documentation stands on its own: every relative link in README.md and
docs/*.md (and the other Markdown files shipped in the repository) names a
file or directory inside the repository."""

from __future__ import annotations

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# [text](target) and ![alt](target), with an optional "title"
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files() -> list[str]:
    files = [os.path.join(REPO, "README.md")]
    for pattern in ("docs/*.md", "tools/*.md", "bench/*.md", "examples/*.md"):
        files += sorted(glob.glob(os.path.join(REPO, pattern)))
    return [f for f in files if os.path.exists(f)]


def relative_links(path: str) -> list[str]:
    with open(path) as f:
        text = f.read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)      # code blocks hold no links
    out = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue                                       # http:, mailto:, in-page anchors
        out.append(target.split("#", 1)[0])
    return out


def test_finds_links():
    assert "docs/BENCH.md" in relative_links(os.path.join(REPO, "README.md"))
    assert len(markdown_files()) >= 5


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve_inside_the_repository(path):
    bad = []
    for target in relative_links(path):
        full = os.path.realpath(os.path.join(os.path.dirname(path), target))
        if not (full == REPO or full.startswith(REPO + os.sep)):
            bad.append(f"{target} (outside the repository)")
        elif not os.path.exists(full):
            bad.append(f"{target} (missing)")
    assert not bad, f"{os.path.relpath(path, REPO)}: broken links: {bad}"
