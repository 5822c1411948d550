"""``run_demo``: the plan, the estimate, the three stages and the report, written atomically."""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ivtrainer.demo.plan import DemoPlan, check_output_folder, estimate_seconds, probe
from ivtrainer.demo.report import (
    iv_lines,
    knowledge_table,
    listing,
    lm_eval_table,
    minutes,
    new_task_table,
    own_iv_line,
    plot_new_task,
    repair_line,
    write_results,
)
from ivtrainer.demo.stages import stage_instruction_vector, stage_knowledge_update, stage_new_task
from ivtrainer.errors import IVTrainerError


def _spread(records: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Round-robin over relations, so any prefix mixes them."""
    groups: dict[str, list[dict[str, str]]] = {}
    for r in records:
        groups.setdefault(r["relation"], []).append(r)
    out = []
    while any(groups.values()):
        for g in groups.values():
            if g:
                out.append(g.pop(0))
    return out


@contextmanager
def _quiet() -> Iterator[None]:
    """The demo's own lines, not the Trainer's notices or libraries' deprecation warnings."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = round(time.perf_counter() - start, 1)


def run_demo(
    model_name: str = "default",
    out: str | os.PathLike = "ivtrainer-demo",
    *,
    plan: DemoPlan | None = None,
    quick: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the three stages and write their results to ``out``; returns what ``results.json`` holds.

    ``echo`` receives the lines the command prints (the plan, the estimate, the tables).
    """
    from ivtrainer.datasets.edits import build_counterfacts
    from ivtrainer.datasets.tasks import list_tasks
    from ivtrainer.modeling.architectures import get_layout
    from ivtrainer.modeling.loading import DEFAULT_MODEL, load_model, model_source
    from ivtrainer.utils.outputs import atomic_dir, scratch_dir

    plan = plan or (DemoPlan.quick() if quick else DemoPlan())
    target = check_output_folder(out, overwrite, model_name)
    if plan.iv_task not in list_tasks():
        raise IVTrainerError(f"unknown task {plan.iv_task!r}; built-in tasks: {', '.join(list_tasks())}")
    if plan.lm_eval_tasks:  # names checked (and lm-eval found) before any work
        from ivtrainer.evaluation.lm_eval_harness import check_tasks, task_manager

        check_tasks(list(plan.lm_eval_tasks), task_manager())
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    shown = "the default model" if model_name == DEFAULT_MODEL else model_name
    echo(f"Loading {shown} and finding the built-in facts it knows ...")
    with _quiet():
        with _timed(seconds, "loading and preparing"):
            model, tokenizer = load_model(model_name)
            if torch.cuda.is_available():  # the Trainer would move each copy there anyway
                model.to("cuda")
            layout = get_layout(model)
            try:
                known = _spread(build_counterfacts(model, tokenizer, seed=plan.seed))
            except ValueError as exc:
                raise IVTrainerError(f"{model_name}: {exc}") from None
            if len(known) < 4:
                raise IVTrainerError(
                    f"{model_name} completes only {len(known)} of the built-in facts; the demo needs at least 4"
                )
            n_edits = min(plan.n_edits, len(known) // 2)
            edits, facts = known[:n_edits], known[n_edits : n_edits + plan.n_facts]
            per_call, per_token = probe(model)
        estimate = estimate_seconds(plan, per_call, per_token, layout.n_layers, layout.n_heads)
        name = model_source(model)["name"] or model_name
        echo(
            f"ivtrainer demo{' --quick' if quick else ''}: {name} ({layout.n_layers} layers x "
            f"{layout.n_heads} heads), {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters"
        )
        echo(
            f"{len(known)} built-in facts known to the model: {len(edits)} to edit, {len(facts)} to "
            f"watch for forgetting. Estimated time: {minutes(sum(estimate.values()))} "
            f"({', '.join(f'{k} {minutes(v)}' for k, v in estimate.items())})"
        )
        with scratch_dir("ivtrainer-demo") as work, atomic_dir(target, marker={"command": "demo"}) as tmp:
            echo(f"\n[1/3] Instruction vector of '{plan.iv_task}' (causal mediation over all heads)")
            with _timed(seconds, "instruction vector"):
                iv_result = stage_instruction_vector(model, tokenizer, plan, tmp)
            stage_iv = iv_result.pop("iv")
            echo(iv_lines(iv_result))

            echo(
                "\n[2/3] LoRA fine-tuning on a new task (Q: cold -> A: [cold]): plain, KL anchor (no IV) and "
                "IV-guided (the new task's own IV on the teacher)"
            )
            with _timed(seconds, "new task, plain vs KL anchor vs IV-guided"):
                new_task = stage_new_task(model, tokenizer, facts, plan, tmp, work, iv=stage_iv)
                plot_new_task(
                    new_task, tmp / "forgetting.png", f"{Path(str(name)).name}: before and after LoRA"
                )
            echo(own_iv_line(new_task))
            echo(new_task_table(new_task))
            echo(repair_line(new_task))
            if table := lm_eval_table(new_task):
                echo(f"\n{table}")  # a table of its own (Markdown merges adjacent ones)

            echo(f"\n[3/3] Knowledge update: {len(edits)} facts changed to counterfactual ones")
            with _timed(seconds, "knowledge update"):
                knowledge = stage_knowledge_update(model, tokenizer, edits, plan, tmp, work)
            echo(knowledge_table(knowledge))

            seconds["total"] = round(time.perf_counter() - start, 1)
            results = {
                "model": str(name),
                "quick": quick,
                "plan": dataclasses.asdict(plan),
                "instruction_vector": iv_result,
                "new_task": new_task,
                "knowledge_update": knowledge,
                "seconds": seconds,
                "estimated_seconds": {k: round(v, 1) for k, v in estimate.items()},
            }
            write_results(tmp, results)
    echo(
        f"\nDone in {minutes(seconds['total'])} (estimated {minutes(sum(estimate.values()))} after loading). "
        f"Everything is in {os.fspath(out)}/:"
    )
    for line in listing(target):
        echo(f"  {line}")
    return results
