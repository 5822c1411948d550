"""Configuration of IV-guided training (Jiang et al. 2024)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from transformers import TrainingArguments

from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.kl_loss import KL_DIRECTIONS, KL_POSITIONS
from ivtrainer.iv_guided.schedules import SCHEDULES, Schedule
from ivtrainer.utils.checks import finite_number, finite_numbers

__all__ = ["IVGuidedConfig"]


def _field(default, help: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class IVGuidedConfig(TrainingArguments):
    """``TrainingArguments`` for :class:`~ivtrainer.IVGuidedTrainer`.

    Loss: ``CE(student + a(t) * IV) + w_kl(t) * KL(student, teacher + teacher_iv_strength * IV)``
    (+ ``head_mse_weight`` * MSE on the IV heads). ``a(t)`` follows ``iv_schedule`` from
    ``iv_strength_start`` to ``iv_strength_end`` over the first ``iv_schedule_fraction`` of the
    optimizer steps; ``w_kl(t)`` likewise (constant by default). Every IV strength here is a
    multiple of each IV's own strength (``InstructionVector.strength``, calibrated at extraction;
    1 for an uncalibrated IV), so the defaults use each IV as it was calibrated.
    """

    instruction_vectors: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Instruction-vector folders or Hub ids (one per earlier task / ability); or pass them to the trainer."
        },
    )
    iv_weights: list[float] | None = dataclasses.field(
        default=None, metadata={"help": "A weight per instruction vector (default 1 each)."}
    )
    iv_schedule: Literal["constant", "linear", "cosine", "exponential", "step"] = _field(
        "linear", "How the student's IV strength anneals.", choices=list(SCHEDULES)
    )
    iv_strength_start: float = _field(1.0, "Student IV strength at step 0.")
    iv_strength_end: float = _field(0.0, "Student IV strength once the annealing window is over.")
    iv_schedule_fraction: float = _field(0.5, "Fraction of training the annealing takes, in [0, 1].")
    iv_positions: Literal["last_prompt", "last", "all"] = _field(
        "last_prompt",
        "Where the IV is added: the last prompt token (before the first label), the last token, or all.",
    )
    teacher_iv_strength: float = _field(
        1.0, "IV strength on the teacher (the model before this fine-tuning)."
    )
    kl_weight: float = _field(1.0, "KL weight at step 0 (and throughout with the constant schedule).")
    kl_weight_end: float | None = _field(None, "KL weight after the window (default: kl_weight).")
    kl_schedule: Literal["constant", "linear", "cosine", "exponential", "step"] = _field(
        "constant", "How the KL weight changes.", choices=list(SCHEDULES)
    )
    kl_schedule_fraction: float = _field(1.0, "Fraction of training the KL schedule takes, in [0, 1].")
    kl_direction: Literal["forward", "reverse", "jsd"] = _field(
        "reverse",
        "reverse = KL(student || teacher) (FvForgetting's), forward = KL(teacher || student), jsd.",
        choices=list(KL_DIRECTIONS),
    )
    kl_temperature: float = _field(2.0, "Softmax temperature of the KL (FvForgetting: 2).")
    kl_positions: Literal["all", "answer", "last_prompt"] = _field(
        "all", "Tokens the KL covers.", choices=list(KL_POSITIONS)
    )
    kl_threshold: float = _field(0.0, "Drop a micro-batch's KL below this mean value (FvForgetting: 0.1).")
    head_mse_weight: float = _field(0.0, "Weight of the MSE between student and teacher IV-head outputs.")

    def __post_init__(self) -> None:
        self.iv_schedule_obj()  # every value checked before the Trainer does any work
        self.kl_schedule_obj()
        if self.iv_positions not in ("last_prompt", "last", "all"):
            raise InvalidInputError(
                f"iv_positions must be 'last_prompt', 'last' or 'all', not {self.iv_positions!r}"
            )
        if self.kl_direction not in KL_DIRECTIONS:
            raise InvalidInputError(f"kl_direction must be one of {KL_DIRECTIONS}, not {self.kl_direction!r}")
        if self.kl_positions not in KL_POSITIONS:
            raise InvalidInputError(f"kl_positions must be one of {KL_POSITIONS}, not {self.kl_positions!r}")
        for name in ("teacher_iv_strength", "kl_temperature", "kl_threshold", "head_mse_weight"):
            finite_number(name, getattr(self, name))
        if self.iv_weights is not None:
            self.iv_weights = finite_numbers("iv_weights", self.iv_weights)
        if self.kl_temperature <= 0:
            raise InvalidInputError(f"kl_temperature must be > 0, got {self.kl_temperature}")
        if min(self.kl_weight, self.kl_weight_end or 0.0, self.kl_threshold, self.head_mse_weight) < 0:
            raise InvalidInputError("kl_weight, kl_weight_end, kl_threshold and head_mse_weight must be >= 0")
        super().__post_init__()

    def iv_schedule_obj(self) -> Schedule:
        return Schedule(
            self.iv_schedule, self.iv_strength_start, self.iv_strength_end, self.iv_schedule_fraction
        )

    def kl_schedule_obj(self) -> Schedule:
        end = self.kl_weight if self.kl_weight_end is None else self.kl_weight_end
        return Schedule(self.kl_schedule, self.kl_weight, end, self.kl_schedule_fraction)
