"""``ivtrainer continual``: train a task sequence in turn, scoring every task after every stage."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ivtrainer.cli.common import ModelArguments, split_list
from ivtrainer.continual.continual_config import METHODS, QUICK, ContinualSettings
from ivtrainer.continual.sequence_tasks import ORDERS
from ivtrainer.iv_guided.recipes import RECIPES

# ContinualSettings' own defaults: the flags' defaults (no retyped values)
_D = {f.name: f.default for f in dataclasses.fields(ContinualSettings)}


def _flag(default: Any, help: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _sized(name: str, help: str) -> Any:
    """A setting --quick changes: None on the command line means the settings' (or --quick's) value."""
    quick = f"; --quick: {QUICK[name]:g}" if name in QUICK else ""
    default = "all" if _D[name] is None else f"{_D[name]:g}"
    return _flag(None, f"{help} (default: {default}{quick})")


@dataclasses.dataclass
class ContinualArguments:
    out: str = dataclasses.field(
        metadata={"help": "output folder (a new one, or an interrupted run's to continue)"}
    )
    tasks: str | None = _flag(
        None,
        "comma-separated built-in sequence tasks or JSON/JSONL files of input/output pairs (default: the built-in "
        "order, see --order)",
    )
    order: str = _flag("order1", "the built-in task order", choices=sorted(k for k in ORDERS if k != "quick"))
    method: str = _flag(_D["method"], "the training method", choices=list(METHODS))
    recipe: str | None = _flag(
        None,
        "kl-anchor, iv-guided: the named IVGuidedConfig recipe (default: kl-anchor for kl-anchor, fvforgetting "
        "for the IV-guided methods)",
        choices=sorted(RECIPES),
    )
    quick: bool = _flag(False, "three tasks, small splits: about 3 minutes")
    full: bool = _flag(False, "full fine-tuning (default: LoRA r8 on q_proj, v_proj per task)")
    seed: int = _flag(_D["seed"], "random seed")
    epochs: float | None = _sized("epochs", "epochs per task")
    n_train: int | None = _sized("n_train", "training rows per task")
    n_test: int | None = _sized("n_test", "test rows per task")
    n_icl: int | None = _sized("n_icl", "5-shot prompts per held-out ability")
    icl_demos: str = _flag(
        _D["icl_demos"],
        "held-out abilities: the same five demonstrations before every query, computed once, or drawn per query "
        "(about 4x the evaluation time)",
        choices=["fixed", "per-query"],
    )
    learning_rate: float | None = _flag(None, "default 5e-4 with LoRA, 2e-5 full")
    replay_fraction: float = _flag(_D["replay_fraction"], "replay: share of each earlier task's rows")
    kl_scale: float = _flag(_D["kl_scale"], "kl-anchor, iv-guided: a factor on the recipe's KL weights")
    teacher_strength: float = _flag(
        _D["teacher_strength"], "iv-guided: the teacher's IV strength, times the IV's own"
    )
    eval_split: str = _flag(
        _D["eval_split"],
        "the split every stage is scored on (validation: to choose settings)",
        choices=["test", "validation"],
    )
    iv_heads: str | None = _flag(
        None,
        "iv-guided: a saved head set for the own-task IVs (`ivtrainer extract-heads`), or 'shipped': the one "
        "ivtrainer ships for the default model (default: per-task exact CIE over every head)",
    )
    teacher: str = _flag(
        _D["teacher"],
        "kl-anchor, iv-guided: the teacher run at every step, or once before each stage and stored",
        choices=["live", "precomputed"],
    )
    teacher_top_k: int = _flag(
        _D["teacher_top_k"], "with --teacher precomputed: tokens stored per position; 0: hidden states, exact"
    )
    lm_eval_tasks: str | None = _flag(
        None,
        "comma-separated lm-evaluation-harness tasks scored after every stage too (pip install "
        "'ivtrainer[eval]'), e.g. ivtrainer_abilities or hellaswag,arc_easy",
    )
    lm_eval_limit: int | None = _flag(None, "lm-eval: documents per task (default: all)")
    repair: bool = _flag(
        False,
        "IV repair: capture each task's IV right after its stage and, at the end, add it back to its prompts "
        "(the task given, and routed from the prompt; strengths chosen on validation rows); extra results rows, "
        "no retraining (a LoRA run made without it can be scored again with it)",
    )


DATACLASSES = (ModelArguments, ContinualArguments)


def make_parser(subparsers):
    return subparsers.add_parser(
        "continual",
        dataclass_types=DATACLASSES,
        help="continual instruction tuning: train a task sequence in turn, score every task after every stage",
        description="Train tasks in order (LoRA: a new adapter per task over the merged earlier ones; or --full) "
        "with plain fine-tuning, replay, a KL anchor or IV guidance (each task's own IV, FvForgetting's recipe), "
        "scoring every task and the held-out abilities after every stage. Writes results.json (accuracy matrix, "
        "AP, BWT, FWT, forgetting), results.md and two plots to --out; run the same command again to continue an "
        "interrupted run. --quick: three tasks on the default model in about 3 minutes.",
    )


def main(model_args: ModelArguments, args: ContinualArguments) -> int:
    from ivtrainer.continual.run_sequence import run_sequence

    tasks = (
        split_list(args.tasks) if args.tasks is not None else ORDERS["quick" if args.quick else args.order]
    )
    settings: dict[str, Any] = dict(QUICK) if args.quick else {}
    # every flag that is a ContinualSettings field, as given (None: the settings' or --quick's value)
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(args)
        if f.name in _D and f.name != "tasks" and getattr(args, f.name) is not None
    }
    given["lm_eval_tasks"] = tuple(split_list(args.lm_eval_tasks))  # a comma-separated flag
    run_sequence(tasks, out=args.out, model=model_args.model, lora=not args.full, **{**settings, **given})
    print((Path(args.out) / "results.md").read_text())
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0
