"""The docs that are generated stay current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_page_is_generated_from_the_parser():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    gen_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_cli)
    assert (ROOT / "docs" / "cli.md").read_text() == gen_cli.render(), "run: python docs/gen_cli.py"


def test_every_benchmark_block_is_on_exactly_one_page():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    names = [n for p in pages for n in re.findall(r"<!-- ([\w-]+):begin -->", p.read_text())]
    assert names and len(names) == len(set(names)), names
    scripts = "".join(p.read_text() for p in (ROOT / "benchmarks").glob("*.py"))
    for name in names:
        assert f'"{name}"' in scripts, f"no benchmark writes the {name} block"
