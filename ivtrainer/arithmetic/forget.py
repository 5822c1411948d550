"""``ivtrainer forget`` as a function: a base model minus lambda times a delta (LoRA adapters or a
full fine-tune), written as a new model folder with its model card."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ivtrainer.arithmetic.adapter_subtraction import check_adapter_configs, subtract_adapter
from ivtrainer.arithmetic.subtraction import as_list, check_lambdas
from ivtrainer.arithmetic.task_vector import task_vector_plan, write_task_vector
from ivtrainer.errors import InvalidInputError
from ivtrainer.utils.outputs import atomic_dir, check_output_dir

__all__ = ["ForgetResult", "forget"]

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class ForgetResult:
    """Where the edited model went and the size of what was subtracted (a no-op shows)."""

    path: Path
    lambdas: list[float]
    delta_norm: float  # ||lambda x delta||
    weight_norm: float  # ||W|| of the tensors it changed
    relative: float  # their ratio
    tensors: int


def forget(
    base: PathLike,
    out: PathLike,
    *,
    adapters: PathLike | Sequence[PathLike] | None = None,
    finetuned: PathLike | None = None,
    lam: float | Sequence[float] = 1.0,
    overwrite: bool = False,
    check_base_model: bool = True,
) -> ForgetResult:
    """Write ``base - lam * delta`` to ``out``: the weights, the tokenizer and a model card.

    The delta is one or more LoRA ``adapters`` (folders or Hub ids; one lambda, or one per adapter)
    or a full fine-tune (``finetuned``: its weights minus ``base``'s, streamed tensor by tensor).
    Everything is checked before a model is loaded or a file written: exactly one kind of delta,
    lambdas finite and >= 0, the adapters' configs (LoRA, trained on ``base`` unless
    ``check_base_model=False``), ``out`` by :func:`ivtrainer.utils.outputs.check_output_dir`'s
    rules. ``out`` is written to a temporary folder and renamed into place.
    """
    if (adapters is None) == (finetuned is None):
        raise InvalidInputError("pass either adapters= (one or more) or finetuned=, not both and not neither")
    adapter_list = [os.fspath(a) for a in as_list(adapters)] if adapters is not None else []
    n = len(adapter_list) or 1
    lams = check_lambdas(as_list(lam, n), n)
    if any(x < 0 for x in lams):
        raise InvalidInputError(
            f"lam must be >= 0 (forget subtracts lambda x delta; 0 changes nothing), got {lam}"
        )
    target = check_output_dir(out, inputs=[base, finetuned, *adapter_list], overwrite=overwrite)

    stats: dict[str, float] = {}
    card = _card(base, adapter_list, finetuned, lams)
    if finetuned is not None:
        plan = task_vector_plan(base, finetuned)  # names and shapes checked before writing
        with atomic_dir(target, marker={"command": "forget"}) as tmp:
            write_task_vector(plan, lams[0], tmp, stats)
            card.save(str(tmp / "README.md"))
    else:
        from ivtrainer.modeling.loading import DEFAULT_MODEL, load_model

        base_name = (
            None if os.fspath(base) == DEFAULT_MODEL else os.fspath(base)
        )  # checked after loading then
        check_adapter_configs(adapter_list, base_name, check_base_model=check_base_model)
        model, tokenizer = load_model(base)
        edited: Any = subtract_adapter(
            model,
            adapter_list if n > 1 else adapter_list[0],
            lams if n > 1 else lams[0],
            check_base_model=check_base_model,
            stats=stats,
        )
        with atomic_dir(target, marker={"command": "forget"}) as tmp:
            edited.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            card.save(str(tmp / "README.md"))
    return ForgetResult(
        path=target,
        lambdas=lams,
        delta_norm=stats["delta_norm"],
        weight_norm=stats["weight_norm"],
        relative=stats["relative"],
        tensors=int(stats["tensors"]),
    )


def _card(base: PathLike, adapters: list[str], finetuned: PathLike | None, lams: list[float]):
    """The model card (``huggingface_hub.ModelCard``): what was subtracted from what, with which lambda."""
    from ivtrainer.hub.model_cards import edited_model_card

    parameters: dict[str, Any]
    if adapters:
        parameters = {
            "delta": "LoRA adapter update (scaling * B @ A)",
            **{
                f"adapter {i + 1}": f"{a} (lambda {lam:g})"
                for i, (a, lam) in enumerate(zip(adapters, lams, strict=True))
            },
        }
    else:
        parameters = {
            "delta": f"full fine-tune minus its base: `{finetuned}` - `{base}`",
            "lambda": lams[0],
        }
    return edited_model_card("forget", base_model=os.fspath(base), parameters=parameters)
