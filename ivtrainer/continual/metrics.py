"""The standard continual-learning scores of an accuracy matrix (Lopez-Paz & Ranzato, 2017, GEM;
the IV papers report AP, BWT and FWT the same way).

``matrix[s][j]`` is the accuracy on task ``j`` after stage ``s``: stage 0 is the model before any
training, stage ``s`` (1-based) the model after training the ``s``-th task. With ``T`` tasks:

- ``AP`` (average performance): the mean of the last row, ``mean_j matrix[T][j]``;
- ``BWT`` (backward transfer): ``mean_{j < T} (matrix[T][j] - matrix[j + 1][j])``, what training the
  later tasks did to each earlier one (negative: forgetting);
- ``FWT`` (forward transfer): ``mean_{j > 0} (matrix[j][j] - matrix[0][j])``, how much training the
  earlier tasks helped a task before it was trained;
- ``forgetting[j]``: ``max_{j < s < T+1} matrix[s][j] - matrix[T][j]``, the drop from the task's best.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from ivtrainer.errors import InvalidInputError

__all__ = ["continual_scores"]


def continual_scores(matrix: Sequence[Sequence[float]]) -> dict[str, float | list[float]]:
    """``AP``, ``BWT``, ``FWT`` and per-task ``forgetting`` of a ``(T + 1) x T`` accuracy matrix
    (see the module doc; ``BWT`` and ``FWT`` are 0 for one task)."""
    rows = [list(map(float, row)) for row in matrix]
    n_tasks = len(rows[0]) if rows else 0
    if n_tasks == 0 or len(rows) != n_tasks + 1 or any(len(r) != n_tasks for r in rows):
        raise InvalidInputError(
            f"the accuracy matrix must have T + 1 rows (stage 0 = before training) of T tasks, got "
            f"{len(rows)} rows of {[len(r) for r in rows]}"
        )
    if not all(math.isfinite(v) for r in rows for v in r):
        raise InvalidInputError("the accuracy matrix holds non-finite values")
    last = rows[n_tasks]
    earlier = range(n_tasks - 1)
    forgetting = [max(rows[s][j] for s in range(j + 1, n_tasks + 1)) - last[j] for j in earlier]
    return {
        "AP": statistics.fmean(last),
        "BWT": statistics.fmean(last[j] - rows[j + 1][j] for j in earlier) if n_tasks > 1 else 0.0,
        "FWT": statistics.fmean(rows[j][j] - rows[0][j] for j in range(1, n_tasks)) if n_tasks > 1 else 0.0,
        "forgetting": forgetting,
    }
