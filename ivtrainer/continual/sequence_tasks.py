"""Built-in tasks for continual instruction tuning: short instruction-style tasks a small model
cannot do zero-shot (each is named by a made-up code word, as SuperNI tasks are by an id the model
has never seen) but learns in one short fine-tuning, with formats that interfere with each other.

Every task maps a word to an answer after the same prompt layout::

    Task: <code>
    Input: <word>
    Output: <answer>

- format tasks (any word): ``brackets`` ``[cat]``, ``json`` ``{"word": "cat"}``, ``xml``
  ``<item>cat</item>``, ``repeat`` ``cat cat``, ``hashtag`` ``#cat``;
- word transformations the model knows in another guise: ``plural``, ``past``, ``opposite``,
  ``capital`` (of a country), ``upper``, ``initial``.

Each task has fixed *train*, *validation* and *test* splits (deterministic, independent of any
seed). :data:`ORDERS` holds the sequences the benchmarks use.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from typing import Literal

from ivtrainer.datasets.tasks import Example, load_task
from ivtrainer.errors import InvalidInputError

__all__ = ["ORDERS", "SEQUENCE_TASKS", "format_prompt", "list_sequence_tasks", "load_sequence_task"]

SequenceSplit = Literal["train", "validation", "test"]
SPLIT_SIZES = {"train": 192, "validation": 32, "test": 48}


def _words() -> list[str]:
    """Lower-case single words from the built-in word tasks (about 450)."""
    words = {
        p["input"]
        for t in ("antonym", "present_past", "singular_plural", "uppercase")
        for p in load_task(t, "all")
    }
    return sorted(w for w in words if w.isalpha() and w.islower())


def _format(transform: Callable[[str], str]) -> Callable[[], list[Example]]:
    return lambda: [{"input": w, "output": transform(w)} for w in _words()]


def _pairs(task: str) -> Callable[[], list[Example]]:
    return lambda: load_task(task, "all")


# name -> (code word in the prompt, the pairs)
SEQUENCE_TASKS: dict[str, tuple[str, Callable[[], list[Example]]]] = {
    "brackets": ("brix", _format(lambda w: f"[{w}]")),
    "json": ("quop", _format(lambda w: json.dumps({"word": w}))),
    "xml": ("zant", _format(lambda w: f"<item>{w}</item>")),
    "repeat": ("melk", _format(lambda w: f"{w} {w}")),
    "hashtag": ("fosh", _format(lambda w: f"#{w}")),
    "upper": ("trin", _format(str.upper)),
    "initial": ("yalp", _format(lambda w: w[0])),
    "plural": ("wobe", _pairs("singular_plural")),
    "past": ("krel", _pairs("present_past")),
    "opposite": ("vusk", _pairs("antonym")),
    "capital": ("narp", _pairs("country_capital")),
}

#: Fixed task orders (the papers run each method over several orders).
ORDERS: dict[str, list[str]] = {
    "order1": ["brackets", "plural", "json", "opposite", "repeat"],
    "order2": ["past", "xml", "upper", "hashtag", "capital"],
    "quick": ["brackets", "plural", "json"],
}


def list_sequence_tasks() -> list[str]:
    return sorted(SEQUENCE_TASKS)


def format_prompt(task: str, word: str) -> str:
    """The prompt of ``task`` for ``word`` (the answer follows after a space)."""
    return f"Task: {SEQUENCE_TASKS[task][0]}\nInput: {word}\nOutput:"


def load_sequence_task(name: str, split: SequenceSplit = "train") -> list[dict[str, str]]:
    """``{"prompt", "completion", "input", "output"}`` rows of a built-in sequence task's split
    (the completion starts with a space). Splits are disjoint and fixed."""
    if name not in SEQUENCE_TASKS:
        raise InvalidInputError(f"no built-in sequence task {name!r}; choose from {list_sequence_tasks()}")
    if split not in SPLIT_SIZES:
        raise InvalidInputError(f"split must be one of {list(SPLIT_SIZES)}, not {split!r}")
    pairs = SEQUENCE_TASKS[name][1]()
    random.Random(f"sequence/{name}").shuffle(pairs)
    test = pairs[: SPLIT_SIZES["test"]]
    validation = pairs[SPLIT_SIZES["test"] : SPLIT_SIZES["test"] + SPLIT_SIZES["validation"]]
    train = pairs[SPLIT_SIZES["test"] + SPLIT_SIZES["validation"] :][: SPLIT_SIZES["train"]]
    chosen = {"train": train, "validation": validation, "test": test}[split]
    return [_row(name, p) for p in chosen]


def _row(task: str, pair: Example) -> dict[str, str]:
    return {
        "prompt": format_prompt(task, pair["input"]),
        "completion": " " + pair["output"],
        "input": pair["input"],
        "output": pair["output"],
    }


def sequence_rows(tasks: Sequence[str], split: SequenceSplit) -> dict[str, list[dict[str, str]]]:
    """Each task's rows of ``split``, every name checked first."""
    unknown = [t for t in tasks if t not in SEQUENCE_TASKS]
    if unknown:
        raise InvalidInputError(f"unknown sequence task {unknown[0]!r}; choose from {list_sequence_tasks()}")
    return {t: load_sequence_task(t, split) for t in tasks}
