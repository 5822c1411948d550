"""Parameter arithmetic for forgetting: ``W <- W - lam * delta_W`` (Ni et al., 2024).

- :func:`subtract_adapter`: the delta is a PEFT LoRA adapter, ``scaling * B @ A`` per module,
  taken from PEFT itself (``LoraLayer.get_delta_weight``: GPT-2 ``Conv1D`` transposes, embedding
  adapters, rsLoRA and rank/alpha patterns are PEFT's business, not ours).
- :func:`subtract_task_vector`: the delta is a full fine-tune minus its base, streamed tensor by
  tensor over safetensors shards.

Both compute in float32 and cast back to the stored dtype.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ivtrainer.errors import InputNotFoundError, InvalidInputError, IVTrainerError
from ivtrainer.utils.checks import finite_number
from ivtrainer.utils.distributed import gathered
from ivtrainer.utils.outputs import atomic_dir, check_output_dir, scratch_dir

__all__ = [
    "AdapterMismatchError",
    "check_adapter_configs",
    "save_adapter",
    "subtract_adapter",
    "subtract_model_delta",
    "subtract_task_vector",
]


class AdapterMismatchError(IVTrainerError, ValueError):
    """The adapter cannot be subtracted from this model (type, base model or shapes)."""


def _as_list(value, n: int | None = None) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return items * n if n is not None and len(items) == 1 else items


def check_lambdas(lams: Sequence, n: int) -> list[float]:
    if len(lams) != n:
        raise InvalidInputError(
            f"got {len(lams)} lambdas for {n} adapters; pass one lambda, or one per adapter"
        )
    return [finite_number("lambda", lam) for lam in lams]


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


def _record(stats: dict[str, float] | None, before: torch.Tensor, after: torch.Tensor) -> None:
    """Accumulate the squared norms of a change and of the weight it changed (float32)."""
    if stats is not None:
        stats["delta_sq"] = stats.get("delta_sq", 0.0) + float((after - before).square().sum())
        stats["weight_sq"] = stats.get("weight_sq", 0.0) + float(before.square().sum())
        stats["tensors"] = stats.get("tensors", 0) + 1


def _finish_stats(stats: dict[str, float] | None) -> None:
    """``delta_norm`` = ||lambda * delta||, ``weight_norm`` = ||W|| of the changed tensors, and
    ``relative`` = their ratio: what a user checks to see that the subtraction did something."""
    if stats is not None:
        delta, weight = math.sqrt(stats.pop("delta_sq", 0.0)), math.sqrt(stats.pop("weight_sq", 0.0))
        stats.update(delta_norm=delta, weight_norm=weight, relative=delta / weight if weight else 0.0)


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
                _record(stats, before, after.float())
                weight.data.copy_(after)


def subtract_adapter(
    model: nn.Module,
    adapter=None,
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
        lams = check_lambdas(_as_list(lam, len(names)), len(names))
        for name in names:
            if name not in model.peft_config:
                raise InvalidInputError(
                    f"the PeftModel has no adapter {name!r}; it has {list(model.peft_config)}"
                )
            _check_config(name, model.peft_config[name], None, False)
        _subtract_in_place(model, names, lams, stats)
        _finish_stats(stats)
        return unload_adapters(model)

    if adapter is None:
        raise InvalidInputError("pass the adapter to subtract (a folder, a Hub id or a PeftModel)")
    adapters = _as_list(adapter)
    lams = check_lambdas(_as_list(lam, len(adapters)), len(adapters))
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
    _finish_stats(stats)
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
            _record(stats, theta32, result.float())
            p.data.copy_(result)
    _finish_stats(stats)
    return model


def _plain_name(name: str) -> str:
    """A parameter name as the plain transformers model saves it (no PEFT wrapping)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


class _FolderTensors(Mapping):
    """Tensors of a safetensors model folder, read on access."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.map = folder, _weight_map(folder)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.folder / self.map[name], framework="pt") as f:
            return f.get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self.map

    def __iter__(self):
        return iter(self.map)

    def __len__(self) -> int:
        return len(self.map)


def _tensor_source(source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return {_plain_name(n): p.detach() for n, p in source.named_parameters() if "lora_" not in n}
    if isinstance(source, Mapping):
        return {_plain_name(n): t for n, t in source.items()}
    return _FolderTensors(_model_folder(source))


# -- full-model task vectors, streamed ------------------------------------------------------------

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_SKIP_FILES = {"README.md", "ivtrainer_source.json", ".gitattributes", ".ivtrainer-output.json"}


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _read(f, info: dict, start: int) -> torch.Tensor:
    """One tensor, read with plain file I/O: no mmap, so only this tensor is resident."""
    begin, end = info["data_offsets"]
    f.seek(start + begin)
    buffer = bytearray(end - begin)
    if f.readinto(buffer) != len(buffer):
        raise InvalidInputError(f"{f.name} is truncated: a tensor ends past the end of the file")
    dtype = _DTYPES[info["dtype"]]
    if not buffer:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def _weight_map(folder: Path) -> dict[str, str]:
    """tensor name -> shard file name."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = folder / "model.safetensors"
    if single.is_file():
        return dict.fromkeys(_header(single)[0], "model.safetensors")
    raise InvalidInputError(
        f"{folder} has no model.safetensors(.index.json); re-save it with model.save_pretrained(dir) "
        "(safetensors is the default)"
    )


