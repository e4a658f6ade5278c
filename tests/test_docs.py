"""The READMEs point at files that exist (screenshots, plots, scripts)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Markdown links and images: [text](target) / ![alt](target); web addresses and in-page anchors are not files.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("readme", ["README.md", "benchmarks/README.md"])
def test_relative_links_point_at_existing_files(readme):
    page = ROOT / readme
    targets = [t.split("#")[0] for t in LINK.findall(page.read_text(encoding="utf-8"))
               if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert targets  # the pattern still finds the page's links
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{readme} links to files that do not exist: {missing}"
