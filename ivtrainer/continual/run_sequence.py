"""Continual instruction tuning: train a sequence of tasks in turn and score every task after
every stage (what the IV papers evaluate).

LoRA (the public FvForgetting code's setting): each task trains a new adapter (r 8 on q_proj and
v_proj) on the model with the earlier tasks' adapters merged in. Full fine-tuning trains the
weights themselves. Methods, all behind the same loop:

- ``plain``: sequential fine-tuning;
- ``replay``: plus ``replay_fraction`` of each earlier task's training rows mixed in;
- ``kl-anchor``: ``IVGuidedConfig.recipe("kl-anchor")``, the KL terms towards the model before this
  task, no IV;
- ``iv-guided``: ``IVGuidedConfig.recipe("fvforgetting")`` with the task's own IV, extracted from
  its training rows on the model before it is trained;
- ``iv-guided-replay``: ``iv-guided`` on ``replay``'s rows.

Every stage writes ``stages/<s>/`` (scores, the adapter or the IV) before the next begins, so a
run killed in stage 3 and started again with the same settings continues from stage 3 and ends
with the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ivtrainer.continual.continual_config import (
    METHODS,
    QUICK,
    ContinualSettings,
    Method,
    _name,
)
from ivtrainer.continual.sequence_tasks import ORDERS, SEQUENCE_TASKS, load_sequence_task
from ivtrainer.datasets.tasks import load_examples
from ivtrainer.errors import InvalidInputError
from ivtrainer.utils.outputs import atomic_dir, atomic_file

__all__ = ["METHODS", "QUICK", "ContinualSettings", "load_final_model", "run_sequence", "task_rows"]
from ivtrainer.continual.resume import (
    _check_inputs,
    _check_out,
    _check_stages,
    _digest,
    _empty_model,
    _files_digest,
    _model_folder,
    _restore,
    load_final_model,
)
from ivtrainer.continual.scoring import _evaluate, _repair, _write_results
from ivtrainer.continual.stage import (
    TASK_IV,
    _capture_task_iv,
    _check_model,
    _check_sizes,
    _head_set,
    _heads_used,
    _train_stage,
)

logger = logging.getLogger(__name__)


def task_rows(task: str, split: str) -> list[dict[str, str]]:
    """Rows of a built-in sequence task, or of a JSON/JSONL file of ``{"input", "output"}`` pairs
    (prompt = the input, completion = a space and the output; 20% test, 10% validation, fixed)."""
    if task in SEQUENCE_TASKS:
        return load_sequence_task(task, split)  # type: ignore[arg-type]  # checked there
    path = Path(task).expanduser()
    if not path.is_file():
        raise InvalidInputError(
            f"unknown task {task!r}: name a built-in sequence task ({sorted(SEQUENCE_TASKS)}) or a JSON/JSONL file"
        )
    pairs = load_examples(path)
    random.Random(f"sequence/{path.name}").shuffle(pairs)
    n_test, n_val = max(1, len(pairs) // 5), max(1, len(pairs) // 10)
    if len(pairs) - n_test - n_val < 1:
        raise InvalidInputError(f"{task}: {len(pairs)} pairs leave nothing to train on; give at least 3")
    chosen = {
        "test": pairs[:n_test],
        "validation": pairs[n_test : n_test + n_val],
        "train": pairs[n_test + n_val :],
    }
    return [
        {"prompt": p["input"], "completion": " " + p["output"], "input": p["input"], "output": p["output"]}
        for p in chosen[split]
    ]


def run_sequence(
    tasks: Sequence[str] | None = None,
    *,
    out: str | os.PathLike,
    method: Method = "iv-guided",
    model: str = "default",
    lora: bool = True,
    seed: int = 0,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Train ``tasks`` in order with ``method`` and score every task (test split) and the held-out
    abilities (5-shot ICL on the built-in word tasks) after every stage; write ``out/results.json``,
    ``results.md`` and two plots, and return the results. ``tasks`` default to ``ORDERS["order1"]``;
    ``settings`` are further :class:`ContinualSettings` fields. Started again on the same ``out``
    with the same settings, it continues after the last finished stage."""
    config = ContinualSettings(
        tasks=tuple(tasks) if tasks is not None else tuple(ORDERS["order1"]),
        method=method, model=model, lora=lora, seed=seed, **settings,
    )  # fmt: skip
    splits = ("train", "test", "validation")
    rows = {t: {s: task_rows(t, s) for s in splits} for t in config.tasks}  # every task checked now
    _check_sizes(config, rows)
    out = Path(out).expanduser()
    # every check that needs no model, before it loads: the folder, a resumed run's inputs and stages
    resuming = _check_out(out, config)
    # the rows the stages train and score on (--repair's validation rows are computed anew)
    inputs: dict[str, Any] = {
        "tasks": {
            _name(t): _digest({s: rows[t][s] for s in ("train", config.eval_split)}) for t in config.tasks
        }
    }
    folder = _model_folder(config.model)
    if folder is not None:
        inputs["model_files"] = _files_digest(folder)
    if resuming:
        _check_inputs(out, inputs)
        _check_stages(out, config)
    heads = _head_set(config)
    if folder is not None and (folder / "config.json").is_file():  # from its config: no weights read
        _check_model(_empty_model(folder), config, heads)
    from transformers import set_seed

    from ivtrainer.iv_guided.precomputed_teacher import model_fingerprint
    from ivtrainer.modeling.loading import load_model

    set_seed(config.seed)
    current, tokenizer = load_model(config.model)
    if torch.cuda.is_available():  # every stage's evaluation and IV too, not only the Trainer's steps
        current = current.to("cuda")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _check_model(current, config, heads)  # again: a .gguf file has no config to check it from
    inputs["model"] = model_fingerprint(current)
    inputs["iv_heads"] = _heads_used(config, current, heads)
    if resuming:
        _check_inputs(out, inputs)
    # written once every check has passed: a refused run leaves nothing that blocks its corrected rerun
    for name, values in (("settings.json", dataclasses.asdict(config)), ("inputs.json", inputs)):
        if not (out / name).is_file():
            out.mkdir(parents=True, exist_ok=True)
            with atomic_file(out / name) as tmp:
                tmp.write_text(json.dumps(json.loads(json.dumps(values)), indent=1))
    stages: list[dict[str, Any]] = []
    for stage in range(len(config.tasks) + 1):
        folder = out / "stages" / str(stage)
        if (folder / "scores.json").is_file():  # finished in an earlier run: rebuild its model
            stages.append(json.loads((folder / "scores.json").read_text()))
            if stage > 0:
                current = _restore(current, folder, config)
                if config.repair and not (folder / TASK_IV).is_dir():  # a run made without --repair
                    with atomic_dir(folder / TASK_IV) as tmp:
                        _capture_task_iv(current, tokenizer, config, stage, rows, progress).save_pretrained(
                            tmp
                        )
            continue
        times = {"train": 0.0, "evaluate": 0.0, "iv": 0.0}  # this stage's, kept with its scores
        if stage > 0:
            task = config.tasks[stage - 1]
            logger.warning("stage %d of %d: %s (%s)", stage, len(config.tasks), _name(task), config.method)
            with atomic_dir(folder) as tmp:
                record: dict[str, Any] = {}
                current = _train_stage(current, tokenizer, config, stage, rows, tmp, times, record, progress)
                if config.repair:  # the task's IV on the model that has just learnt it
                    _capture_task_iv(current, tokenizer, config, stage, rows, progress).save_pretrained(
                        tmp / TASK_IV
                    )
                start = time.perf_counter()
                scores = _evaluate(current, tokenizer, config, rows)
                times["evaluate"] += time.perf_counter() - start
                scores["seconds"] = times
                scores.update(record)
                (tmp / "scores.json").write_text(json.dumps(scores, indent=1))
            if not config.lora and stage > 1:  # only the latest full model is needed to continue
                shutil.rmtree(out / "stages" / str(stage - 1) / "model", ignore_errors=True)
        else:
            start = time.perf_counter()
            scores = _evaluate(current, tokenizer, config, rows)
            times["evaluate"] += time.perf_counter() - start
            scores["seconds"] = times
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_file(folder / "scores.json") as tmp_file:
                tmp_file.write_text(json.dumps(scores, indent=1))
        stages.append(scores)
    repair = _repair(current, tokenizer, config, rows, out, stages) if config.repair else None
    return _write_results(out, config, stages, repair, final_model=model_fingerprint(current))
