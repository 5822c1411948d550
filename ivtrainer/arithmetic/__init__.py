"""Parameter arithmetic for forgetting, ``W <- W - lam * delta_W`` (Ni et al., 2024): LoRA adapters
(:mod:`.adapter_subtraction`), a full fine-tuning delta in memory (:mod:`.model_delta`) or streamed
between model folders (:mod:`.task_vector`), and ``ivtrainer forget`` as a function (:mod:`.forget`)."""

from ivtrainer.arithmetic.adapter_subtraction import (
    AdapterMismatchError,
    check_adapter_configs,
    save_adapter,
    subtract_adapter,
    unload_adapters,
)
from ivtrainer.arithmetic.forget import ForgetResult, forget
from ivtrainer.arithmetic.model_delta import subtract_model_delta
from ivtrainer.arithmetic.task_vector import subtract_task_vector

__all__ = [
    "AdapterMismatchError",
    "ForgetResult",
    "check_adapter_configs",
    "forget",
    "save_adapter",
    "subtract_adapter",
    "subtract_model_delta",
    "subtract_task_vector",
    "unload_adapters",
]
