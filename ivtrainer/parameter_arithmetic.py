"""Parameter arithmetic for forgetting: ``W <- W - lam * delta_W`` (Ni et al., 2024).

- :func:`subtract_adapter`: the delta is a PEFT LoRA adapter, ``scaling * B @ A`` per module,
  taken from PEFT itself (``LoraLayer.get_delta_weight``: GPT-2 ``Conv1D`` transposes, embedding
  adapters, rsLoRA and rank/alpha patterns are PEFT's business, not ours).
- :func:`subtract_task_vector`: the delta is a full fine-tune minus its base, streamed tensor by
  tensor over safetensors shards.

Both compute in float32 and cast back to the stored dtype.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import IVTrainerError

__all__ = ["AdapterMismatchError", "subtract_adapter"]


class AdapterMismatchError(IVTrainerError, ValueError):
    """The adapter cannot be subtracted from this model (type, base model or shapes)."""


def _as_list(value, n: int | None = None) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return items * n if n is not None and len(items) == 1 else items


def _check_lambdas(lams: Sequence, n: int) -> list[float]:
    if len(lams) != n:
        raise ValueError(f"got {len(lams)} lambdas for {n} adapters; pass one lambda, or one per adapter")
    out = []
    for lam in lams:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise ValueError(f"lambda must be a finite number, got {lam!r}")
        out.append(float(lam))
    return out


def _peft_types():
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    return PeftModel, LoraLayer


def _check_config(name: str, config, model_name: str | None, check_base_model: bool) -> None:
    from peft import PeftType

    if config.peft_type != PeftType.LORA:
        raise AdapterMismatchError(
            f"adapter {name!r} is a {config.peft_type.value} adapter; only LoRA adapters have an additive delta to subtract"
        )
    if getattr(config, "use_dora", False):
        raise AdapterMismatchError(
            f"adapter {name!r} uses DoRA, whose update rescales the weight norm and is not an additive delta; "
            "subtracting it is not defined. Retrain it as plain LoRA (use_dora=False)"
        )
    base = getattr(config, "base_model_name_or_path", None)
    if check_base_model and base and model_name and _norm(base) != _norm(model_name):
        raise AdapterMismatchError(
            f"adapter {name!r} was trained on {base!r}, but the model is {model_name!r}; "
            "pass check_base_model=False if these are the same weights"
        )


def _norm(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name.rstrip("/")


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Compare the adapter's A/B shapes with the target modules before anything is modified."""
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        for part, dim, what in (
            (".lora_A.", 1, "in"),
            (".lora_B.", 0, "out"),
            (".lora_embedding_A.", 1, "in"),
            (".lora_embedding_B.", 0, "out"),
        ):
            if part not in key:
                continue
            path = key.split(part)[0].removeprefix("base_model.model.")
            module = modules.get(path)
            if module is None:
                raise AdapterMismatchError(
                    f"adapter {name!r} targets {path!r}, which this model does not have"
                )
            weight = getattr(module, "weight", None)
            if weight is None:
                raise AdapterMismatchError(f"adapter {name!r} targets {path!r}, which has no weight")
            expected = _features(module)[0 if what == "in" else 1]
            if tensor.shape[dim] != expected:
                raise AdapterMismatchError(
                    f"adapter {name!r} does not fit this model: {key} has {tensor.shape[dim]} {what}-features, "
                    f"{path} has {expected}; it was trained on a model of another size"
                )


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear / GPT-2 Conv1D / Embedding."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if type(module).__name__ == "Conv1D":  # weight stored as (in, out)
        return module.weight.shape[0], module.weight.shape[1]
    return module.weight.shape[1], module.weight.shape[0]


