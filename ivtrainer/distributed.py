"""Multi-process and DeepSpeed checks for ivtrainer's trainers."""

from __future__ import annotations

__all__ = ["check_deepspeed_config"]


def check_deepspeed_config(accelerator) -> None:
    """Raise, when the trainer is built, if the DeepSpeed config has explicit values that contradict
    the training arguments (transformers finds them too, but only once training starts)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    mismatches = getattr(getattr(plugin, "hf_ds_config", None), "mismatches", None)
    if mismatches:
        raise ValueError(
            "the DeepSpeed config contradicts the training arguments:\n"
            + "\n".join(mismatches)
            + '\nset these DeepSpeed values to "auto" (the Trainer fills them from its arguments) or make the '
            "arguments match"
        )
