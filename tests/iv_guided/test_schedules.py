"""Strength and weight schedules."""

from __future__ import annotations

import itertools
import math

import pytest

from ivtrainer.iv_guided.schedules import Schedule


def test_schedules():
    total = 100
    assert [Schedule("linear", 1, 0, 0.5)(s, total) for s in (0, 25, 50, 99)] == [1.0, 0.5, 0.0, 0.0]
    assert Schedule("cosine", 1, 0, 1)(50, total) == pytest.approx(0.5)
    assert Schedule("cosine", 2, 1, 1)(0, total) == 2.0
    assert [Schedule("step", 1, 0.2, 0.3)(s, total) for s in (0, 29, 30)] == [1.0, 1.0, 0.2]
    assert Schedule("constant", 0.7, 0.0)(99, total) == 0.7
    exp = [Schedule("exponential", 1, 0, 1)(s, total) for s in range(0, 101, 10)]
    assert exp[0] == pytest.approx(1.0) and exp[-1] == 0.0 and all(a > b for a, b in itertools.pairwise(exp))
    assert exp[1] < 0.65  # fast early decay
    assert Schedule("linear", 1, 0, 0.0)(0, total) == 0.0  # an empty window: `end` from the start
    for kwargs in ({"fraction": 1.5}, {"fraction": -0.1}, {"start": math.nan}, {"kind": "warmup"}):
        with pytest.raises(ValueError):
            Schedule(**kwargs)
