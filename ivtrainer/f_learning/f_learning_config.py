"""Configuration of F-Learning (forgetting before learning; Ni et al., ACL 2024)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from transformers import TrainingArguments

from ivtrainer.errors import InvalidInputError
from ivtrainer.utils.checks import finite_number
from ivtrainer.utils.monitor_args import ForgettingMonitorArguments

__all__ = ["FLearningConfig", "variant_name"]

#: The old phase's folder under ``output_dir``: its leading underscore keeps it out of every upload
#: of ``Trainer.push_to_hub`` (which skips ``_*`` and ``checkpoint-*``).
OLD_PHASE_DIR = "_forget"

_METHODS = ("full", "lora")

#: The old phase's learning rate when none is given: the paper's for full fine-tuning, a LoRA one
#: for LoRA (the knowledge-update benchmark's).
DEFAULT_OLD_LEARNING_RATE = {"full": 5e-5, "lora": 1e-3}


@dataclasses.dataclass
class FLearningConfig(ForgettingMonitorArguments, TrainingArguments):
    """``TrainingArguments`` for :class:`~ivtrainer.FLearningTrainer`.

    The inherited arguments (epochs, learning rate, batch size, ...) drive the *learning* phase on
    the new knowledge; the ``old_*`` ones drive the fine-tuning on the old knowledge whose delta is
    subtracted first. Variants (the paper's names): FT = full/full, LoRA = lora/lora,
    LoRA->FT = lora/full. The fields below come after ``TrainingArguments``' own.

    Parameters:
        forget_method (`str`, defaults to `"full"`):
            How the old-knowledge delta is trained when `old_dataset` is given: `full` fine-tuning
            or a `lora` adapter.
        learn_method (`str`, defaults to `"full"`):
            How the new knowledge is learned: `full` fine-tuning or `lora`.
        forget_lambda (`float`, defaults to `1.0`):
            lambda in theta' = theta - lambda * (theta_old - theta); 0 is plain fine-tuning. The
            paper uses 0.1-3 depending on the variant: choose it on a validation split.
        old_num_train_epochs (`float`, defaults to `3.0`):
            Epochs of the old-knowledge fine-tuning (the paper's: 3).
        old_learning_rate (`float` or `None`, defaults to `None`):
            Learning rate of the old-knowledge fine-tuning; default 5e-5 with `forget_method="full"`
            (the paper's) and 1e-3 with `lora` (at 5e-5 a LoRA adapter barely moves).
        lora_r (`int`, defaults to `8`):
            LoRA rank (both phases).
        lora_alpha (`int`, defaults to `16`):
            LoRA alpha (both phases).
        lora_dropout (`float`, defaults to `0.0`):
            LoRA dropout (both phases).
        lora_target_modules (`list[str]` or `None`, defaults to `None`):
            The modules LoRA adapts; default: PEFT's choice for the architecture (e.g. q_proj, v_proj).
        forgetting_monitor_every (`int`, defaults to `50`):
            Log the KL between the model before training and now on a fixed sample of the training
            rows every N optimizer steps and at the end (~2% of training time at 50); 0: off.
        forgetting_monitor_rows (`int`, defaults to `16`):
            Training rows in the forgetting monitor's fixed sample.
    """

    forget_method: Literal["full", "lora"] = dataclasses.field(
        default="full",
        metadata={
            "help": "How the old-knowledge delta is trained when old_dataset is given: 'full' fine-tuning "
            "or a 'lora' adapter.",
            "choices": list(_METHODS),
        },
    )
    learn_method: Literal["full", "lora"] = dataclasses.field(
        default="full",
        metadata={
            "help": "How the new knowledge is learned: 'full' fine-tuning or 'lora'.",
            "choices": list(_METHODS),
        },
    )
    forget_lambda: float = dataclasses.field(
        default=1.0,
        metadata={
            "help": "lambda in theta' = theta - lambda * (theta_old - theta); 0 is plain fine-tuning. The paper "
            "uses 0.1-3 depending on the variant: choose it on a validation split."
        },
    )
    old_num_train_epochs: float = dataclasses.field(
        default=3.0, metadata={"help": "Epochs of the old-knowledge fine-tuning (paper: 3)."}
    )
    old_learning_rate: float | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Learning rate of the old-knowledge fine-tuning; default 5e-5 for forget_method='full' "
            "(the paper's) and 1e-3 for 'lora' (at 5e-5 a LoRA adapter barely moves, and subtracting it "
            "changes nothing)."
        },
    )
    lora_r: int = dataclasses.field(default=8, metadata={"help": "LoRA rank (both phases)."})
    lora_alpha: int = dataclasses.field(default=16, metadata={"help": "LoRA alpha (both phases)."})
    lora_dropout: float = dataclasses.field(default=0.0, metadata={"help": "LoRA dropout (both phases)."})
    lora_target_modules: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Modules LoRA adapts; default: PEFT's choice for the architecture (e.g. q_proj, v_proj)."
        },
    )

    def __post_init__(self) -> None:
        for name in ("forget_method", "learn_method"):
            if getattr(self, name) not in _METHODS:
                raise InvalidInputError(f"{name} must be 'full' or 'lora', not {getattr(self, name)!r}")
        finite_number("forget_lambda", self.forget_lambda, minimum=0, hint=" (0 = plain fine-tuning)")
        if self.old_learning_rate is None:
            self.old_learning_rate = DEFAULT_OLD_LEARNING_RATE[self.forget_method]
        for name in ("old_num_train_epochs", "old_learning_rate"):
            if finite_number(name, getattr(self, name)) <= 0:
                raise InvalidInputError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.lora_r < 1:
            raise InvalidInputError(f"lora_r must be >= 1, got {self.lora_r}")
        super().__post_init__()

    @property
    def variant(self) -> str:
        """The paper's name for this combination: FT, LoRA, LoRA->FT or FT->LoRA."""
        return variant_name(self.forget_method, self.learn_method)

    def lora_config(self):
        """The ``peft.LoraConfig`` both phases use."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            task_type="CAUSAL_LM",
        )

    def old_phase_arguments(self) -> TrainingArguments:
        """Plain ``TrainingArguments`` of the old-knowledge phase: these ones, with the ``old_*``
        values, no evaluation, no pushing and no Hub token, writing under ``<output_dir>/_forget``."""
        fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
        values = {name: getattr(self, name) for name in fields}
        values.update(
            output_dir=f"{self.output_dir}/{OLD_PHASE_DIR}",
            hub_token=None,  # the old phase never pushes; its pickled arguments must not carry the token
            num_train_epochs=self.old_num_train_epochs,
            learning_rate=self.old_learning_rate,
            max_steps=-1,
            eval_strategy="no",  # the evaluation data belongs to the learning phase
            load_best_model_at_end=False,
            run_name=f"{self.run_name}-forget" if self.run_name else None,
            push_to_hub=False,
        )
        from accelerate import PartialState

        if PartialState._shared_state:  # reuse the running processes: new arguments would reset them
            config = (
                dataclasses.asdict(self.accelerator_config)  # type: ignore[call-overload]  # an AcceleratorConfig by now
                if self.accelerator_config is not None
                else {}
            )
            values["accelerator_config"] = {**config, "use_configured_state": True}
        return TrainingArguments(**values)


def variant_name(forget: str, learn: str) -> str:
    """The paper's name for a (forget_method, learn_method) pair: FT, LoRA, LoRA->FT or FT->LoRA."""
    names = {"full": "FT", "lora": "LoRA"}
    return names[learn] if forget == learn else f"{names[forget]}->{names[learn]}"
