"""The prompts of the held-out abilities, one home for :mod:`ivtrainer.evaluation.forgetting` and
the lm-eval tasks (:mod:`ivtrainer.evaluation.lm_eval_tasks`): the built-in word tasks' 5-shot
prompts and the facts' chat questions."""

from __future__ import annotations

import random

from ivtrainer.datasets.tasks import Example, load_task
from ivtrainer.steering.icl import draw

__all__ = ["QUESTIONS", "icl_examples"]

# The built-in counterfactual relations asked as chat instructions.
QUESTIONS = {
    "capital": "What is the capital city of {}? Answer with one word.",
    "language": "What is the official language of {}? Answer with one word.",
    "landmark_city": "In which city is the {}? Answer with one word.",
    "currency": "What is the currency of {}? Answer with one word.",
}


def icl_examples(
    task: str, n_icl: int, *, split: str = "test", fixed_demos: bool = False
) -> list[tuple[list[Example], Example]]:
    """``(demos, query)`` of the held-out-ability prompts of a built-in task: 5 demonstrations from
    its demonstration pool, the query from its held-out pairs (``split="test"``) or from the pool
    (``"validation"``), drawn with a generator seeded by the task's name (demonstrations drawn per
    query: the first ``n`` prompts are the same whatever ``n_icl``)."""
    pool, held = load_task(task), load_task(task, "held_out")
    queries = held[:n_icl] if split == "test" else None
    return draw(pool, n_icl, 5, random.Random(task), queries=queries, fixed_demos=fixed_demos)
