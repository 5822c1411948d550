"""Where the attention heads live: one small registry instead of per-model special cases.

Instruction vectors are read from, and written to, the *input* of each layer's attention
output projection (`o_proj`, `c_proj`, `dense`, ...): there the per-head outputs are still
concatenated, so reshaping to ``(batch, seq, n_heads, head_dim)`` exposes every head.
:func:`get_layout` finds that projection and the decoder layer around it for a causal LM,
also when the model is wrapped by PEFT, DDP, DeepSpeed or ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ivtrainer.errors import InvalidInputError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "ArchitectureSpec",
    "ModelLayout",
    "get_layout",
    "register_architecture",
    "takes_logits_to_keep",
    "unwrap_model",
]


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one architecture, relative to the bare ``*ForCausalLM`` model.

    Args:
        layers: dotted path of the ``nn.ModuleList`` of decoder layers, e.g. ``"model.layers"``.
        attn_output: dotted path, inside one decoder layer, of the attention output projection:
            the module whose input is the concatenation of the per-head outputs.
    """

    layers: str
    attn_output: str


_LLAMA_LIKE = ArchitectureSpec(layers="model.layers", attn_output="self_attn.o_proj")

#: ``config.model_type`` -> module paths. Extend it with :func:`register_architecture`.
ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen2_moe": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "qwen3_moe": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": ArchitectureSpec(layers="model.language_model.layers", attn_output="self_attn.o_proj"),
    "phi3": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "gpt2": ArchitectureSpec(layers="transformer.h", attn_output="attn.c_proj"),
    "gpt_neox": ArchitectureSpec(layers="gpt_neox.layers", attn_output="attention.dense"),
}


def register_architecture(model_type: str, *, layers: str, attn_output: str, overwrite: bool = False) -> None:
    """Teach ivtrainer where the heads of a new architecture are.

    Example, for a model whose blocks live in ``backbone.blocks`` with ``attn.out_proj``::

        ivtrainer.register_architecture("my_arch", layers="backbone.blocks", attn_output="attn.out_proj")
    """
    if (
        model_type in ARCHITECTURES
        and not overwrite
        and ARCHITECTURES[model_type] != ArchitectureSpec(layers, attn_output)
    ):
        raise InvalidInputError(
            f"architecture {model_type!r} is already registered as {ARCHITECTURES[model_type]}; "
            "pass overwrite=True to replace it"
        )
    ARCHITECTURES[model_type] = ArchitectureSpec(layers=layers, attn_output=attn_output)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelLayout:
    """The pieces of a causal LM that ivtrainer hooks, one entry per decoder layer.

    ``attn_outputs[i]`` is the module whose input is the ``n_heads * head_dim`` concatenation of
    layer ``i``'s head outputs (a PEFT ``lora.Linear`` wrapper when LoRA targets it: its input is
    the same tensor). ``*_names`` are qualified names inside the model that was passed in.
    """

    model_type: str
    n_layers: int
    n_heads: int
    head_dim: int
    hidden_size: int
    layers: tuple[nn.Module, ...]
    attn_outputs: tuple[nn.Module, ...]
    layer_names: tuple[str, ...]
    attn_output_names: tuple[str, ...]

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., n_heads * head_dim)`` -> ``(..., n_heads, head_dim)`` (a view)."""
        return x.unflatten(-1, (self.n_heads, self.head_dim))

    def describe(self) -> str:
        """Human-readable summary, as printed by ``ivtrainer info``."""
        first, last = self.attn_output_names[0], self.attn_output_names[-1]
        return "\n".join(
            [
                f"architecture   {self.model_type}",
                f"layers x heads {self.n_layers} x {self.n_heads} (head_dim {self.head_dim}, hidden {self.hidden_size})",
                f"decoder layers {_range_name(self.layer_names)}",
                f"hooked modules {_range_name(self.attn_output_names)} ({type(self.attn_outputs[0]).__name__})",
                f"               first {first}, last {last}",
            ]
        )


def _range_name(names: tuple[str, ...]) -> str:
    """``a.0.b, a.1.b, ...`` -> ``a.{0..N}.b`` when the names differ only by the layer index."""
    if len(names) > 1:
        parts = names[0].split(".")
        for i, part in enumerate(parts):
            if part == "0":
                pattern = ".".join([*parts[:i], "{}", *parts[i + 1 :]])
                if all(n == pattern.format(k) for k, n in enumerate(names)):
                    return pattern.format(f"{{0..{len(names) - 1}}}")
    return ", ".join(names)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare transformers model inside PEFT / DDP / DeepSpeed / ``torch.compile`` wrappers."""
    # Not accelerate's extract_model_from_parallel: it imports deepspeed whenever it is installed
    # (seconds, plus a log line), while an engine can only exist if deepspeed is already imported.
    current: Any = model
    for _ in range(16):  # wrappers nest: a DeepSpeed engine around a PeftModel around the model
        if isinstance(getattr(current, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            current = current._orig_mod
        elif isinstance(current, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            "deepspeed" in sys.modules and isinstance(current, sys.modules["deepspeed"].DeepSpeedEngine)
        ):
            current = current.module
        elif hasattr(current, "get_base_model") and hasattr(current, "peft_config"):  # peft.PeftModel
            current = current.get_base_model()
        else:
            return current
    return current


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no `.config`: ivtrainer needs a transformers causal LM "
            "(e.g. AutoModelForCausalLM.from_pretrained(...))"
        )
    return config, config.get_text_config() if hasattr(config, "get_text_config") else config


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _in_features(module: nn.Module) -> int | None:
    """Input width of a Linear / GPT-2 Conv1D / PEFT-wrapped projection."""
    base: Any = getattr(module, "base_layer", module)  # PEFT LoRA wrapper
    if isinstance(base, nn.Linear):
        return base.in_features
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):  # GPT-2: weight is (in, out)
        return int(base.weight.shape[0])
    return None


