"""``ivtrainer extract-heads``: rank the model's heads by causal effect averaged over many tasks."""

from __future__ import annotations

import dataclasses
import typing

from ivtrainer.cli.common import HubArguments, ModelArguments, OverwriteArguments, split_list
from ivtrainer.steering.extraction_config import HEAD_SET_FIELDS, ExtractionConfig


@dataclasses.dataclass
class ExtractHeadsArguments:
    out: str = dataclasses.field(metadata={"help": "output folder"})
    tasks: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "comma-separated built-in task names or JSON/JSONL files (default: every built-in task)"
        },
    )


# ExtractionConfig's fields that a head set uses (no vector is formed or calibrated), with their
# defaults and help as ExtractionConfig declares them
_TYPES = typing.get_type_hints(ExtractionConfig)
HeadSetExtraction = dataclasses.make_dataclass(
    "HeadSetExtraction",
    [
        (f.name, _TYPES[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
        for f in dataclasses.fields(ExtractionConfig)
        if f.name in HEAD_SET_FIELDS
    ],
)

DATACLASSES = (ModelArguments, ExtractHeadsArguments, HeadSetExtraction, HubArguments, OverwriteArguments)


def make_parser(subparsers):
    return subparsers.add_parser(
        "extract-heads",
        dataclass_types=DATACLASSES,
        help="rank the model's heads by causal effect averaged over many tasks (a universal head set)",
        description="Measure every head's causal indirect effect on each task and save the mean as a head set "
        "(safetensors + JSON + model card); extract-iv --heads then needs only a task's mean activations, and so "
        "do the own-task IVs of training (IVGuidedConfig(auto_iv_heads=...), continual --iv_heads). The default "
        "model has one built in ('shipped' there); build one here for any other model.",
    )


def main(
    model_args: ModelArguments, args: ExtractHeadsArguments, settings, hub: HubArguments, overwrite
) -> int:
    from ivtrainer.datasets.tasks import list_tasks, load_examples
    from ivtrainer.errors import InvalidInputError
    from ivtrainer.hub.push import check_push_target
    from ivtrainer.modeling.loading import load_model
    from ivtrainer.steering.head_set import extract_head_set
    from ivtrainer.steering.icl import check_extraction_sizes
    from ivtrainer.utils.outputs import atomic_dir, check_output_dir

    config = ExtractionConfig(**dataclasses.asdict(settings))
    tasks = split_list(args.tasks) if args.tasks is not None else list_tasks()
    if not tasks:
        raise InvalidInputError("--tasks is empty: pass comma-separated task names or files")
    for task in tasks:  # every file checked before the model loads
        check_extraction_sizes(load_examples(task), n_shots=config.n_shots, source=task)
    out = check_output_dir(args.out, inputs=[model_args.model, *tasks], overwrite=overwrite.overwrite)
    if hub.push_to_hub:
        check_push_target(hub.push_to_hub)
    model, tokenizer = load_model(model_args.model)
    head_set = extract_head_set(model, tokenizer, tasks, config, progress=True)
    with atomic_dir(out, marker={"command": "extract-heads"}) as tmp:
        head_set.save_pretrained(tmp)
    top = ", ".join(
        f"L{layer}H{head} {float(head_set.cie[layer, head]):+.4f}" for layer, head in head_set.top(10)
    )
    print(f"top heads by mean CIE over {len(tasks)} tasks: {top}")
    print(f"saved to {args.out}")
    if hub.push_to_hub:
        print(f"pushed: {head_set.push_to_hub(hub.push_to_hub)}")
    return 0
