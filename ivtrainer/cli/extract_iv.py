"""``ivtrainer extract-iv``: extract a task's instruction vector by causal mediation analysis."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ivtrainer.cli.common import HubArguments, ModelArguments, OverwriteArguments
from ivtrainer.steering.extraction_config import ExtractionConfig


@dataclasses.dataclass
class ExtractIVArguments:
    task: str = dataclasses.field(
        metadata={"help": "a built-in task name or a JSON/JSONL file of {input, output}"}
    )
    out: str = dataclasses.field(metadata={"help": "output folder"})
    eval_split: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "hold out this fraction of the pairs (e.g. 0.33): never used for extraction, then scored "
            "zero-shot, zero-shot + IV and 5-shot; the table goes into the artifact and its card",
            "metavar": "FRACTION",
        },
    )
    name: str | None = dataclasses.field(
        default=None,
        metadata={"help": "the task's name in the artifact (default: the task name or file stem)"},
    )
    heads: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "a head set (folder or Hub id, from extract-heads): no CIE for this task",
            "metavar": "HEAD_SET",
        },
    )
    plot: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "write the layers x heads CIE heatmap (cie_heatmap.png) and the calibration's layer x "
            "strength accuracy heatmap (calibration_heatmap.png)"
        },
    )


DATACLASSES = (ModelArguments, ExtractIVArguments, ExtractionConfig, HubArguments, OverwriteArguments)


def make_parser(subparsers):
    return subparsers.add_parser(
        "extract-iv",
        dataclass_types=DATACLASSES,
        help="extract a task's instruction vector by causal mediation analysis",
        description="Find the attention heads that carry a task (causal mediation, Todd et al.) and save "
        "their summed outputs as an instruction vector (safetensors + JSON + model card).",
    )


def main(
    model_args: ModelArguments,
    args: ExtractIVArguments,
    extraction: ExtractionConfig,
    hub: HubArguments,
    overwrite: OverwriteArguments,
) -> int:
    from ivtrainer.datasets.tasks import list_tasks, load_examples
    from ivtrainer.hub.push import check_push_target
    from ivtrainer.modeling.loading import load_model
    from ivtrainer.steering.extraction import extract_instruction_vector
    from ivtrainer.steering.head_set import HeadSet
    from ivtrainer.steering.icl import check_extraction_sizes
    from ivtrainer.steering.vector_evaluation import split_pairs
    from ivtrainer.utils.outputs import atomic_dir, check_output_dir

    # Everything that can be checked without the model is checked before loading it.
    examples = load_examples(args.task)
    held_out: list = []
    if args.eval_split is not None:
        examples, held_out = split_pairs(examples, args.eval_split, seed=extraction.seed)
    check_extraction_sizes(examples, n_shots=extraction.n_shots, n_heads=extraction.n_heads, source=args.task)
    out = check_output_dir(
        args.out, inputs=[model_args.model, args.task, args.heads], overwrite=overwrite.overwrite
    )
    head_set = HeadSet.from_pretrained(args.heads) if args.heads else None
    if hub.push_to_hub:
        check_push_target(hub.push_to_hub)

    builtin = args.task in list_tasks()
    model, tokenizer = load_model(model_args.model)
    iv = extract_instruction_vector(
        model,
        tokenizer,
        args.task if builtin and not held_out else examples,
        extraction,
        name=args.name or (args.task if builtin else Path(args.task).stem),
        heads=head_set,
        progress=True,
    )
    evaluation = None
    if held_out:
        evaluation = iv.evaluate(
            model, tokenizer, held_out, shots=(0, 5), demonstrations=examples, progress=True
        )
        iv.metrics["evaluation"] = evaluation.as_dict()
    with atomic_dir(out, marker={"command": "extract-iv"}) as tmp:
        iv.save_pretrained(tmp)
        if args.plot:
            from ivtrainer.evaluation.plotting import plot_cie

            title = f"CIE, {iv.task or 'task'} ({extraction.method})"
            plot_cie(iv.cie, tmp / "cie_heatmap.png", heads=iv.heads, title=title)
            if "calibration" in iv.metrics:
                from ivtrainer.evaluation.plotting import plot_calibration

                plot_calibration(iv.metrics["calibration"], tmp / "calibration_heatmap.png")
    print(f"top {len(iv.heads)} heads (layer, head: mean CIE):")
    for (layer, head), score in zip(iv.heads, iv.head_scores, strict=True):
        print(f"  L{layer:<3d} H{head:<3d} {score:+.4f}")
    print(
        f"edit layer {iv.edit_layer} of {iv.n_layers}, strength {iv.strength:g}; vector norm {iv.vector.norm():.3f}"
    )
    calibration = iv.metrics.get("calibration")
    if calibration:
        print(
            f"calibrated on {calibration['n_prompts']} extraction pairs: zero-shot accuracy "
            f"{calibration['base_accuracy']:.2f} -> {calibration['accuracy']:.2f} with the vector "
            f"({calibration['n_heads']} heads, layer {calibration['edit_layer']}, x{calibration['strength']:g})"
        )
    if evaluation is not None:
        print(evaluation.table())
    plots = " (with cie_heatmap.png" + (", calibration_heatmap.png)" if "calibration" in iv.metrics else ")")
    print(f"saved to {args.out}" + (plots if args.plot else ""))
    if hub.push_to_hub:
        print(f"pushed: {iv.push_to_hub(hub.push_to_hub)}")
    return 0
