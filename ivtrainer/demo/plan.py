"""What the demo runs (:class:`DemoPlan`) and how long that takes on this machine: the forward
calls and tokens of each stage, counted from the plan, times two probed forwards."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ivtrainer.modeling.hooks import eval_mode

# A LoRA step is about 2 forwards of its batch on CPU, a full fine-tuning step (with AdamW over
# every weight) about 4, and IV-guided LoRA adds the teacher's forward and the KL: ~1.5x a LoRA
# step (benchmarks/iv_guided_cost.py). Used only for the estimate printed up front.
_FORWARDS_PER_STEP = {"lora": 2.2, "full": 4.0, "lora_guided": 3.4}


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """How much work each stage does. ``DemoPlan()`` is the full demo (about 7 minutes for
    SmolLM2-135M on 2 CPU cores), ``DemoPlan.quick()`` the short one (2-3 minutes)."""

    iv_task: str = "antonym"
    n_mean_prompts: int = 40  # IV: clean 10-shot prompts averaged for the heads' mean outputs
    n_cie_prompts: int = 8  # IV: corrupted prompts on which every head's causal effect is measured
    # IV: zero-shot prompts that choose the layer, strength and heads (the new task's own IV: half)
    n_calibration_prompts: int = 64
    n_train_words: int = 256  # new task: training words (batch 8)
    epochs: float = 2.0
    learning_rate: float = 5e-4  # LoRA r8
    n_icl: int = 20  # held-out abilities: 5-shot prompts per built-in task
    # held-out abilities: one draw of demonstrations shared by a task's queries (its prefix computed
    # once: ~5x cheaper, a higher-variance estimate) instead of a draw per query
    icl_fixed_demos: bool = False
    n_facts: int = 30  # held-out abilities: known facts asked as completions and as instructions
    n_test_words: int = 50  # new task: test words
    n_edits: int = 32  # knowledge update: counterfactual edits
    edit_epochs: float = 3.0  # both phases, as benchmarks/knowledge_update.py (and the paper's old phase)
    edit_batch_size: int = 8
    forget_lambda: float = 1.0  # benchmarks/knowledge_update.py's validation choice for LoRA->FT
    seed: int = 0
    lm_eval_tasks: tuple[str, ...] = ()  # lm-eval tasks scored with the held-out abilities (stage 2)
    lm_eval_limit: int | None = 50  # documents per lm-eval task
    recipe: str = "fvforgetting"  # the IV-guided row's named recipe (IVGuidedConfig.recipe)

    def __post_init__(self) -> None:
        from ivtrainer.errors import InvalidInputError
        from ivtrainer.iv_guided.recipes import RECIPES

        if self.recipe not in RECIPES:
            raise InvalidInputError(f"unknown recipe {self.recipe!r}: choose one of {sorted(RECIPES)}")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoPlan:
        return cls(
            **{
                "n_mean_prompts": 16,
                "n_cie_prompts": 4,
                "n_calibration_prompts": 24,
                "n_train_words": 96,
                "epochs": 1.0,
                "learning_rate": 1e-3,
                "n_icl": 8,
                "icl_fixed_demos": True,
                "n_facts": 16,
                "n_test_words": 30,
                "n_edits": 16,
                **overrides,
            }
        )

    @property
    def train_steps(self) -> int:
        return math.ceil(self.n_train_words / 8) * math.ceil(self.epochs)

    @property
    def edit_steps(self) -> int:
        return math.ceil(self.n_edits / self.edit_batch_size) * math.ceil(self.edit_epochs)


def check_output_folder(
    out: str | os.PathLike, overwrite: bool, model: str | os.PathLike = "default"
) -> Path:
    """The folder the demo will write (:func:`ivtrainer.utils.outputs.check_output_dir`'s rules)."""
    from ivtrainer.utils.outputs import check_output_dir

    return check_output_dir(out, inputs=[model], overwrite=overwrite)


@torch.no_grad()
def probe(model: nn.Module) -> tuple[float, float]:
    """(seconds per forward call, seconds per token) on this machine: two timed forwards."""
    device = next(model.parameters()).device
    times = {}
    with eval_mode(model):
        for n_tokens in (8, 512):
            ids = torch.randint(0, 100, (n_tokens // 64 or 1, min(n_tokens, 64)), device=device)
            model(input_ids=ids)  # warm-up
            _synchronize(device)
            start = time.perf_counter()
            model(input_ids=ids)
            _synchronize(device)
            times[n_tokens] = time.perf_counter() - start
    per_token = max(times[512] - times[8], 1e-9) / (512 - 8)
    return max(times[8] - 8 * per_token, 1e-6), per_token


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":  # accelerators run asynchronously: wait before reading the clock
        torch.accelerator.synchronize(device)


def estimate_seconds(
    plan: DemoPlan, per_call: float, per_token: float, n_layers: int, n_heads: int
) -> dict[str, float]:
    """Seconds per stage: the forward calls and tokens each stage runs, counted from the plan,
    times the probed costs (:func:`probe`). ``benchmarks/demo_time.py`` prints it next to the
    measured times."""

    def cost(calls: float, tokens: float) -> float:
        return calls * per_call + tokens * per_token

    shot = 9  # tokens of one "Q: x\nA: y\n\n" demonstration
    f = _FORWARDS_PER_STEP
    # 5-shot ICL (fixed demonstrations: each task's prefix once, then its queries); facts as
    # completions; chat prefill + 16 decoding steps; new task
    icl_calls, icl_tokens = 6 * math.ceil(plan.n_icl / 16), 6 * plan.n_icl * 6 * shot
    if plan.icl_fixed_demos:
        icl_calls, icl_tokens = 6 * (1 + math.ceil(plan.n_icl / 16)), 6 * (5 * shot + plan.n_icl * shot)
    evaluation = cost(
        icl_calls + math.ceil(plan.n_facts / 16) * 18 + 2,
        icl_tokens + plan.n_facts * (12 + 40) + plan.n_test_words * 10,
    )
    lora_steps = plan.train_steps * (f["lora"] + 2 * f["lora_guided"])  # plain, KL anchor, IV-guided
    edit_steps = plan.edit_steps * (f["lora"] + 2 * f["full"])
    run_overhead = 1.5  # copying the model, building a Trainer, saving

    def extraction(n_calibration: int) -> float:
        # mean activations; CIE: the prefix, then a tree step of L*H copies (~1.5 L*H tokens' cost);
        # calibration: zero-shot prefixes, then ~50 settings as one-token tree rows each
        return cost(
            math.ceil(plan.n_mean_prompts / 16) + 2 * plan.n_cie_prompts + 16 + 4 * n_calibration,
            plan.n_mean_prompts * 11 * shot
            + plan.n_cie_prompts * (11 * shot + 1.5 * n_layers * n_heads)
            + n_calibration * (8 + 2.5 * 50),
        )

    return {
        "instruction vector": extraction(plan.n_calibration_prompts) + cost(4, 400) + 1.0,  # + the check
        "new task, plain vs KL anchor vs IV-guided": 4 * evaluation
        + cost(4, 48 * 12)  # the stage-1 IV added back: its held-out prompts, without and with
        + extraction(plan.n_calibration_prompts // 2)  # the new task's own IV
        + cost(lora_steps, lora_steps * 8 * 12)
        + 3 * run_overhead,
        "knowledge update": cost(
            edit_steps + 8, edit_steps * plan.edit_batch_size * 14 + 6 * plan.n_edits * 14
        )
        + 3 * run_overhead,
    }
