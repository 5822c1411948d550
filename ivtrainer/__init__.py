"""ivtrainer: Hugging Face Trainer extensions that reduce what fine-tuning makes a model forget.

- Instruction vectors (Jiang et al., 2024; Todd et al., 2024) and IV-guided training.
- F-Learning, forgetting before learning (Ni et al., ACL 2024).
"""

from __future__ import annotations

from .architectures import ArchitectureSpec, ModelLayout, get_layout, register_architecture, unwrap_model
from .errors import IVTrainerError, MissingDependencyError, ModelLoadError, UnsupportedArchitectureError
from .hooks import record_head_outputs
from .instruction_vector import IncompatibleVectorError, InstructionVector, extract_instruction_vector
from .models import load_default_model, load_model
from .tasks import list_tasks, load_task

__version__ = "0.1.0.dev0"

__all__ = [
    "ArchitectureSpec",
    "IVTrainerError",
    "IncompatibleVectorError",
    "InstructionVector",
    "MissingDependencyError",
    "ModelLayout",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "__version__",
    "extract_instruction_vector",
    "get_layout",
    "list_tasks",
    "load_default_model",
    "load_model",
    "load_task",
    "record_head_outputs",
    "register_architecture",
    "unwrap_model",
]
