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

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    names = [n for p in pages for n in re.findall(r"<!-- ([\w-]+):begin -->", p.read_text())]
    assert names and len(names) == len(set(names)), names
    writers = {
        s.name: _blocks_written(s) for s in (ROOT / "benchmarks").glob("*.py") if s.name != "_readme.py"
    }
    for name in names:
        found = [script for script, written in writers.items() if name in written]
        assert len(found) == 1, f"{len(found)} benchmarks write the {name} block: {found}"


def _config_classes():
    from ivtrainer import ExtractionConfig, FLearningConfig, IVGuidedConfig

    return [IVGuidedConfig, FLearningConfig, ExtractionConfig]


def test_every_config_field_is_documented_with_its_default():
    """Each config's "Parameters:" docstring (what the API page lists) names every field it adds
    to TrainingArguments, with the default the field has."""
    import dataclasses
    import json
    import re

    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    for cls in _config_classes():
        section = (cls.__doc__ or "").split("Parameters:", 1)[-1]
        for field in dataclasses.fields(cls):
            if field.name in inherited:
                continue
            found = re.search(rf"^\s+{field.name} \(.*defaults to `(.+?)`\):$", section, re.M)
            assert found, f"{cls.__name__}.{field.name} is not in its docstring's Parameters"
            default = (
                field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
            )
            shown = str(default) if default is None or isinstance(default, bool) else json.dumps(default)
            assert found.group(1) == shown, (
                f"{cls.__name__}.{field.name}: docstring {found.group(1)}, field {shown}"
            )
