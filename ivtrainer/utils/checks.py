"""Checks of user input shared across the package: each raises :class:`InvalidInputError` with a
message that names the value and what is expected."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ivtrainer.errors import InvalidInputError

__all__ = ["finite_number", "finite_numbers", "finite_tensor"]


def finite_number(name: str, value: Any, *, minimum: float | None = None, hint: str = "") -> float:
    """``value`` as a float; refused if it is not a real, finite number (bools neither) or, with
    ``minimum``, below it. ``hint`` follows the requirement in the message."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise InvalidInputError(f"{name} must be a finite number{bound}{hint}, got {value!r}")
    return float(value)


def finite_numbers(name: str, values: Sequence[Any]) -> list[float]:
    """Each of ``values`` checked by :func:`finite_number`."""
    return [finite_number(f"{name}[{i}]", v) for i, v in enumerate(values)]


def finite_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, refused if any element is NaN or infinite."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise InvalidInputError(f"{name} has {bad} non-finite values (NaN or inf) of {tensor.numel()}")
    return tensor
