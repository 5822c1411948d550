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


def _blocks_written(script: Path) -> set[str]:
    """The docs blocks a benchmark script can write: the names that reach its ``replace_block``
    calls as literals, through the variables assigned before them, or as ``--readme-block``
    choices (``args.readme_block``)."""
    import ast

    tree = ast.parse(script.read_text())

    def strings(node: ast.AST) -> set[str]:
        return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}

    assigned: dict[str, set[str]] = {}
    choices: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, set()).update(strings(node.value))
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "add_argument"
            and any(isinstance(a, ast.Constant) and a.value == "--readme-block" for a in node.args)
        ):
            choices |= {v for k in node.keywords if k.arg in ("choices", "default") for v in strings(k.value)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "replace_block" and node.args:
            first = node.args[0]
            names |= {
                n.value for n in ast.walk(first) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            }
            for name in (n.id for n in ast.walk(first) if isinstance(n, ast.Name)):
                names |= assigned.get(name, set())
            if "readme_block" in strings(first) | {
                n.attr for n in ast.walk(first) if isinstance(n, ast.Attribute)
            }:
                names |= choices
    return names


def test_every_benchmark_block_is_on_exactly_one_page():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    names = [n for p in pages for n in re.findall(r"<!-- ([\w-]+):begin -->", p.read_text())]
    assert names and len(names) == len(set(names)), names
    writers = {
        s.name: _blocks_written(s) for s in (ROOT / "benchmarks").glob("*.py") if s.name != "_readme.py"
    }
    for name in names:
        found = [script for script, written in writers.items() if name in written]
        assert len(found) == 1, f"{len(found)} benchmarks write the {name} block: {found}"
