"""Subtracting LoRA adapters: ``W <- W - lam * scaling * B @ A`` per module (F-Learning's LoRA
variant). The delta is PEFT's own ``LoraLayer.get_delta_weight``: GPT-2 ``Conv1D`` transposes,
embedding adapters, rsLoRA and rank/alpha patterns are PEFT's business, not ours. Computed in
float32, cast back to the stored dtype."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ivtrainer.arithmetic.subtraction import as_list, check_lambdas, finish_stats, record_change
from ivtrainer.errors import InputNotFoundError, InvalidInputError, IVTrainerError
from ivtrainer.utils.distributed import gathered
from ivtrainer.utils.outputs import scratch_dir


class AdapterMismatchError(IVTrainerError, ValueError):
    """The adapter cannot be subtracted from this model (type, base model or shapes)."""


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
            "pass check_base_model=False (CLI: --no-check-base-model) if these are the same weights"
        )


def check_adapter_configs(
    adapters: Sequence, model_name: str | None, *, check_base_model: bool = True
) -> None:
    """The checks of :func:`subtract_adapter` that need only the adapters' configs (type, DoRA,
    base model name): run them before loading a model."""
    from peft import PeftConfig

    for adapter in adapters:
        where = os.fspath(adapter)
        folder = _adapter_folder(where)
        try:
            config = PeftConfig.from_pretrained(str(folder))
        except Exception as exc:
            raise AdapterMismatchError(
                f"cannot read the adapter config of {where!r} ({type(exc).__name__}): pass a PEFT adapter folder "
                "(with adapter_config.json) or a Hub id"
            ) from None
        _check_config(where, config, model_name, check_base_model)


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
    shape: Any = getattr(module.weight, "ds_shape", module.weight.shape)  # ZeRO-3 keeps the real shape aside
    if type(module).__name__ == "Conv1D":  # weight stored as (in, out)
        return int(shape[0]), int(shape[1])
    return int(shape[1]), int(shape[0])


def _adapter_folder(where: str) -> Path:
    """A local adapter folder, or a Hub adapter (``id`` or ``id@revision``) downloaded from one
    commit; a path that does not exist fails as one."""
    from ivtrainer.hub.push import looks_like_path, split_revision

    folder = Path(where).expanduser()
    if folder.is_dir():
        return folder
    repo, revision = split_revision(where)
    if folder.exists() or looks_like_path(repo):
        raise InputNotFoundError(
            f"{where!r} is {'a file' if folder.exists() else 'not an existing folder'}; pass a PEFT adapter folder "
            "(adapter_config.json + adapter_model.safetensors) or a Hub id"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo, revision=revision, allow_patterns=["adapter_config.json", "adapter_model.*"]
            )
        )
    except Exception as exc:
        raise InputNotFoundError(
            f"cannot find adapter {where!r}: not a local folder, and the Hub download failed ({type(exc).__name__})"
        ) from None


def _load_adapter_files(adapter) -> tuple[object, dict[str, torch.Tensor], str]:
    """(PeftConfig, state dict, where) for an adapter folder or Hub id, read without touching a model."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    where = os.fspath(adapter)
    folder = _adapter_folder(where)
    try:
        config = PeftConfig.from_pretrained(str(folder))
        files = sorted(folder.glob("adapter_model.safetensors")) or sorted(folder.glob("adapter_model.bin"))
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
def _subtract_in_place(
    peft_model, names: Sequence[str], lams: Sequence[float], stats: dict[str, float] | None = None
) -> None:
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
            with gathered(weight):  # whole under ZeRO-3, else a no-op
                before = weight.data.float()
                after = (before - lam * delta.to(weight.device)).to(weight.dtype)
                record_change(stats, before, after.float())
                weight.data.copy_(after)


