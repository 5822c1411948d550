"""``ivtrainer evaluate-edits``: Reliability, Generality and Locality of a knowledge-edited model."""

from __future__ import annotations

import dataclasses
import sys

from ivtrainer.cli.common import OverwriteArguments, default_of
from ivtrainer.evaluation.edit_metrics import evaluate_edits


@dataclasses.dataclass
class EvaluateEditsArguments:
    model: str = dataclasses.field(metadata={"help": "the edited model: 'default', a Hub id or a folder"})
    data: str = dataclasses.field(
        default="builtin",
        metadata={
            "help": "'builtin' (counterfactuals built from the facts the unedited model knows), or a JSON/JSONL "
            "file in CounterFact (EasyEdit) or ZsRE (MEND) format"
        },
    )
    base: str | None = dataclasses.field(
        default=None,
        metadata={"help": "the unedited model, for Locality (and for building the built-in set)"},
    )
    batch_size: int = dataclasses.field(
        default=default_of(evaluate_edits, "batch_size"), metadata={"help": "prompts per forward"}
    )
    device: str | None = dataclasses.field(
        default=None,
        metadata={"help": "where to run: cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)"},
    )
    threads: int | None = dataclasses.field(
        default=None, metadata={"help": "CPU threads for torch (default: torch's choice)"}
    )
    json: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "print the scores as JSON (to stdout, or to FILE when given)",
            "nargs": "?",
            "const": "-",
            "metavar": "FILE",
        },
    )


DATACLASSES = (EvaluateEditsArguments, OverwriteArguments)


def make_parser(subparsers):
    return subparsers.add_parser(
        "evaluate-edits",
        dataclass_types=DATACLASSES,
        help="Reliability, Generality and Locality of a knowledge-edited model (EasyEdit semantics)",
        description="Teacher-forced token accuracy of the new targets after the edit prompts (Reliability) "
        "and their paraphrases (Generality), and agreement with the unedited --base model on unrelated "
        "prompts (Locality).",
    )


def main(args: EvaluateEditsArguments, overwrite: OverwriteArguments) -> int:
    import json

    import torch

    from ivtrainer.datasets.edits import BUILTIN, load_edits
    from ivtrainer.errors import InvalidInputError
    from ivtrainer.modeling.loading import load_model
    from ivtrainer.utils.outputs import atomic_file, check_output_file

    def warn(message: str) -> None:
        print(f"ivtrainer evaluate-edits: warning: {message}", file=sys.stderr)

    # file errors before any load
    records = None if args.data == BUILTIN else load_edits(args.data, on_skip=warn)
    to_file = args.json is not None and args.json != "-"
    if args.json is not None and args.json != "-":
        json_out = check_output_file(
            args.json, inputs=[args.data, args.model, args.base], overwrite=overwrite.overwrite
        )
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidInputError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise InvalidInputError(
            f"--device {args.device!r} is not a device; use cpu, cuda, cuda:N or mps"
        ) from None
    base = tokenizer = None
    if args.base:
        base, tokenizer = load_model(args.base)
        base.to(device)
    model, model_tokenizer = load_model(args.model)
    model.to(device)
    tokenizer = tokenizer or model_tokenizer
    if records is None:  # the facts the unedited model knows
        records = load_edits(BUILTIN, model=base if base is not None else model, tokenizer=tokenizer)
    scores = evaluate_edits(
        model, tokenizer, records, base_model=base, batch_size=args.batch_size, progress=True
    )
    text = json.dumps({"n_edits": len(records), **scores}, indent=2) + "\n"
    if args.json == "-":  # machine-readable stdout: the JSON alone
        sys.stdout.write(text)
        return 0
    print(f"{len(records)} edits, {args.model}" + (f" vs unedited {args.base}" if base is not None else ""))
    for name in ("reliability", "generality", "locality"):
        value = f"{100 * scores[name]:.1f}" if name in scores else "n/a (pass --base, the unedited model)"
        print(f"{name:<12} {value}")
    if to_file:
        with atomic_file(json_out) as tmp:
            tmp.write_text(text)
        print(f"wrote {args.json}")
    return 0
