"""``ivtrainer demo``: the whole story on the default model in minutes."""

from __future__ import annotations

import dataclasses

from ivtrainer.cli.common import ModelArguments, OverwriteArguments, split_list
from ivtrainer.demo.plan import DemoPlan
from ivtrainer.iv_guided.recipes import RECIPES

_PLAN = DemoPlan()


@dataclasses.dataclass
class DemoArguments:
    out: str = dataclasses.field(default="ivtrainer-demo", metadata={"help": "output folder"})
    quick: bool = dataclasses.field(default=False, metadata={"help": "a smaller run of about 2 minutes"})
    task: str = dataclasses.field(
        default=_PLAN.iv_task, metadata={"help": "the built-in task whose IV guides training"}
    )
    recipe: str = dataclasses.field(
        default=_PLAN.recipe,
        metadata={"help": "the IV-guided row's named recipe", "choices": sorted(RECIPES)},
    )
    seed: int = dataclasses.field(default=_PLAN.seed, metadata={"help": "random seed"})
    lm_eval_tasks: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "comma-separated lm-evaluation-harness tasks scored with the held-out abilities in stage 2 "
            "(pip install 'ivtrainer[eval]'), e.g. ivtrainer_abilities or hellaswag"
        },
    )
    lm_eval_limit: int | None = dataclasses.field(
        default=_PLAN.lm_eval_limit, metadata={"help": "lm-eval: documents per task"}
    )


DATACLASSES = (ModelArguments, DemoArguments, OverwriteArguments)


def make_parser(subparsers):
    return subparsers.add_parser(
        "demo",
        dataclass_types=DATACLASSES,
        help="the whole story on the default model in minutes: IV, IV-guided training, F-Learning",
        description="Offline, on the default model (SmolLM2-135M-Instruct) or --model: extract a built-in "
        "task's instruction vector (top heads, CIE heatmap); fine-tune with LoRA on a new task plainly, with a "
        "KL anchor and IV-guided (new-task accuracy and held-out abilities before and after, plot); update a "
        "handful of facts with plain fine-tuning and F-Learning (Reliability, Generality, Locality). Writes the "
        "IV, adapters, tables (JSON, Markdown) and plots to --out. About 7 minutes on 2 CPU cores; --quick, 2-3.",
    )


def main(model_args: ModelArguments, args: DemoArguments, overwrite: OverwriteArguments) -> int:
    from ivtrainer.demo import run_demo

    plan = (DemoPlan.quick if args.quick else DemoPlan)(
        seed=args.seed,
        iv_task=args.task,
        recipe=args.recipe,
        lm_eval_tasks=tuple(split_list(args.lm_eval_tasks)),
        lm_eval_limit=args.lm_eval_limit,
    )
    run_demo(model_args.model, args.out, plan=plan, quick=args.quick, overwrite=overwrite.overwrite)
    return 0
