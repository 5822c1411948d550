"""ivtrainer: Hugging Face Trainer extensions that reduce what fine-tuning makes a model forget.

- Instruction vectors (Jiang et al., 2024; Todd et al., 2024) and IV-guided training.
- F-Learning, forgetting before learning (Ni et al., ACL 2024).
"""

from __future__ import annotations

from .architectures import ArchitectureSpec, ModelLayout, get_layout, register_architecture, unwrap_model
from .errors import IVTrainerError, MissingDependencyError, ModelLoadError, UnsupportedArchitectureError
from .hooks import record_head_outputs
from .models import load_default_model, load_model

__version__ = "0.1.0.dev0"

__all__ = [
    "ArchitectureSpec",
    "IVTrainerError",
    "MissingDependencyError",
    "ModelLayout",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "__version__",
    "get_layout",
    "load_default_model",
    "load_model",
    "record_head_outputs",
    "register_architecture",
    "unwrap_model",
]
