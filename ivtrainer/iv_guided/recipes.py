"""The named IV-guided recipes: plain :class:`~ivtrainer.IVGuidedConfig` values, kept apart from the
config so that the command line can list them without importing the training stack."""

from __future__ import annotations

from typing import Any

__all__ = ["RECIPES"]

#: Named recipes: plain IVGuidedConfig values (see IVGuidedConfig.recipe).
RECIPES: dict[str, dict[str, Any]] = {
    # FvForgetting's released code (src/tuning/trainer/base.py, scripts/train/seq*_fvg.sh): the
    # teacher is the model before this task with the task's IV at the last prompt token; loss =
    # CE + 20 KL(last prompt) + 0.1 KL(all tokens), T = 2, each KL counted above 0.1, + 1.0 MSE of
    # the IV heads against the teacher without the IV, each head counted above 0.01; no IV on the
    # student.
    "fvforgetting": {
        "iv_strength_start": 0.0,
        "teacher_iv_strength": 1.0,
        "kl_positions": ["last_prompt", "all"],
        "kl_weight": [20.0, 0.1],
        "kl_threshold": [0.1, 0.1],
        "kl_direction": "reverse",
        "kl_temperature": 2.0,
        "head_mse_weight": 1.0,
        "head_mse_threshold": 0.01,
        "head_mse_reference": "without_iv",
    },
    # Jiang et al. 2024 (arXiv 2406.12227) add the progressive IV: the IV on the student too,
    # annealed linearly from full strength to 0 over the first half of training.
    "iv-paper": {
        "iv_strength_start": 1.0,
        "iv_strength_end": 0.0,
        "iv_schedule": "linear",
        "iv_schedule_fraction": 0.5,
    },
    # The control: the same KL terms towards the model before training, with no IV anywhere
    # (anchored fine-tuning); no instruction vector needed.
    "kl-anchor": {"teacher_iv_strength": 0.0, "head_mse_weight": 0.0},
}
# ivtrainer's defaults before the FvForgetting recipe (what the demo's and the forgetting
# benchmark's documented figures used): the progressive IV on the student and one KL of weight 1
# at every token towards the IV teacher, no thresholds, no head term.
RECIPES["kl-all"] = {
    **RECIPES["iv-paper"],
    "kl_positions": ["all"],
    "kl_weight": [1.0],
    "kl_threshold": [0.0],
    "head_mse_weight": 0.0,
    "head_mse_threshold": 0.0,
}
RECIPES["iv-paper"] = {**RECIPES["fvforgetting"], **RECIPES["iv-paper"]}
RECIPES["kl-anchor"] = {**RECIPES["fvforgetting"], **RECIPES["kl-anchor"]}
