"""ivtrainer: Hugging Face Trainer extensions that reduce what fine-tuning makes a model forget.

- Instruction vectors (Jiang et al., 2024; Todd et al., 2024) and IV-guided training.
- F-Learning, forgetting before learning (Ni et al., ACL 2024).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ivtrainer.arithmetic.adapter_subtraction import subtract_adapter
from ivtrainer.arithmetic.model_delta import subtract_model_delta
from ivtrainer.arithmetic.task_vector import subtract_task_vector
from ivtrainer.datasets.edits import build_counterfacts, edit_dataset, load_edits, split_edits
from ivtrainer.datasets.tasks import list_tasks, load_task
from ivtrainer.errors import (
    IVTrainerError,
    MissingDependencyError,
    ModelLoadError,
    UnsupportedArchitectureError,
)
from ivtrainer.evaluation.edit_metrics import evaluate_edits
from ivtrainer.modeling.architectures import (
    ArchitectureSpec,
    ModelLayout,
    get_layout,
    register_architecture,
    unwrap_model,
)
from ivtrainer.modeling.hooks import record_head_outputs
from ivtrainer.modeling.loading import load_default_model, load_model
from ivtrainer.steering.extraction import extract_instruction_vector
from ivtrainer.steering.extraction_config import ExtractionConfig
from ivtrainer.steering.head_set import HeadSet, extract_head_set
from ivtrainer.steering.instruction_vector import IncompatibleVectorError, InstructionVector

if TYPE_CHECKING:
    from ivtrainer.f_learning.f_learning_config import FLearningConfig
    from ivtrainer.f_learning.f_learning_trainer import FLearningTrainer
    from ivtrainer.iv_guided.iv_guided_config import IVGuidedConfig
    from ivtrainer.iv_guided.iv_guided_sft_trainer import IVGuidedSFTConfig, IVGuidedSFTTrainer
    from ivtrainer.iv_guided.iv_guided_trainer import IVGuidedTrainer

from ivtrainer.version import __version__

# Trainer classes import transformers' training stack (seconds): loaded on first use, so that
# `import ivtrainer` and the CLI stay fast.
_LAZY = {
    "FLearningConfig": "ivtrainer.f_learning.f_learning_config",
    "FLearningTrainer": "ivtrainer.f_learning.f_learning_trainer",
    "IVGuidedConfig": "ivtrainer.iv_guided.iv_guided_config",
    "IVGuidedTrainer": "ivtrainer.iv_guided.iv_guided_trainer",
    "IVGuidedSFTConfig": "ivtrainer.iv_guided.iv_guided_sft_trainer",
    "IVGuidedSFTTrainer": "ivtrainer.iv_guided.iv_guided_sft_trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ivtrainer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ArchitectureSpec",
    "ExtractionConfig",
    "FLearningConfig",
    "FLearningTrainer",
    "HeadSet",
    "IVGuidedConfig",
    "IVGuidedSFTConfig",
    "IVGuidedSFTTrainer",
    "IVGuidedTrainer",
    "IVTrainerError",
    "IncompatibleVectorError",
    "InstructionVector",
    "MissingDependencyError",
    "ModelLayout",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "__version__",
    "build_counterfacts",
    "edit_dataset",
    "evaluate_edits",
    "extract_head_set",
    "extract_instruction_vector",
    "get_layout",
    "list_tasks",
    "load_default_model",
    "load_edits",
    "load_model",
    "load_task",
    "record_head_outputs",
    "register_architecture",
    "split_edits",
    "subtract_adapter",
    "subtract_model_delta",
    "subtract_task_vector",
    "unwrap_model",
]
