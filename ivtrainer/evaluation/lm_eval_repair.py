"""lm-evaluation-harness with an IV repair on: lm-eval's ``HFLM`` that adds, to every request, the
IV of its task at the request's last context token, as ``IVRepair.apply`` does around
``generate`` and as ``ivtrainer continual --repair`` scores.

A request's task is given (``tasks``: lm-eval task name -> the repair's task; other lm-eval tasks
get no IV) or routed (the repair's router on the request's context, the prompt). Where the IV goes:

- ``loglikelihood`` (and multiple choice): the teacher-forced forward of context + continuation
  gets the IV at the context's last token (whose logits predict the first answer token), the
  answer tokens none: the score of greedy decoding with the IV on the prompt;
- ``generate_until``: the prompt's last token in the first forward, the generated tokens none;
- ``loglikelihood_rolling`` (perplexity of whole documents) has no prompt: no IV.

:func:`~ivtrainer.evaluation.lm_eval_harness.evaluate_lm` with ``repair=`` uses it.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from ivtrainer.errors import InvalidInputError
from ivtrainer.steering.repair import IVRepair

__all__ = ["RepairedHFLM"]

NO_TASK = "none"


class RepairedHFLM(HFLM):
    """``HFLM`` with ``repair`` on every request's prompt.

    Args:
        repair: the IVs, their strengths and the router (``IVRepair.from_pretrained``).
        tasks: lm-eval task name -> the repair's task for its requests (task given); None: each
            request's task found by the router from its context (routed).
        *args: as ``HFLM``.
        **kwargs: as ``HFLM`` (``pretrained=`` a model in memory or a name).

    ``routes[lm-eval task][repair task or "none"]`` counts the requests that got each IV.
    """

    def __init__(
        self, *args: Any, repair: IVRepair, tasks: Mapping[str, str] | None = None, **kwargs: Any
    ) -> None:
        if tasks is None and repair.router is None:
            raise InvalidInputError(
                "this repair has no router: name each lm-eval task's repair task with tasks="
            )
        unknown = sorted(set((tasks or {}).values()) - set(repair.vectors.vectors))
        if unknown:
            raise InvalidInputError(
                f"no IV for tasks {unknown}: the repair knows {sorted(repair.vectors.vectors)}"
            )
        super().__init__(*args, **kwargs)
        self.repair, self.task_map = repair, None if tasks is None else dict(tasks)
        self.routes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._context_task: dict[str, str | None] = {}  # a request's context -> its repair task
        self._rows: dict[tuple[int, ...], tuple[int, str | None]] = {}  # input ids -> (IV position, task)
        self._batch_tasks: list[str | None] | None = None

    def _assign(self, requests: list[Any]) -> None:
        """The repair task of each request's context (given or routed), counted in ``routes``."""
        contexts = [req.args[0] for req in requests]
        if self.task_map is not None:
            chosen = [self.task_map.get(req.task_name or "") for req in requests]
        else:
            assert self.repair.router is not None
            unique = [c for c in dict.fromkeys(contexts) if c]
            routed = dict(
                zip(unique, self.repair.router.route(self.model, self.tokenizer, unique), strict=True)
            )
            chosen = [routed.get(c) for c in contexts]
        for req, context, task in zip(requests, contexts, chosen, strict=True):
            self._context_task[context] = task
            self.routes[req.task_name or ""][task or NO_TASK] += 1

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._assign(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        self._assign(requests)
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(
        self, requests: list[Any], *args: Any, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        # each request's model input as HFLM builds it (context + continuation, cut from the left
        # to the window, last token dropped) -> the position of its last context token
        self._rows = {}
        for request, context_enc, continuation_enc in requests:
            task = self._context_task.get(request[0]) if request is not None else None
            if task is None:
                continue
            inp = (context_enc + continuation_enc)[-(self.max_length + 1) :][:-1]
            self._rows[tuple(inp)] = (len(inp) - len(continuation_enc), task)
        try:
            return super()._loglikelihood_tokens(requests, *args, **kwargs)
        finally:
            self._rows = {}

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self._rows or self.backend != "causal":
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        tasks: list[str | None] = []
        positions = torch.zeros(inps.shape, dtype=torch.bool)
        for i, row in enumerate(inps.tolist()):
            found = _lookup(self._rows, row)
            tasks.append(found[1] if found else None)
            if found:
                positions[i, found[0]] = True
        with self._repair_on(tasks, positions):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def tok_batch_encode(
        self, strings: list[str], *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # generate_until encodes each batch's contexts right before generating from them
        self._batch_tasks = [self._context_task.get(s) for s in strings]
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any
    ) -> torch.Tensor:
        tasks, self._batch_tasks = self._batch_tasks, None
        if tasks is None or len(tasks) != context.shape[0]:
            tasks = [None] * context.shape[0]
        with self._repair_on(tasks, "last"):
            return super()._model_generate(context, max_length, stop, **kwargs)

    @contextlib.contextmanager
    def _repair_on(self, tasks: list[str | None], positions: torch.Tensor | str) -> Iterator[None]:
        if all(t is None for t in tasks):
            yield
            return
        with self.repair.vectors.apply(self.model, tasks, positions=positions):
            yield


def _lookup(
    rows: Mapping[tuple[int, ...], tuple[int, str | None]], row: list[int]
) -> tuple[int, str | None] | None:
    """The entry of a right-padded row (HFLM pads with 0): the row itself, or the row without
    some of its trailing zeros."""
    end = len(row)
    while end > 0:
        found = rows.get(tuple(row[:end]))
        if found is not None or row[end - 1] != 0:
            return found
        end -= 1
    return None
