"""Multi-process and DeepSpeed helpers for ivtrainer's trainers: checks, ZeRO-3-aware copies and
parameter access."""

from __future__ import annotations

import contextlib

from torch import nn

from ivtrainer.errors import InvalidInputError

__all__ = [
    "NoEmptyParamGroupsMixin",
    "check_deepspeed_config",
    "deepspeed_enabled",
    "gathered",
    "is_zero3_partitioned",
    "zero3_copy",
]


class NoEmptyParamGroupsMixin:
    """A Trainer whose optimizer has no empty parameter groups.

    With LoRA the Trainer's no-weight-decay group is empty; DeepSpeed drops empty groups, and
    transformers 5.0 builds the LR scheduler before it does, so torch's scheduler (>= 2.10 zips
    strictly) fails at the first step. transformers >= 5.1 builds the scheduler afterwards; dropping
    the empty group here is the same on every version.
    """

    def create_optimizer(self, *args, **kwargs):
        created = self.optimizer is None  # an optimizer passed in by the user is left as it is
        optimizer = super().create_optimizer(*args, **kwargs)
        if created:
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        return optimizer


def check_deepspeed_config(accelerator) -> None:
    """Raise, when the trainer is built, if the DeepSpeed config has explicit values that contradict
    the training arguments (transformers finds them too, but only once training starts)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    mismatches = getattr(getattr(plugin, "hf_ds_config", None), "mismatches", None)
    if mismatches:
        raise InvalidInputError(
            "the DeepSpeed config contradicts the training arguments:\n"
            + "\n".join(mismatches)
            + '\nset these DeepSpeed values to "auto" (the Trainer fills them from its arguments) or make the '
            "arguments match"
        )


def deepspeed_enabled() -> bool:
    """Whether accelerate's state (the Trainer's) runs DeepSpeed."""
    from accelerate.state import AcceleratorState

    return AcceleratorState._shared_state != {} and AcceleratorState().deepspeed_plugin is not None


def is_zero3_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered(*params: nn.Parameter):
    """Inside, ZeRO-3-partitioned ``params`` are whole on every process; what process 0 writes to
    them is kept. A no-op for ordinary parameters."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def zero3_copy(model: nn.Module, what: str = "copied") -> nn.Module:
    """A copy of a model whose parameters DeepSpeed ZeRO-3 has partitioned, itself partitioned:
    built from the config (transformers does that under ``zero.Init``), then filled one gathered
    parameter at a time, so no process ever holds a whole model. ``what`` names the purpose in
    the error raised for a model that is not a transformers model."""
    if not hasattr(type(model), "_from_config"):
        raise InvalidInputError(
            f"under DeepSpeed ZeRO-3 the {type(model).__name__}'s parameters are partitioned and ivtrainer can only "
            f"copy a transformers model ({what}): pass a transformers model, loaded after the training arguments so "
            "that DeepSpeed shards it"
        )
    from transformers.initialization import no_init_weights

    dtype = next(model.parameters()).dtype
    # No initialisation: everything is copied below (and transformers 5.0 fails initialising
    # partitioned embeddings).
    with no_init_weights():
        copy = type(model)._from_config(model.config, dtype=dtype)  # type: ignore[attr-defined]
    sources = dict(model.named_parameters())
    for name, param in copy.named_parameters():
        with gathered(sources[name], param):
            param.data.copy_(sources[name].data)
        param.requires_grad_(sources[name].requires_grad)
    buffers = dict(model.named_buffers())  # not partitioned (rotary frequencies and the like)
    for name, buffer in copy.named_buffers():
        buffer.data.copy_(buffers[name].data)
    return copy.train(model.training)
