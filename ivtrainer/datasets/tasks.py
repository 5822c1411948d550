"""Task data: built-in word-level tasks and loading of a user's ``{"input", "output"}`` pairs.

Built-in tasks are JSON files shipped in the package (``ivtrainer/resources/tasks``), written by hand
(antonym, country_capital, present_past, singular_plural) or generated from those words
(uppercase, first_letter). Each splits deterministically into *extraction* pairs (two thirds:
for extracting instruction vectors and choosing settings) and *held-out* pairs (one third: for
reporting only).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ivtrainer.errors import InvalidInputError

__all__ = ["Example", "list_tasks", "load_examples", "load_task"]

Example = dict[str, str]
Split = Literal["extraction", "held_out", "all"]
_FIELDS = ("input", "output")


def list_tasks() -> list[str]:
    """Names of the built-in tasks."""
    folder = resources.files("ivtrainer") / "resources" / "tasks"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def load_task(name: str, split: Split = "extraction") -> list[Example]:
    """Pairs of a built-in task: ``split`` is ``"extraction"`` (2/3), ``"held_out"`` (1/3) or ``"all"``."""
    tasks = list_tasks()
    if name not in tasks:
        raise InvalidInputError(f"no built-in task {name!r}; choose one of {tasks} or pass a JSON/JSONL file")
    if split not in ("extraction", "held_out", "all"):
        raise InvalidInputError(f"split must be 'extraction', 'held_out' or 'all', not {split!r}")
    data = json.loads((resources.files("ivtrainer") / "resources" / "tasks" / f"{name}.json").read_text())
    pairs = [{"input": i, "output": o} for i, o in data["pairs"]]
    if split == "all":
        return pairs
    random.Random(name).shuffle(pairs)  # fixed per task, independent of any user seed
    cut = (2 * len(pairs)) // 3
    return pairs[:cut] if split == "extraction" else pairs[cut:]


def load_examples(examples: Any, *, source: str | None = None) -> list[Example]:
    """Normalise task data to a list of ``{"input": str, "output": str}`` dicts.

    Accepts a built-in task name (its extraction split), a JSON or JSONL file, a list of dicts or
    a ``datasets.Dataset``. Raises ``ValueError`` naming the first missing or non-text field.
    """
    if isinstance(examples, (str, os.PathLike)):
        path = Path(examples).expanduser()
        if path.is_file():
            return load_examples(_read_json_records(path), source=str(path))
        if isinstance(examples, str) and examples in list_tasks():
            return load_task(examples)
        raise InvalidInputError(
            f"{os.fspath(examples)!r} is neither a file nor a built-in task; built-in tasks: {list_tasks()}"
        )
    if hasattr(examples, "column_names") and hasattr(examples, "to_list"):  # datasets.Dataset
        missing = [f for f in _FIELDS if f not in examples.column_names]
        if missing:
            raise InvalidInputError(
                f"the dataset has no {missing[0]!r} column (columns: {examples.column_names}); "
                "rename them with dataset.rename_column(old, new)"
            )
        examples = examples.to_list()
    if not isinstance(examples, Iterable) or isinstance(examples, Mapping):
        raise InvalidInputError(
            f"examples must be a list of {{'input', 'output'}} dicts, not {type(examples).__name__}"
        )
    where = f" in {source}" if source else ""
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping):
            raise InvalidInputError(
                f"example {i}{where} is a {type(ex).__name__} ({_short(ex)}), not a dict with 'input' and 'output'"
            )
        for field in _FIELDS:
            if field not in ex:
                raise InvalidInputError(
                    f"example {i}{where} has no {field!r} field (it has {sorted(ex)}); "
                    "every example needs 'input' and 'output'"
                )
            if not isinstance(ex[field], str) or not ex[field].strip():
                raise InvalidInputError(
                    f"example {i}{where}: {field!r} must be a non-empty string, got {_short(ex[field])}"
                )
        out.append({"input": ex["input"], "output": ex["output"]})
    if not out:
        raise InvalidInputError(f"no examples{where}: pass at least one {{'input', 'output'}} pair")
    return out


def read_json_or_jsonl(path: Path) -> Any:
    """A JSON document, or the list of a JSONL file's records; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        records = []
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if len([x for x in lines if x.strip()]) < 2:  # one document: report it as JSON
                    raise InvalidInputError(
                        f"{path} is not valid JSON: {first.msg} (line {first.lineno}, column {first.colno})"
                    ) from None
                raise InvalidInputError(
                    f"{path} is neither JSON nor JSONL: line {number}: {exc.msg} (column {exc.colno})"
                ) from None
        return records


def _read_json_records(path: Path) -> list[Any]:
    data = read_json_or_jsonl(path)
    if isinstance(data, Mapping):  # {"pairs": [...]} or {"examples": [...]} or {"data": [...]}
        for key in ("examples", "data", "pairs"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if isinstance(data, list) and data and isinstance(data[0], (list, tuple)):  # [["in", "out"], ...]
        rows = []
        for i, row in enumerate(data):
            if not (
                isinstance(row, (list, tuple)) and len(row) == 2 and all(isinstance(x, str) for x in row)
            ):
                raise InvalidInputError(
                    f"row {i} in {path} is {_short(row)}; a list-of-lists task file needs [input, output] "
                    "string pairs in every row"
                )
            rows.append({"input": row[0], "output": row[1]})
        data = rows
    return data if isinstance(data, list) else [data]


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
