"""Benchmarks write their tables between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in the
one page that holds that block: README.md or a page under docs/ (docs/benchmarks/ included)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def replace_block(name: str, text: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    pages = [p for p in [README, *sorted((ROOT / "docs").rglob("*.md"))] if pattern.search(p.read_text())]
    if len(pages) != 1:
        raise SystemExit(f"{len(pages)} pages hold a {begin} ... {end} block; expected one")
    page = pages[0]
    page.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", page.read_text()))
