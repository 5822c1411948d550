"""Context managers that change a model for a while and always undo it: forward hooks (installed
on entry, removed on exit) and eval mode; and the PEFT check.

Hooks must be pure functions of their inputs: under gradient checkpointing a checkpointed layer
runs twice (forward and recompute) and its hooks fire both times.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ivtrainer.modeling.architectures import ModelLayout, get_layout, unwrap_model

__all__ = ["StopForward", "eval_mode", "hooks", "is_peft_model", "record_head_outputs", "stop_before"]


@contextlib.contextmanager
def hooks(*handles_or_registrations: torch.utils.hooks.RemovableHandle) -> Iterator[None]:
    """Remove the given hook handles on exit, whatever happens in the body."""
    try:
        yield
    finally:
        for handle in handles_or_registrations:
            handle.remove()


class StopForward(Exception):
    """Raised by :func:`stop_before`'s hook to end a forward pass early."""


@contextlib.contextmanager
def stop_before(module: nn.Module) -> Iterator[None]:
    """End the body's forward pass when it reaches ``module``, after the forward pre-hooks
    registered on it before this one (a recording hook) have run: the layers after it and the
    LM head are skipped, and the forward call returns nothing (the body ends there)::

        with record_head_outputs(model, [3]) as heads, stop_before(layout.attn_outputs[3]):
            model(**batch)

    A body whose forward never reaches ``module`` raises ``RuntimeError``: what it meant to
    record was not recorded.
    """

    def hook(*_: Any) -> None:
        raise StopForward

    with hooks(module.register_forward_pre_hook(hook)):
        try:
            yield
        except StopForward:
            return
    raise RuntimeError(f"the forward pass never reached {type(module).__name__}: nothing was recorded there")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the duration; the previous mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (the one check ivtrainer uses)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def record_head_outputs(
    model: nn.Module, layers: Iterable[int] | None = None, *, layout: ModelLayout | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Record each layer's per-head attention outputs, shaped ``(batch, seq, n_heads, head_dim)``.

    They are read with a forward *pre*-hook on the attention output projection, whose input is
    the concatenation of the heads. The yielded dict maps layer index -> tensor of the latest
    forward (recompute under gradient checkpointing overwrites with identical values)::

        with record_head_outputs(model, layers=[3, 4]) as heads:
            model(**batch)
        heads[3].shape  # (batch, seq, n_heads, head_dim)
    """
    layout = layout or get_layout(model)
    indices = range(layout.n_layers) if layers is None else list(layers)
    out: dict[int, torch.Tensor] = {}

    def make_hook(i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            out[i] = layout.split_heads(args[0])

        return hook

    handles = [layout.attn_outputs[i].register_forward_pre_hook(make_hook(i)) for i in indices]
    with hooks(*handles):
        yield out


@contextlib.contextmanager
def record_input(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record ``module``'s first positional input of its latest forward, as ``out["input"]``."""
    out: dict[str, torch.Tensor] = {}

    def hook(_: nn.Module, args: tuple) -> None:
        out["input"] = args[0]

    with hooks(module.register_forward_pre_hook(hook)):
        yield out


def cache_argument(model: nn.Module) -> str:
    """The name of the KV-cache argument of ``model.forward``: ``cache`` in recent transformers,
    ``past_key_values`` before (passing the old name to a new model prints a deprecation warning)."""
    return (
        "cache" if "cache" in inspect.signature(unwrap_model(model).forward).parameters else "past_key_values"
    )


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
