"""``ivtrainer forget``: subtract lambda x a LoRA adapter or a full fine-tuning delta (F-Learning)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ivtrainer.cli.common import HubArguments, OverwriteArguments


@dataclasses.dataclass
class ForgetArguments:
    base: str = dataclasses.field(metadata={"help": "'default', a Hub id or a local folder"})
    lam: list[float] = dataclasses.field(
        metadata={"help": "lambda (repeat: one per adapter)", "action": "extend"}
    )
    out: str = dataclasses.field(metadata={"help": "output model folder"})
    adapter: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "a LoRA adapter folder or Hub id (repeat for several)", "action": "extend"},
    )
    finetuned: str | None = dataclasses.field(
        default=None, metadata={"help": "a full fine-tune of --base (Hub id or folder)"}
    )
    check_base_model: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "refuse an adapter whose adapter_config.json names another base model (--no-check-base-model: "
            "subtract it anyway, when the shapes match)"
        },
    )


DATACLASSES = (ForgetArguments, HubArguments, OverwriteArguments)


def make_parser(subparsers):
    return subparsers.add_parser(
        "forget",
        dataclass_types=DATACLASSES,
        help="subtract lambda x a LoRA adapter or a full fine-tuning delta from a model (F-Learning)",
        description="Write base - lambda * delta, where delta is a LoRA adapter's update or "
        "finetuned - base (Ni et al., 2024: forgetting before learning).",
    )


def main(args: ForgetArguments, hub: HubArguments, overwrite: OverwriteArguments) -> int:
    from ivtrainer.arithmetic.forget import forget
    from ivtrainer.arithmetic.subtraction import check_lambdas
    from ivtrainer.errors import InvalidInputError
    from ivtrainer.hub.push import check_push_target, push_folder
    from ivtrainer.utils.outputs import MARKER

    # The flags' own rules, named as flags; forget() checks everything else before any work.
    if bool(args.adapter) == bool(args.finetuned):
        raise InvalidInputError(
            "pass either --adapter (one or more) or --finetuned, not both and not neither"
        )
    n = len(args.adapter) if args.adapter else 1
    lams = check_lambdas(args.lam * n if len(args.lam) == 1 else args.lam, n)
    if any(lam < 0 for lam in lams):
        raise InvalidInputError(
            f"--lam must be >= 0 (forget subtracts lambda x delta; 0 changes nothing), got {args.lam}"
        )
    if hub.push_to_hub:
        check_push_target(hub.push_to_hub)
    result = forget(
        args.base,
        args.out,
        adapters=args.adapter,
        finetuned=args.finetuned,
        lam=lams,
        overwrite=overwrite.overwrite,
        check_base_model=args.check_base_model,
    )
    delta = f"adapter(s) {args.adapter}" if args.adapter else f"task vector {args.finetuned} - {args.base}"
    print(f"wrote {args.out}: {args.base} - lambda {lams} x {delta}")
    print(
        f"||lambda x delta|| = {result.delta_norm:.4g}, {result.relative:.3g} of the norm of the "
        f"{result.tensors} weight tensors it changed"
    )
    if hub.push_to_hub:
        import shutil

        def copy(folder: Path) -> None:
            shutil.copytree(result.path, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MARKER))

        print(f"pushed: {push_folder(copy, hub.push_to_hub)}")
    return 0
