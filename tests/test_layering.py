"""The package's dependency rules, read from the source (every import statement, also those inside
functions): what may import what, and no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for ``ivtrainer/`` and the top-level ``callbacks/`` (which is
    ``ivtrainer.callbacks``)."""
    out = {}
    for base, prefix in (
        (ROOT / "ivtrainer", ("ivtrainer",)),
        (ROOT / "callbacks", ("ivtrainer", "callbacks")),
    ):
        for path in base.rglob("*.py"):
            if path.is_relative_to(ROOT / "ivtrainer" / "callbacks"):  # the link to callbacks/, read there
                continue
            parts = (*prefix, *path.relative_to(base).with_suffix("").parts)
            # evaluate's module scripts (evaluation/metrics/<name>/<name>.py) load on their own
            if parts[1:3] == ("evaluation", "metrics") and len(parts) > 4:
                continue
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported ivtrainer module, names taken from it) for each import statement."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("ivtrainer")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if not base.startswith("ivtrainer"):
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            found += [(m, []) for m in submodules]
            rest = [n for n in names if f"{base}.{n}" not in MODULES]
            if rest or not submodules:
                found.append((base, rest))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _edges(source: str) -> set[str]:
    return {target for target, _ in GRAPH[source] if target in MODULES and target != source}


def _package(module: str) -> str:
    """The concern a module belongs to: ``ivtrainer.<package>`` (top-level modules are their own)."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycles():
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(_edges(node)):
            if target == "ivtrainer":  # the root re-exports; importing it from inside is checked below
                continue
            if state.get(target) == "open":
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_nothing_inside_imports_the_package_root():
    offenders = [m for m in MODULES if m != "ivtrainer" and "ivtrainer" in _edges(m)]
    assert not offenders, f"import the module that defines the name, not the root: {offenders}"


def _violations(modules, forbidden) -> list[str]:
    return [f"{m} imports {t}" for m in sorted(modules) for t in sorted(_edges(m)) if forbidden(t)]


def test_configs_import_no_trainer_or_callback():
    configs = [m for m in MODULES if m.endswith("_config")]
    bad = _violations(configs, lambda t: t.endswith("_trainer") or t.startswith("ivtrainer.callbacks"))
    assert not bad, "\n".join(bad)


def test_the_iv_guided_loss_and_teacher_import_no_trainer_or_callback():
    """The guidance (the loss), the live and stored teachers and the store sit below both training
    routes: the trainers' compute_loss and the callbacks' forward hook."""
    core = [
        m
        for m in MODULES
        if m in ("ivtrainer.iv_guided.guidance", "ivtrainer.iv_guided.kl_loss", "ivtrainer.iv_guided.teacher")
        or m.startswith("ivtrainer.iv_guided.precomputed_teacher")
    ]
    assert len(core) == 8, (
        core
    )  # the guidance, the maths, the teachers, the store's package and its 4 modules
    bad = _violations(core, lambda t: t.endswith("_trainer") or t.startswith("ivtrainer.callbacks"))
    assert not bad, "\n".join(bad)


def test_callbacks_import_no_trainer():
    callbacks = [m for m in MODULES if m.startswith("ivtrainer.callbacks")]
    bad = _violations(callbacks, lambda t: t.endswith("_trainer"))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("front", ["ivtrainer.demo", "ivtrainer.cli"])
def test_the_library_does_not_import_its_front_ends(front):
    # the CLI runs the demo; a front end's own modules import each other; `python -m ivtrainer`
    # (ivtrainer/__main__.py) is the CLI's entry point
    bad = [
        m
        for m in MODULES
        if not m.startswith("ivtrainer.cli")
        and m != "ivtrainer.__main__"
        and not m.startswith(front)
        and any(t == front or t.startswith(front + ".") for t in _edges(m))
    ]
    assert not bad, f"{bad} import {front}"


def test_infrastructure_imports_no_method():
    """utils/, errors and version sit below everything: they import no training method."""
    methods = ("ivtrainer.iv_guided", "ivtrainer.f_learning", "ivtrainer.steering", "ivtrainer.callbacks")
    base = [m for m in MODULES if m.startswith(("ivtrainer.utils", "ivtrainer.errors", "ivtrainer.version"))]
    bad = _violations(base, lambda t: t.startswith(methods))
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_package():
    crossings = [
        f"{module} takes {name} from {target}"
        for module, imports in GRAPH.items()
        for target, names in imports
        for name in names
        if name.startswith("_") and not name.startswith("__") and _package(target) != _package(module)
    ]
    assert not crossings, "\n".join(crossings)


def test_every_subpackage_is_packaged():
    """pyproject.toml lists the packages explicitly: a new subpackage missing there installs
    from a checkout (editable) but not from the wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert found == listed, f"missing: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_every_resource_file_is_packaged():
    """Package data (tasks, lm-eval tasks, the shipped head set) is listed by glob in pyproject.toml:
    a file no pattern matches works from a checkout but is missing from the wheel."""
    from pathlib import PurePosixPath

    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "ivtrainer"
    ]
    package = ROOT / "ivtrainer"
    files = [
        PurePosixPath(p.relative_to(package).as_posix())
        for p in (package / "resources").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    ]
    assert any(f.parts[:2] == ("resources", "head_sets") for f in files)
    unpackaged = [
        str(f)
        for f in files
        if not any(
            f.match(pattern) and len(f.parts) == len(PurePosixPath(pattern).parts) for pattern in patterns
        )
    ]
    assert not unpackaged, unpackaged