def _model_folder(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    from ivtrainer.hub.push import looks_like_path, split_revision
    from ivtrainer.modeling.loading import DEFAULT_MODEL, default_model_path

    name = os.fspath(name_or_path)
    if name == DEFAULT_MODEL:
        return default_model_path()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    name, pinned = split_revision(name)
    revision = revision or pinned
    if path.exists() or looks_like_path(name):
        raise InputNotFoundError(
            f"{name!r} is {'a file' if path.exists() else 'not an existing folder'}; pass a model folder or a Hub id"
        )
    from huggingface_hub import snapshot_download

    try:  # one commit of `revision` for every file
        return Path(
            snapshot_download(
                name,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:
        raise InvalidInputError(
            f"cannot find model {name!r}: not a local folder, and the Hub download failed ({type(exc).__name__})"
        ) from None


def subtract_task_vector(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    lam: float,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``theta - lam * (theta_ft - theta)`` as a model folder, one tensor in memory at a time.

    ``base`` and ``finetuned`` are ``"default"``, local folders or Hub ids with safetensors
    weights of identical names and shapes. The output keeps the base's shard layout, config,
    generation config and tokenizer, plus ``ivtrainer_task_vector.json`` recording the operation.
    It is written to a temporary folder and renamed into place; nothing is left on failure.
    ``out_dir`` follows :func:`ivtrainer.utils.outputs.check_output_dir` (never an input; an existing
    non-empty folder only with ``overwrite``, and only if ivtrainer wrote it).
    """
    (lam,) = check_lambdas([lam], 1)
    out = check_output_dir(
        out_dir,
        inputs=[base, finetuned],
        overwrite=overwrite,
        flag="out_dir",
        overwrite_flag="overwrite=True",
    )
    plan = task_vector_plan(base, finetuned)
    with atomic_dir(out, marker={"command": "subtract_task_vector"}) as tmp:
        write_task_vector(plan, lam, tmp)
    return out


def task_vector_plan(base: str | os.PathLike, finetuned: str | os.PathLike, **download) -> dict:
    """Both models' folders, weight maps and shard headers, checked to match (names and shapes)."""
    base_dir, ft_dir = _model_folder(base, **download), _model_folder(finetuned, **download)
    base_map, ft_map = _weight_map(base_dir), _weight_map(ft_dir)
    if base_map.keys() != ft_map.keys():
        only_base, only_ft = sorted(base_map.keys() - ft_map.keys()), sorted(ft_map.keys() - base_map.keys())
        raise InvalidInputError(
            f"the models have different tensors: only in base {only_base[:3]}, only in finetuned {only_ft[:3]}; "
            "a task vector needs two checkpoints of the same architecture"
        )
    ft_headers = {shard: _header(ft_dir / shard) for shard in set(ft_map.values())}
    base_headers = {shard: _header(base_dir / shard) for shard in set(base_map.values())}
    for name, shard in base_map.items():
        b, f = base_headers[shard][0][name], ft_headers[ft_map[name]][0][name]
        if b["shape"] != f["shape"]:
            raise InvalidInputError(f"{name} has shape {b['shape']} in base but {f['shape']} in finetuned")
    return {"base": os.fspath(base), "finetuned": os.fspath(finetuned), "base_dir": base_dir, "ft_dir": ft_dir,
            "ft_map": ft_map, "ft_headers": ft_headers, "base_headers": base_headers}  # fmt: skip


def write_task_vector(plan: dict, lam: float, folder: Path, stats: dict[str, float] | None = None) -> None:
    """Stream ``theta - lam * (theta_ft - theta)`` into ``folder`` (shards, config, tokenizer,
    ``ivtrainer_task_vector.json``); ``plan`` from :func:`task_vector_plan`."""
    base_dir, ft_dir, ft_map, ft_headers = (
        plan["base_dir"],
        plan["ft_dir"],
        plan["ft_map"],
        plan["ft_headers"],
    )
    handles = {shard: open(ft_dir / shard, "rb") for shard in ft_headers}  # noqa: SIM115 - closed below
    try:
        for shard, (header, start) in tqdm(
            sorted(plan["base_headers"].items()), desc="task vector", unit="shard"
        ):
            with open(base_dir / shard, "rb") as fb:
                _write_shard(folder / shard, header, start, fb, ft_map, ft_headers, handles, lam, stats)
    finally:
        for handle in handles.values():
            handle.close()
    for item in base_dir.iterdir():
        if item.is_file() and item.name not in _SKIP_FILES and not item.name.endswith(".safetensors"):
            shutil.copy2(item, folder / item.name)
    record = {"operation": "theta - lam * (theta_finetuned - theta)", "lam": lam,
              "base": plan["base"], "finetuned": plan["finetuned"]}  # fmt: skip
    (folder / "ivtrainer_task_vector.json").write_text(json.dumps(record, indent=2) + "\n")
    _finish_stats(stats)


def _write_shard(
    path: Path, header: dict, start: int, fb, ft_map, ft_headers, handles, lam: float, stats=None
) -> None:
    """Stream one output shard: the header first (shapes and dtypes are known), then each tensor."""
    names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    out_header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        size = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
        out_header[name] = {
            "dtype": header[name]["dtype"],
            "shape": header[name]["shape"],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(out_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            theta = _read(fb, header[name], start)
            shard = ft_map[name]
            tuned = _read(handles[shard], ft_headers[shard][0][name], ft_headers[shard][1])
            if theta.is_floating_point():
                theta32 = theta.float()
                result = (theta32 - lam * (tuned.float() - theta32)).to(theta.dtype)
                _record(stats, theta32, result.float())
            else:  # integer buffers are not parameters: keep the base's
                result = theta
            f.write(result.contiguous().reshape(-1).view(torch.uint8).numpy().data)