def _load_adapter_files(adapter) -> tuple[object, dict[str, torch.Tensor], str]:
    """(PeftConfig, state dict, where) for an adapter folder or Hub id, read without touching a model."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    where = os.fspath(adapter)
    folder = Path(where).expanduser()
    try:
        config = PeftConfig.from_pretrained(where)
        if folder.is_dir():
            files = sorted(folder.glob("adapter_model.safetensors")) or sorted(
                folder.glob("adapter_model.bin")
            )
        else:
            from huggingface_hub import hf_hub_download

            files = [Path(hf_hub_download(where, "adapter_model.safetensors"))]
    except Exception as exc:
        raise AdapterMismatchError(
            f"cannot read a PEFT adapter from {where!r} ({type(exc).__name__}): pass a folder written by "
            "save_pretrained (adapter_config.json + adapter_model.safetensors), a Hub id or a PeftModel"
        ) from None
    if not files:
        raise AdapterMismatchError(f"{where!r} has adapter_config.json but no adapter_model.safetensors")
    state = (
        load_file(files[0]) if files[0].suffix == ".safetensors" else torch.load(files[0], weights_only=True)
    )
    return config, state, where


@torch.no_grad()
def _subtract_in_place(peft_model, names: Sequence[str], lams: Sequence[float]) -> None:
    _, LoraLayer = _peft_types()
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, lam in zip(names, lams, strict=True):
            if name not in module.lora_A and name not in getattr(module, "lora_embedding_A", {}):
                continue
            # float32 adapter weights make PEFT's delta float32, whatever the base dtype.
            for container in (module.lora_A, module.lora_B):
                if name in container:
                    container[name].float()
            for container in (
                getattr(module, "lora_embedding_A", {}),
                getattr(module, "lora_embedding_B", {}),
            ):
                if name in container:
                    container[name].data = container[name].data.float()
            delta = module.get_delta_weight(name).float()
            weight = module.get_base_layer().weight
            weight.data = (weight.data.float() - lam * delta.to(weight.device)).to(weight.dtype)


def subtract_adapter(
    model: nn.Module,
    adapter=None,
    lam: float | Sequence[float] = 1.0,
    *,
    adapter_name: str | None = None,
    check_base_model: bool = True,
) -> nn.Module:
    """``W <- W - lam * delta_W`` for every module a LoRA adapter touches; returns a plain model.

    Args:
        model: a transformers model, or a ``PeftModel`` whose own adapters are subtracted when
            ``adapter`` is None (``adapter_name`` picks one; default all).
        adapter: an adapter folder, a Hub id, a ``PeftModel``, or a list of these.
        lam: one lambda, or one per adapter.

    Returns the base model without LoRA layers, ready for ``save_pretrained``/``push_to_hub``.
    Everything is checked before any weight changes: lambdas finite, LoRA (not DoRA, not another
    PEFT type), trained on this base model (``check_base_model``), shapes matching.
    """
    PeftModel, _ = _peft_types()
    if isinstance(model, PeftModel):
        if adapter is not None:
            raise ValueError(
                "model is already a PeftModel: subtract its own adapters (adapter=None), or pass the base model"
            )
        names = [adapter_name] if adapter_name else list(model.peft_config)
        lams = _check_lambdas(_as_list(lam, len(names)), len(names))
        for name in names:
            if name not in model.peft_config:
                raise ValueError(f"the PeftModel has no adapter {name!r}; it has {list(model.peft_config)}")
            _check_config(name, model.peft_config[name], None, False)
        _subtract_in_place(model, names, lams)
        return model.unload()

    if adapter is None:
        raise ValueError("pass the adapter to subtract (a folder, a Hub id or a PeftModel)")
    adapters = _as_list(adapter)
    lams = _check_lambdas(_as_list(lam, len(adapters)), len(adapters))
    model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    loaded = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, item in enumerate(adapters):
            if isinstance(item, PeftModel):  # its trained adapter, as files
                item.save_pretrained(
                    Path(tmp) / str(i), selected_adapters=[adapter_name] if adapter_name else None
                )
                folder = Path(tmp) / str(i)
                if adapter_name:
                    folder = folder / adapter_name if (folder / adapter_name).is_dir() else folder
                item = folder
            config, state, where = _load_adapter_files(item)
            _check_config(where, config, model_name if check_base_model else None, check_base_model)
            _check_shapes(model, state, where)
            loaded.append((config, state, where))
        return _attach_and_subtract(model, loaded, lams)


def _attach_and_subtract(model: nn.Module, loaded, lams: Sequence[float]) -> nn.Module:
    """Attach the LoRA weights (only those: an adapter that targets embeddings also stores full
    copies of them, which PEFT's loader would write over this model's own) and subtract."""
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = None
    names = []
    for i, (config, state, where) in enumerate(loaded):
        name = f"subtract_{i}"
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        lora_state = {k: v for k, v in state.items() if "lora_" in k}
        result = set_peft_model_state_dict(peft_model, lora_state, adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise AdapterMismatchError(
                f"adapter {where!r} has weights this model cannot take: {result.unexpected_keys[:3]}"
            )
        names.append(name)
    _subtract_in_place(peft_model, names, lams)
    return peft_model.unload()
