"""``ivtrainer analyze``: what fine-tuning did to an instruction vector (IV dynamics)."""

from __future__ import annotations

import dataclasses

from ivtrainer.cli.common import OverwriteArguments, default_of
from ivtrainer.steering.dynamics import analyze_iv


@dataclasses.dataclass
class AnalyzeArguments:
    model: str = dataclasses.field(metadata={"help": "the fine-tuned model: 'default', a Hub id or a folder"})
    iv: str = dataclasses.field(metadata={"help": "the original instruction vector (folder or Hub id)"})
    out: str = dataclasses.field(
        metadata={"help": "output folder (analysis.json, reextracted_iv/, cie_change.png)"}
    )
    base: str | None = dataclasses.field(
        default=None,
        metadata={"help": "the model before fine-tuning, to report its similarity and accuracy too"},
    )
    task: str | None = dataclasses.field(
        default=None, metadata={"help": "the task's pairs if the IV names no built-in task (JSON/JSONL)"}
    )
    n_prompts: int = dataclasses.field(
        default=default_of(analyze_iv, "n_prompts"),
        metadata={"help": "held-out prompts for similarity and accuracy"},
    )
    plot: bool = dataclasses.field(
        default=True, metadata={"help": "write cie_change.png (--no-plot: the JSON only)"}
    )


DATACLASSES = (AnalyzeArguments, OverwriteArguments)


def make_parser(subparsers):
    return subparsers.add_parser(
        "analyze",
        dataclass_types=DATACLASSES,
        help="what fine-tuning did to an instruction vector (IV dynamics)",
        description="Re-extract an instruction vector on a fine-tuned model and compare it with the original "
        "(cosine, head overlap, CIE change heatmap); report the edit layer's hidden-state similarity to the IV "
        "next to task accuracy on held-out prompts.",
    )


def main(args: AnalyzeArguments, overwrite: OverwriteArguments) -> int:
    from ivtrainer.datasets.tasks import load_examples
    from ivtrainer.modeling.loading import load_model
    from ivtrainer.steering.dynamics import save_analysis
    from ivtrainer.steering.instruction_vector import InstructionVector
    from ivtrainer.utils.outputs import check_output_dir

    out = check_output_dir(
        args.out, inputs=[args.model, args.iv, args.base, args.task], overwrite=overwrite.overwrite
    )
    iv = InstructionVector.from_pretrained(args.iv)
    examples = None if args.task is None else load_examples(args.task)
    model, tokenizer = load_model(args.model)
    base = load_model(args.base)[0] if args.base else None
    result = analyze_iv(model, tokenizer, iv, examples=examples, base_model=base, n_prompts=args.n_prompts)
    save_analysis(result, out, plot=args.plot, overwrite=overwrite.overwrite)
    print(
        f"task {result.task or args.task}: IV cosine (before vs after) {result.cosine:.3f}, "
        f"head overlap {result.head_overlap:.0%} ({len(result.shared_heads)}/{len(iv.heads)})"
    )
    for name, values in result.evaluation.items():
        print(f"{name:<11} " + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    print(f"wrote {args.out}")
    return 0
