"""Annealing schedules for the IV strength and the KL weight of IV-guided training.

A schedule is a pure function of the optimizer step and the run's total steps, so a run resumed
from a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from ivtrainer.errors import InvalidInputError
from ivtrainer.utils.checks import finite_number

__all__ = ["SCHEDULES", "Schedule"]

SCHEDULES = ("constant", "linear", "cosine", "exponential", "step")
_DECAY = 5.0  # exponential: e^-5 of the way left at the end of the window, then snapped to `end`


@dataclasses.dataclass(frozen=True)
class Schedule:
    """``start`` -> ``end`` over the first ``fraction`` of training, then ``end``.

    - ``constant``: ``start`` throughout;
    - ``linear`` / ``cosine``: the usual curves;
    - ``exponential``: ``end + (start - end) * (e^(-5p) - e^-5) / (1 - e^-5)``, fast early decay,
      reaching ``end`` exactly at ``p = 1``;
    - ``step``: ``start`` for the window, then ``end``.
    """

    kind: Literal["constant", "linear", "cosine", "exponential", "step"] = "linear"
    start: float = 1.0
    end: float = 0.0
    fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise InvalidInputError(f"schedule must be one of {SCHEDULES}, not {self.kind!r}")
        for name in ("start", "end"):
            finite_number(f"schedule {name}", getattr(self, name))
        if not (isinstance(self.fraction, (int, float)) and 0 <= self.fraction <= 1):
            raise InvalidInputError(f"schedule fraction must be in [0, 1], got {self.fraction!r}")

    def __call__(self, step: int, total_steps: int) -> float:
        """The value for the optimizer step ``step`` (0-based) of ``total_steps``."""
        if self.kind == "constant":
            return float(self.start)
        window = self.fraction * max(total_steps, 1)
        p = 1.0 if window == 0 else min(max(step, 0) / window, 1.0)
        if p >= 1.0:
            return float(self.end)
        span = self.start - self.end
        if self.kind == "linear":
            return self.start - span * p
        if self.kind == "cosine":
            return self.end + span * 0.5 * (1 + math.cos(math.pi * p))
        if self.kind == "exponential":
            return self.end + span * (math.exp(-_DECAY * p) - math.exp(-_DECAY)) / (1 - math.exp(-_DECAY))
        return float(self.start)  # step
