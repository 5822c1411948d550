"""The package's held-out abilities as lm-evaluation-harness tasks, shipped in
``ivtrainer/resources/lm_eval`` (``ivtrainer lm-eval-tasks`` prints the folder)::

    lm_eval --model hf --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct \\
        --include_path "$(ivtrainer lm-eval-tasks)" --tasks ivtrainer_abilities

- ``ivtrainer_icl_<task>`` for the six built-in word tasks: the 5-shot prompts of
  :func:`~ivtrainer.evaluation.ability_prompts.icl_examples` (40 per task, demonstrations drawn per
  query), scored by the greedy first token (Todd et al.'s first-token accuracy);
- ``ivtrainer_facts_completion``: every fact that ships with the package
  (:func:`~ivtrainer.datasets.edits.candidate_facts`, 306) as a plain completion, greedy first token;
- ``ivtrainer_facts_instruction``: the same facts as chat questions, does the 16-token greedy reply
  contain the answer; run it with ``--apply_chat_template`` (the prompt is the user's turn);
- group ``ivtrainer_abilities``: the six ICL tasks and the facts as completions;
- ``ivtrainer_sequence_<task>`` for the continual benchmark's tasks
  (:mod:`~ivtrainer.continual.sequence_tasks`): the 48 test rows of each, scored as
  ``ivtrainer continual`` scores them (``acc``: every answer token is the teacher-forced argmax,
  lm-eval's ``is_greedy``), and groups ``ivtrainer_sequence_order1``
  and ``ivtrainer_sequence_order2``. With an IV repair on
  (:func:`~ivtrainer.evaluation.lm_eval_harness.evaluate_lm`'s ``repair``) they score what
  ``ivtrainer continual --repair`` scores.

The documents are built from the package's own data by the functions below (the YAMLs name them),
so a task scores what :func:`~ivtrainer.evaluation.forgetting.evaluate_abilities` scores on the
same items (tested on the default model). lm-eval returns the greedy token as text; each document
carries the text of the answer's first token under the model's tokenizer, found from lm-eval's
``--model_args`` (``tokenizer=`` or ``pretrained=``) or, in memory, from
:func:`ivtrainer.evaluation.lm_eval_harness.evaluate_lm`. Without a tokenizer (a model lm-eval
loads from elsewhere) a hit is "the answer starts with the greedy token", which also counts a
token that is a strict prefix of the answer's first one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from ivtrainer.datasets.edits import candidate_facts
from ivtrainer.evaluation.ability_prompts import QUESTIONS, icl_examples
from ivtrainer.steering.icl import PromptBuilder

__all__ = [
    "contains_answer",
    "documents_for",
    "facts_docs",
    "first_token_match",
    "icl_docs",
    "lm_eval_tasks_path",
    "sequence_docs",
]

logger = logging.getLogger(__name__)

#: Prompts per ``ivtrainer_icl_<task>`` (``evaluate_abilities``'s default ``n_icl``).
N_ICL = 40


def lm_eval_tasks_path() -> Path:
    """The folder to pass to lm-eval as ``--include_path`` (or ``TaskManager(include_path=...)``)."""
    return Path(str(resources.files("ivtrainer") / "resources" / "lm_eval"))


def icl_docs(task: str, n_prompts: int = N_ICL, **metadata: Any):
    """``{"test": Dataset}`` of ``prompt``/``target``/``first_token`` rows: the 5-shot prompts of
    a built-in task."""
    from datasets import Dataset, DatasetDict

    tokenizer = _tokenizer(metadata)
    builder = PromptBuilder(tokenizer=tokenizer)
    rows = []
    for demos, query in icl_examples(task, n_prompts):
        first = tokenizer.decode([builder.encode(demos, query).answer_id]) if tokenizer is not None else ""
        rows.append(
            {
                "prompt": builder.text(demos, query["input"]),
                "target": " " + query["output"],
                "first_token": first,
            }
        )
    return DatasetDict({"test": Dataset.from_list(rows)})


def facts_docs(kind: str, **metadata: Any):
    """``{"test": Dataset}``: the package's facts as completions (``prompt``, ``target`` with a
    leading space, ``first_token``) or as questions (``prompt`` a one-line question, ``target`` the
    answer)."""
    from datasets import Dataset, DatasetDict

    if kind == "completion":
        tokenizer = _tokenizer(metadata)
        rows = []
        for f in candidate_facts():
            first = ""
            if tokenizer is not None:  # as target_predictions: the answer's first token after the prompt
                n_prompt = len(tokenizer(f["prompt"])["input_ids"])
                first = tokenizer.decode(
                    [tokenizer(f"{f['prompt']} {f['target_old']}")["input_ids"][n_prompt]]
                )
            rows.append({"prompt": f["prompt"], "target": " " + f["target_old"], "first_token": first})
    else:
        rows = [
            {"prompt": QUESTIONS[f["relation"]].format(f["subject"]), "target": f["target_old"]}
            for f in candidate_facts()
        ]
    return DatasetDict({"test": Dataset.from_list(rows)})


def sequence_docs(task: str, **metadata: Any):
    """``{"test": Dataset}``: the test rows of a continual benchmark task (``prompt``,
    ``completion`` with its leading space, ``input``, ``output``)."""
    from datasets import Dataset, DatasetDict

    from ivtrainer.continual.sequence_tasks import load_sequence_task

    return DatasetDict({"test": Dataset.from_list(load_sequence_task(task, "test"))})


# The tokenizer the documents are built for while evaluate_lm runs a model in memory.
_TOKENIZER: contextvars.ContextVar[Any] = contextvars.ContextVar("ivtrainer_lm_eval_tokenizer", default=None)


@contextlib.contextmanager
def documents_for(tokenizer: Any) -> Iterator[None]:
    """Inside, the ivtrainer_* documents carry the answers' first tokens under ``tokenizer``."""
    token = _TOKENIZER.set(tokenizer)
    try:
        yield
    finally:
        _TOKENIZER.reset(token)


def _tokenizer(metadata: dict[str, Any]) -> Any:
    if (tokenizer := _TOKENIZER.get()) is not None:
        return tokenizer
    source = metadata.get("tokenizer") or metadata.get("pretrained")
    return _load_tokenizer(source) if isinstance(source, str) else None


@functools.cache
def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # scored by the text rule instead (see the module doc)
        logger.warning(
            "ivtrainer tasks: no tokenizer from %r (%s): a hit is the answer starting with the greedy token",
            source,
            exc,
        )
        return None


def first_token_match(doc: dict[str, str], results: list[str]) -> dict[str, float]:
    """``acc``: the one greedy token generated is the answer's first token (without a tokenizer:
    the answer starts with it)."""
    token = results[0]
    if doc.get("first_token"):
        return {"acc": float(token == doc["first_token"])}
    return {"acc": float(bool(token.strip()) and doc["target"].startswith(token))}


def contains_answer(doc: dict[str, str], results: list[str]) -> dict[str, float]:
    """``acc``: the reply contains the answer (case-insensitive), as ``instruction_hits``."""
    return {"acc": float(doc["target"].lower() in results[0].lower())}
