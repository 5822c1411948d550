"""Configuration of IV-guided training (Jiang et al. 2024)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from transformers import TrainingArguments

from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.kl_loss import KL_DIRECTIONS, KL_POSITIONS, KLTerm
from ivtrainer.iv_guided.recipes import RECIPES
from ivtrainer.iv_guided.schedules import SCHEDULES, Schedule
from ivtrainer.utils.checks import finite_number, finite_numbers
from ivtrainer.utils.monitor_args import ForgettingMonitorArguments

__all__ = ["RECIPES", "IVGuidedConfig"]


def _field(default, help: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


_DEFAULT = RECIPES["fvforgetting"]


@dataclasses.dataclass
class IVGuidedConfig(ForgettingMonitorArguments, TrainingArguments):
    """``TrainingArguments`` for :class:`~ivtrainer.IVGuidedTrainer`.

    Loss: ``CE(student + a(t) * IV) + sum_i w_i(t) * KL_i(student, teacher + teacher_iv_strength * IV)``
    (+ ``head_mse_weight`` * MSE on the IV heads). Each KL term ``i`` covers ``kl_positions[i]``
    with weight ``kl_weight[i]`` and counts only above ``kl_threshold[i]`` (one value applies to
    every term); all terms share one teacher pass. ``a(t)`` follows ``iv_schedule`` from
    ``iv_strength_start`` to ``iv_strength_end`` over the first ``iv_schedule_fraction`` of the
    optimizer steps; ``w_i(t)`` likewise with ``kl_schedule`` (constant by default). Every IV
    strength here is a multiple of each IV's own strength (``InstructionVector.strength``,
    calibrated at extraction; 1 for an uncalibrated IV).

    The defaults are the public FvForgetting code's recipe (``IVGuidedConfig.recipe("fvforgetting")``);
    :meth:`recipe` names the others. The fields below come after ``TrainingArguments``' own.

    Parameters:
        instruction_vectors (`list[str]` or `None`, defaults to `None`):
            Instruction-vector folders or Hub ids, or `"auto"`: the training data's own IV, extracted
            before training (FvForgetting's recipe); or pass them to the trainer.
        auto_iv_heads (`str` or `None`, defaults to `None`):
            With `instruction_vectors="auto"`: a saved head set (folder or Hub id) to extract the
            training data's IV from (FvForgetting's universal heads: mean activations only, no CIE);
            `"shipped"`: the head set ivtrainer ships for the default model; `None` or `"exact"`:
            exact CIE over every head.
        iv_weights (`list[float]` or `None`, defaults to `None`):
            A weight per instruction vector (default 1 each).
        iv_schedule (`str`, defaults to `"linear"`):
            How the student's IV strength anneals: `constant`, `linear`, `cosine`, `exponential`, `step`.
        iv_strength_start (`float`, defaults to `0.0`):
            The student's IV strength at step 0 (FvForgetting: 0; the IV paper: 1).
        iv_strength_end (`float`, defaults to `0.0`):
            The student's IV strength once the annealing window is over.
        iv_schedule_fraction (`float`, defaults to `0.5`):
            Fraction of training the annealing takes, in [0, 1].
        iv_positions (`str`, defaults to `"last_prompt"`):
            Where the student's IV is added: the last prompt token (before the first label), the
            last token, or all.
        teacher_iv_strength (`float`, defaults to `1.0`):
            The IV strength on the teacher (the model before this fine-tuning).
        kl_positions (`list[str]`, defaults to `["last_prompt", "all"]`):
            The tokens each KL term covers: `last_prompt`, `answer` or `all`.
        kl_weight (`list[float]`, defaults to `[20.0, 0.1]`):
            Each KL term's weight at step 0 (and throughout with the constant schedule).
        kl_weight_end (`list[float]` or `None`, defaults to `None`):
            Each KL weight after the schedule's window (default: `kl_weight`).
        kl_schedule (`str`, defaults to `"constant"`):
            How the KL weights change (the schedules of `iv_schedule`).
        kl_schedule_fraction (`float`, defaults to `1.0`):
            Fraction of training the KL schedule takes, in [0, 1].
        kl_threshold (`list[float]`, defaults to `[0.1, 0.1]`):
            Drop a micro-batch's KL term while its mean value is below this (FvForgetting: 0.1; 0
            keeps gradient accumulation exact).
        kl_direction (`str`, defaults to `"reverse"`):
            `reverse`: KL(student || teacher) (FvForgetting's); `forward`: KL(teacher || student); `jsd`.
        kl_temperature (`float`, defaults to `2.0`):
            Softmax temperature of both distributions (FvForgetting: 2).
        head_mse_weight (`float`, defaults to `1.0`):
            Weight of the MSE between the student's and the teacher's outputs of the IV heads at the
            last prompt token.
        head_mse_threshold (`float`, defaults to `0.01`):
            Count a head's MSE only above this value (FvForgetting: 0.01).
        head_mse_reference (`str`, defaults to `"without_iv"`):
            The teacher pass the heads are compared with: without the IV (FvForgetting's) or the
            KL's, with it (`with_iv`: no extra forward).
        teacher (`str`, defaults to `"live"`):
            `live`: the teacher runs at every step (a PEFT model's base with adapters off, else a
            frozen copy); `precomputed`: it runs once over the training set before the first step
            and is stored under `output_dir` (no reference model, no teacher forward per step).
        teacher_top_k (`int`, defaults to `64`):
            With `teacher="precomputed"`: the teacher's top-k tokens stored per position (the rest is
            one bucket); 0: its last hidden states instead, the LM head applied at each step (exact).
        teacher_cache_dir (`str` or `None`, defaults to `None`):
            With `teacher="precomputed"`: where it is stored (default `<output_dir>/_ivtrainer_teacher`).
        forgetting_monitor_every (`int`, defaults to `50`):
            Log the KL between the model before training and now on a fixed sample of the training
            rows every N optimizer steps and at the end (~2% of training time at 50); 0: off.
        forgetting_monitor_rows (`int`, defaults to `16`):
            Training rows in the forgetting monitor's fixed sample.
    """

    instruction_vectors: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Instruction-vector folders or Hub ids, or 'auto': the training data's own IV, extracted before "
            "training (FvForgetting's recipe); or pass them to the trainer."
        },
    )
    auto_iv_heads: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "With instruction_vectors auto: a saved head set (folder or Hub id) to extract the training "
            "data's IV from (FvForgetting's universal heads; only mean activations, no CIE); 'shipped': the head "
            "set ivtrainer ships for the default model; None or 'exact': exact CIE over every head."
        },
    )
    iv_weights: list[float] | None = dataclasses.field(
        default=None, metadata={"help": "A weight per instruction vector (default 1 each)."}
    )
    iv_schedule: Literal["constant", "linear", "cosine", "exponential", "step"] = _field(
        "linear", "How the student's IV strength anneals.", choices=list(SCHEDULES)
    )
    iv_strength_start: float = _field(
        _DEFAULT["iv_strength_start"], "Student IV strength at step 0 (FvForgetting: 0, the IV paper: 1)."
    )
    iv_strength_end: float = _field(0.0, "Student IV strength once the annealing window is over.")
    iv_schedule_fraction: float = _field(0.5, "Fraction of training the annealing takes, in [0, 1].")
    iv_positions: Literal["last_prompt", "last", "all"] = _field(
        "last_prompt",
        "Where the IV is added: the last prompt token (before the first label), the last token, or all.",
    )
    teacher_iv_strength: float = _field(
        _DEFAULT["teacher_iv_strength"], "IV strength on the teacher (the model before this fine-tuning)."
    )
    kl_positions: list[str] = dataclasses.field(
        default_factory=lambda: list(_DEFAULT["kl_positions"]),
        metadata={
            "help": "Tokens each KL term covers (FvForgetting: last_prompt all).",
            "choices": list(KL_POSITIONS),
        },
    )
    kl_weight: list[float] = dataclasses.field(
        default_factory=lambda: list(_DEFAULT["kl_weight"]),
        metadata={"help": "Each KL term's weight at step 0 (and throughout with the constant schedule)."},
    )
    kl_weight_end: list[float] | None = dataclasses.field(
        default=None, metadata={"help": "Each KL weight after the window (default: kl_weight)."}
    )
    kl_schedule: Literal["constant", "linear", "cosine", "exponential", "step"] = _field(
        "constant", "How the KL weights change.", choices=list(SCHEDULES)
    )
    kl_schedule_fraction: float = _field(1.0, "Fraction of training the KL schedule takes, in [0, 1].")
    kl_threshold: list[float] = dataclasses.field(
        default_factory=lambda: list(_DEFAULT["kl_threshold"]),
        metadata={"help": "Drop a micro-batch's KL term below this mean value (FvForgetting: 0.1)."},
    )
    kl_direction: Literal["forward", "reverse", "jsd"] = _field(
        _DEFAULT["kl_direction"],
        "reverse = KL(student || teacher) (FvForgetting's), forward = KL(teacher || student), jsd.",
        choices=list(KL_DIRECTIONS),
    )
    kl_temperature: float = _field(
        _DEFAULT["kl_temperature"], "Softmax temperature of the KL (FvForgetting: 2)."
    )
    head_mse_weight: float = _field(
        _DEFAULT["head_mse_weight"], "Weight of the MSE between student and teacher IV-head outputs."
    )
    head_mse_threshold: float = _field(
        _DEFAULT["head_mse_threshold"], "Count a head's MSE only above this value (FvForgetting: 0.01)."
    )
    head_mse_reference: Literal["with_iv", "without_iv"] = _field(
        _DEFAULT["head_mse_reference"],
        "The teacher pass the heads are compared with: without the IV (FvForgetting's) or the KL's, with it.",
        choices=["with_iv", "without_iv"],
    )

    teacher: Literal["live", "precomputed"] = _field(
        "live",
        "live: the teacher runs at every step (a PEFT model's base with adapters off, else a frozen copy); "
        "precomputed: it runs once over the training set before the first step and is stored under output_dir "
        "(no reference model, no teacher forward per step; see teacher_top_k).",
        choices=["live", "precomputed"],
    )
    teacher_top_k: int = _field(
        64,
        "With teacher precomputed: the teacher's top-k tokens stored per position (the rest is one bucket); "
        "0: its last hidden states instead, the LM head applied at each step (exact, larger on disk).",
    )
    teacher_cache_dir: str | None = _field(
        None, "With teacher precomputed: where it is stored (default <output_dir>/_ivtrainer_teacher)."
    )

    @classmethod
    def recipe(cls, name: str, **overrides: Any) -> IVGuidedConfig:
        """A config with a named recipe's values, then ``overrides`` (``output_dir=`` etc.):

        - ``"fvforgetting"`` (the defaults): the public FvForgetting code's loss, the task's own IV
          on the teacher only;
        - ``"iv-paper"``: the same plus the progressive IV of Jiang et al. 2024 on the student;
        - ``"kl-anchor"``: the same KL terms towards the model before training with no IV (the
          control that shows what the IV adds);
        - ``"kl-all"``: ivtrainer's earlier defaults, the progressive IV on the student and one KL
          of weight 1 at every token towards the IV teacher.

        The values are in ``ivtrainer.iv_guided.iv_guided_config.RECIPES``.
        """
        if name not in RECIPES:
            raise InvalidInputError(f"unknown recipe {name!r}: choose one of {sorted(RECIPES)}")
        return cls(**{**RECIPES[name], **overrides})

    def __post_init__(self) -> None:
        self.kl_positions = (
            [self.kl_positions] if isinstance(self.kl_positions, str) else list(self.kl_positions)
        )
        n = len(self.kl_positions)
        for positions in self.kl_positions:
            if positions not in KL_POSITIONS:
                raise InvalidInputError(f"KL positions must be one of {KL_POSITIONS}, not {positions!r}")
        if n == 0 or len(set(self.kl_positions)) != n:
            raise InvalidInputError(
                f"kl_positions must name one or more different positions, got {self.kl_positions}"
            )
        for name in ("kl_weight", "kl_weight_end", "kl_threshold"):
            value = getattr(self, name)
            if value is None:
                continue
            values = finite_numbers(name, [value] if isinstance(value, (int, float)) else list(value))
            if len(set(values)) == 1:  # one value (or the same for each term) applies to every term
                values = values[:1] * n
            if len(values) != n:
                raise InvalidInputError(
                    f"{name} has {len(values)} values for {n} KL terms ({self.kl_positions}): give one per term, or one"
                )
            setattr(self, name, values)
        self.kl_terms()  # every value checked before the Trainer does any work
        self.iv_schedule_obj()
        if self.iv_positions not in ("last_prompt", "last", "all"):
            raise InvalidInputError(
                f"iv_positions must be 'last_prompt', 'last' or 'all', not {self.iv_positions!r}"
            )
        if self.kl_direction not in KL_DIRECTIONS:
            raise InvalidInputError(f"kl_direction must be one of {KL_DIRECTIONS}, not {self.kl_direction!r}")
        if self.head_mse_reference not in ("with_iv", "without_iv"):
            raise InvalidInputError(
                f"head_mse_reference must be 'with_iv' or 'without_iv', not {self.head_mse_reference!r}"
            )
        for name in ("teacher_iv_strength", "kl_temperature", "head_mse_weight", "head_mse_threshold"):
            finite_number(name, getattr(self, name))
        if self.iv_weights is not None:
            self.iv_weights = finite_numbers("iv_weights", self.iv_weights)
        if self.kl_temperature <= 0:
            raise InvalidInputError(f"kl_temperature must be > 0, got {self.kl_temperature}")
        if min(self.head_mse_weight, self.head_mse_threshold) < 0:
            raise InvalidInputError("head_mse_weight and head_mse_threshold must be >= 0")
        if self.teacher not in ("live", "precomputed"):
            raise InvalidInputError(f"teacher must be 'live' or 'precomputed', not {self.teacher!r}")
        if (
            isinstance(self.teacher_top_k, bool)
            or not isinstance(self.teacher_top_k, int)
            or self.teacher_top_k < 0
        ):
            raise InvalidInputError(
                f"teacher_top_k must be a whole number >= 0 (0: exact, from stored hidden states), "
                f"got {self.teacher_top_k!r}"
            )
        super().__post_init__()

    def iv_schedule_obj(self) -> Schedule:
        return Schedule(
            self.iv_schedule, self.iv_strength_start, self.iv_strength_end, self.iv_schedule_fraction
        )

    def kl_terms(self) -> list[KLTerm]:
        """One :class:`~ivtrainer.iv_guided.kl_loss.KLTerm` per entry of ``kl_positions``."""
        ends = self.kl_weight_end if self.kl_weight_end is not None else self.kl_weight
        return [
            KLTerm(positions, Schedule(self.kl_schedule, start, end, self.kl_schedule_fraction), threshold)  # type: ignore[arg-type]  # checked in KLTerm
            for positions, start, end, threshold in zip(
                self.kl_positions, self.kl_weight, ends, self.kl_threshold, strict=True
            )
        ]

    def uses_instruction_vectors(self) -> bool:
        """Whether any term of this config adds an IV (``"kl-anchor"`` does not)."""
        return (
            self.iv_strength_start != 0
            or self.iv_strength_end != 0
            or self.teacher_iv_strength != 0
            or self.head_mse_weight != 0
        )
