"""What every subtraction shares: the lambdas, checked, and the size of what it changed
(``stats``: ||lambda x delta|| and its ratio to the weights, so a no-op shows)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ivtrainer.errors import InvalidInputError
from ivtrainer.utils.checks import finite_number


def as_list(value, n: int | None = None) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return items * n if n is not None and len(items) == 1 else items


def check_lambdas(lams: Sequence, n: int) -> list[float]:
    if len(lams) != n:
        raise InvalidInputError(
            f"got {len(lams)} lambdas for {n} adapters; pass one lambda, or one per adapter"
        )
    return [finite_number("lambda", lam) for lam in lams]


def record_change(stats: dict[str, float] | None, before: torch.Tensor, after: torch.Tensor) -> None:
    """Accumulate the squared norms of a change and of the weight it changed (float32)."""
    if stats is not None:
        stats["delta_sq"] = stats.get("delta_sq", 0.0) + float((after - before).square().sum())
        stats["weight_sq"] = stats.get("weight_sq", 0.0) + float(before.square().sum())
        stats["tensors"] = stats.get("tensors", 0) + 1


def finish_stats(stats: dict[str, float] | None) -> None:
    """``delta_norm`` = ||lambda * delta||, ``weight_norm`` = ||W|| of the changed tensors, and
    ``relative`` = their ratio: what a user checks to see that the subtraction did something."""
    if stats is not None:
        delta, weight = math.sqrt(stats.pop("delta_sq", 0.0)), math.sqrt(stats.pop("weight_sq", 0.0))
        stats.update(delta_norm=delta, weight_norm=weight, relative=delta / weight if weight else 0.0)
