"""Subtracting a full fine-tuning delta in memory: ``theta - lam * (theta_ft - theta)`` on a
loaded model (F-Learning's FT variant), one tensor at a time (also under ZeRO-3)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ivtrainer.arithmetic.safetensors_files import FolderTensors, model_folder
from ivtrainer.arithmetic.subtraction import check_lambdas, finish_stats, record_change
from ivtrainer.errors import InvalidInputError
from ivtrainer.utils.distributed import gathered


@torch.no_grad()
def subtract_model_delta(
    model: nn.Module,
    finetuned: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    lam: float,
    *,
    base: nn.Module | Mapping[str, torch.Tensor] | None = None,
    stats: dict[str, float] | None = None,
) -> nn.Module:
    """In memory: every parameter of ``model`` becomes ``theta - lam * (theta_ft - theta)``.

    ``theta`` is ``base`` (a module or state dict, e.g. a CPU snapshot taken before ``model`` was
    fine-tuned in place) or, by default, ``model``'s current weights. ``finetuned`` is a module, a
    state dict or a model folder (read one tensor at a time). A PeftModel's base weights are
    updated and its LoRA weights left alone. Computed in float32, cast back; returns ``model``.
    ``stats`` is filled as by :func:`subtract_adapter`.
    """
    (lam,) = check_lambdas([lam], 1)
    params = {_plain_name(n): p for n, p in model.named_parameters() if "lora_" not in n}
    tuned = _tensor_source(finetuned)
    theta = _tensor_source(base) if base is not None else None
    missing = [n for n in params if n not in tuned]
    if missing:
        raise InvalidInputError(
            f"the fine-tuned weights lack {missing[:3]} ({len(missing)} tensors); "
            "the delta needs a fine-tune of this same model"
        )
    for name, p in params.items():
        t, shape = tuned[name], tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the real shape aside
        if tuple(t.shape) != shape:
            raise InvalidInputError(
                f"{name} has shape {tuple(t.shape)} in the fine-tuned weights but {shape} here"
            )
    for name, p in tqdm(params.items(), desc="subtract delta", unit="tensor", leave=False):
        with gathered(p):  # whole under ZeRO-3 (one tensor at a time), else a no-op
            theta32 = (theta[name] if theta is not None else p.data).to(p.device, torch.float32)
            delta = tuned[name].to(p.device, torch.float32) - theta32
            result = (theta32 - lam * delta).to(p.dtype)
            record_change(stats, theta32, result.float())
            p.data.copy_(result)
    finish_stats(stats)
    return model


def _plain_name(name: str) -> str:
    """A parameter name as the plain transformers model saves it (no PEFT wrapping)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _tensor_source(source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return {_plain_name(n): p.detach() for n, p in source.named_parameters() if "lora_" not in n}
    if isinstance(source, Mapping):
        return {_plain_name(n): t for n, t in source.items()}
    return FolderTensors(model_folder(source))