def _module_lists(model: nn.Module) -> Iterator[tuple[str, nn.ModuleList]]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            yield name, module


def _find_spec(model: nn.Module, model_type: str, n_layers: int | None) -> tuple[ArchitectureSpec, bool]:
    """The registered spec, else a known spec whose paths exist in this model (checked later)."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type], True
    for spec in dict.fromkeys(ARCHITECTURES.values()):
        layers = _get(model, spec.layers)
        if (
            isinstance(layers, nn.ModuleList)
            and (n_layers is None or len(layers) == n_layers)
            and _get(layers[0], spec.attn_output) is not None
        ):
            return spec, False
    raise UnsupportedArchitectureError(_unsupported_message(model, model_type))


def _unsupported_message(model: nn.Module, model_type: str) -> str:
    found = []
    for name, layers in _module_lists(model):
        linears = [n for n, m in layers[0].named_modules() if _in_features(m) is not None]
        found.append(
            f"{name} ({len(layers)} x {type(layers[0]).__name__}; projections in each: {linears[:12]})"
        )
    what = "; ".join(found[:4]) if found else "no nn.ModuleList of decoder layers"
    return (
        f"unsupported architecture {model_type!r} ({type(model).__name__}): found {what}. "
        "If it has multi-head attention, register it: ivtrainer.register_architecture("
        f"{model_type!r}, layers='<path to the layer list>', attn_output='<attention output projection "
        "inside a layer>')"
    )


def get_layout(model: nn.Module) -> ModelLayout:
    """Find the decoder layers and attention output projections of a causal LM.

    Raises:
        UnsupportedArchitectureError: the model type is not registered and no known layout fits;
            the message lists what was found and how to register it.
    """
    bare = unwrap_model(model)
    config, text_config = _text_config(bare)
    model_type = getattr(config, "model_type", "") or type(bare).__name__
    n_layers_cfg = getattr(text_config, "num_hidden_layers", None)
    spec, registered = _find_spec(bare, model_type, n_layers_cfg)

    layers = _get(bare, spec.layers)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{model_type!r} is registered with layers={spec.layers!r}, but {type(bare).__name__} has no "
            f"ModuleList there. {_unsupported_message(bare, model_type)}"
        )
    found = [_get(layer, spec.attn_output) for layer in layers]
    attn_outputs = [m for m in found if m is not None]
    if len(attn_outputs) != len(found):
        raise UnsupportedArchitectureError(
            f"{model_type!r}: some decoder layers have no {spec.attn_output!r}. "
            f"{_unsupported_message(bare, model_type)}"
        )

    n_heads = getattr(text_config, "num_attention_heads", None)
    hidden_size = getattr(text_config, "hidden_size", None)
    if not n_heads or not hidden_size:
        raise UnsupportedArchitectureError(
            f"{model_type!r}: the config has no num_attention_heads / hidden_size, so the heads cannot be "
            "located. " + _unsupported_message(bare, model_type)
        )
    head_dim = getattr(text_config, "head_dim", None) or hidden_size // n_heads
    width = _in_features(attn_outputs[0])
    if width is not None and width != n_heads * head_dim:
        raise UnsupportedArchitectureError(
            f"{model_type!r}: {spec.layers}.0.{spec.attn_output} takes {width} features, expected "
            f"n_heads x head_dim = {n_heads} x {head_dim}; it is not the attention output projection. "
            + _unsupported_message(bare, model_type)
        )
    if not registered:
        logger.info("%r is not registered; using the known layout %s", model_type, spec)

    prefix = _prefix_in(model, bare)
    layer_names = tuple(f"{prefix}{spec.layers}.{i}" for i in range(len(layers)))
    return ModelLayout(
        model_type=model_type,
        n_layers=len(layers),
        n_heads=n_heads,
        head_dim=head_dim,
        hidden_size=hidden_size,
        layers=tuple(layers),
        attn_outputs=tuple(attn_outputs),
        layer_names=layer_names,
        attn_output_names=tuple(f"{n}.{spec.attn_output}" for n in layer_names),
    )


def _prefix_in(outer: nn.Module, inner: nn.Module) -> str:
    """Qualified name of ``inner`` inside ``outer`` plus a dot ('' when they are the same)."""
    if outer is inner:
        return ""
    for name, module in outer.named_modules():
        if module is inner:
            return f"{name}."
    return ""


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` can run the LM head at chosen positions only (``logits_to_keep``,
    an int or a tensor of positions): most transformers causal LMs, not GPT-2."""
    return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