def subtract_adapter(
    model: nn.Module,
    adapter: Any = None,
    lam: float | Sequence[float] = 1.0,
    *,
    adapter_name: str | None = None,
    check_base_model: bool = True,
    stats: dict[str, float] | None = None,
) -> nn.Module:
    """``W <- W - lam * delta_W`` for every module a LoRA adapter touches.

    Args:
        model: a transformers model, or a ``PeftModel``. With ``adapter=None`` the PeftModel's own
            adapters are subtracted (``adapter_name`` picks one; default all) and the plain base
            model is returned. With an ``adapter``, it is subtracted from the PeftModel's base
            weights and the PeftModel is returned with its own adapters untouched (F-Learning's
            LoRA variant: forget one adapter, then train another).
        adapter: an adapter folder, a Hub id, a ``PeftModel``, or a list of these.
        lam: one lambda, or one per adapter.
        stats: a dict to fill with ``delta_norm`` (||lam * delta||), ``weight_norm`` (||W|| of
            the changed weights), ``relative`` (their ratio) and ``tensors`` (how many changed).

    Returns the model without the subtracted LoRA layers, ready for ``save_pretrained`` /
    ``push_to_hub``. Everything is checked before any weight changes: lambdas finite, LoRA (not
    DoRA, not another PEFT type), trained on this base model (``check_base_model``), shapes matching.
    """
    PeftModel, _ = _peft_types()
    if isinstance(model, PeftModel) and adapter is None:
        names = [adapter_name] if adapter_name else list(model.peft_config)
        lams = check_lambdas(as_list(lam, len(names)), len(names))
        for name in names:
            if name not in model.peft_config:
                raise InvalidInputError(
                    f"the PeftModel has no adapter {name!r}; it has {list(model.peft_config)}"
                )
            _check_config(name, model.peft_config[name], None, False)
        _subtract_in_place(model, names, lams, stats)
        finish_stats(stats)
        return unload_adapters(model)

    if adapter is None:
        raise InvalidInputError("pass the adapter to subtract (a folder, a Hub id or a PeftModel)")
    adapters = as_list(adapter)
    lams = check_lambdas(as_list(lam, len(adapters)), len(adapters))
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    model_name = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    loaded = []
    with scratch_dir() as tmp:
        for i, item in enumerate(adapters):
            if isinstance(item, PeftModel):  # its trained adapter, as files
                item = save_adapter(item, Path(tmp) / str(i), adapter_name)
            config, state, where = _load_adapter_files(item)
            _check_config(where, config, model_name if check_base_model else None, check_base_model)
            _check_shapes(base, state, where)
            loaded.append((config, state, where))
        result = _attach_and_subtract(model, loaded, lams, stats)
    finish_stats(stats)
    return result


def save_adapter(peft_model, target: Path, adapter_name: str | None = None) -> Path:
    """Save one adapter of a PeftModel (default: its active one) as a plain adapter folder
    (PEFT puts adapters not named "default" in a subfolder; this returns the folder itself)."""
    name = adapter_name or peft_model.active_adapter
    if isinstance(name, list):
        name = name[0]
    target = Path(target)
    peft_model.save_pretrained(str(target), selected_adapters=[name])
    return target / name if (target / name / "adapter_config.json").is_file() else target


def _attach_and_subtract(
    model: nn.Module, loaded, lams: Sequence[float], stats: dict[str, float] | None = None
) -> nn.Module:
    """Attach the LoRA weights (only those: an adapter that targets embeddings also stores full
    copies of them, which PEFT's loader would write over this model's own) and subtract."""
    from peft import get_peft_model, set_peft_model_state_dict

    PeftModel, _ = _peft_types()
    keep = isinstance(model, PeftModel)  # subtract from its base, keep its own adapters
    peft_model: Any = model if keep else None
    trainable = None if keep else {n: p.requires_grad for n, p in model.named_parameters()}
    active = peft_model.active_adapter if keep else None
    names = []
    for i, (config, state, where) in enumerate(loaded):
        name = f"subtract_{i}"
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        lora_state = {k: v for k, v in state.items() if "lora_" in k}
        result: Any = set_peft_model_state_dict(peft_model, lora_state, adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise AdapterMismatchError(
                f"adapter {where!r} has weights this model cannot take: {result.unexpected_keys[:3]}"
            )
        names.append(name)
    _subtract_in_place(peft_model, names, lams, stats)
    if not keep:
        return unload_adapters(peft_model, trainable)
    peft_model.set_adapter(active)
    for name in names:
        peft_model.delete_adapter(name)
    return peft_model


def unload_adapters(peft_model, trainable: dict[str, bool] | None = None) -> nn.Module:
    """``unload()``, with ``requires_grad`` as before PEFT froze the base weights (default: all
    trainable, as a freshly loaded model)."""
    model = peft_model.unload()
    for name, p in model.named_parameters():
        p.requires_grad_(True if trainable is None else trainable.get(name, True))
    return model
