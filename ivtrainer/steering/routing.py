"""Routing a prompt to its task, for IV repair when the user does not name the task.

Routing rule: nearest centroid. A prompt's hidden state at its last token, at one decoder layer,
minus the mean over all tasks' prompts, is compared by cosine similarity with each task's mean
(centred) state; the most similar task wins. No training, one forward per prompt, and the layer is
chosen on the prompts the router is fitted on (leave-one-out accuracy over a few layers): prompts of
one task share an instruction and a format, which the residual stream carries at its last token.

A prompt of no known task gets no IV: when its state lies further from the winning task's mean
than ``margin`` (default 2) times that task's radius (the largest leave-one-out distance of its
fitting prompts from their mean), the route is None. Without this gate every prompt got some
task's IV, and on the default model that took 5-shot word tasks from 0.61 to 0.23
(``benchmarks/lm_eval_repair.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ivtrainer.errors import InvalidInputError
from ivtrainer.modeling.architectures import get_layout
from ivtrainer.modeling.hooks import eval_mode

__all__ = ["MARGIN", "NearestTaskRouter", "last_token_states"]

logger = logging.getLogger(__name__)

#: A prompt further from its nearest task's mean than this many times the task's radius gets no IV.
MARGIN = 2.0


@torch.no_grad()
def last_token_states(
    model: nn.Module, tokenizer, prompts: Sequence[str], *, batch_size: int = 16
) -> torch.Tensor:
    """``(n_layers, len(prompts), hidden)``: each decoder layer's output at each prompt's last
    token (float32, on the CPU)."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            mask = batch["attention_mask"].to(device)
            hidden = model(
                input_ids=batch["input_ids"].to(device), attention_mask=mask, output_hidden_states=True,
                use_cache=False,
            ).hidden_states[1:]  # fmt: skip
            last = (mask * torch.arange(1, mask.shape[1] + 1, device=device)).argmax(
                -1
            )  # either padding side
            rows = torch.arange(mask.shape[0], device=device)
            out.append(torch.stack([h[rows, last].float().cpu() for h in hidden]))
    return torch.cat(out, 1)


class NearestTaskRouter:
    """The task of a prompt: the nearest task centroid (cosine, centred states) at one layer, or
    None for a prompt far from every task (see the module doc).

    Args:
        layer: the layer whose states are compared (what :meth:`fit` computes, as the next three).
        names: the tasks.
        centroids: their normalised centred mean states.
        mean: the mean state over all fitting prompts.
        means: each task's mean state; None (a router saved before the gate): every prompt is
            routed to a task.
        radii: each task's radius (None with ``means``).
        margin: the gate, in radii; None: no gate.
    """

    def __init__(
        self,
        layer: int,
        names: Sequence[str],
        centroids: torch.Tensor,
        mean: torch.Tensor,
        means: torch.Tensor | None = None,
        radii: torch.Tensor | None = None,
        margin: float | None = MARGIN,
    ) -> None:
        if margin is not None and not margin > 0:
            raise InvalidInputError(f"margin must be > 0 (or None: no gate), got {margin}")
        self.layer, self.names = layer, list(names)
        self.centroids, self.mean = centroids, mean
        self.means, self.radii, self.margin = means, radii, margin

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        tokenizer,
        prompts: Mapping[str, Sequence[str]],
        *,
        layer: int | None = None,
        margin: float | None = MARGIN,
        batch_size: int = 16,
    ) -> NearestTaskRouter:
        """Centroids from each task's ``prompts`` (its validation prompts, say); ``layer`` None:
        the layer, among a quarter, half and three quarters of the depth, whose leave-one-out
        routing accuracy on these prompts is highest (the earliest on a tie). ``margin``: the
        gate (None: every prompt gets a task)."""
        names = [n for n, p in prompts.items() if len(p)]
        if len(names) < 2:
            raise InvalidInputError("routing needs prompts of at least two tasks")
        if any(len(prompts[n]) < 2 for n in names):
            raise InvalidInputError(
                "routing needs at least two prompts per task (a task's radius is measured on them)"
            )
        n_layers = get_layout(model).n_layers
        if layer is not None and not 0 <= layer < n_layers:
            raise InvalidInputError(f"layer {layer} is out of range: the model has {n_layers} layers")
        flat = [p for n in names for p in prompts[n]]
        labels = torch.tensor([i for i, n in enumerate(names) for _ in prompts[n]])
        states = last_token_states(model, tokenizer, flat, batch_size=batch_size)
        candidates = (
            [layer] if layer is not None else sorted({n_layers // 4, n_layers // 2, 3 * n_layers // 4})
        )
        best = max(candidates, key=lambda ly: (_leave_one_out(states[ly], labels, len(names)), -ly))
        mean = states[best].mean(0)
        centred = states[best] - mean
        centroids = torch.stack([centred[labels == i].mean(0) for i in range(len(names))])
        means = torch.stack([states[best][labels == i].mean(0) for i in range(len(names))])
        radii = torch.stack([_radius(states[best][labels == i]) for i in range(len(names))])
        return cls(best, names, torch.nn.functional.normalize(centroids, dim=-1), mean, means, radii, margin)

    def route(
        self, model: nn.Module, tokenizer, prompts: Sequence[str], *, batch_size: int = 16
    ) -> list[str | None]:
        """The task of each prompt (None: no known task)."""
        return self.route_states(
            last_token_states(model, tokenizer, prompts, batch_size=batch_size)[self.layer]
        )

    def route_states(self, states: torch.Tensor) -> list[str | None]:
        """The task of each prompt from its ``(n, hidden)`` last-token states at :attr:`layer`."""
        scores = torch.nn.functional.normalize(states - self.mean, dim=-1) @ self.centroids.T
        best = scores.argmax(-1)
        routes: list[str | None] = [self.names[i] for i in best.tolist()]
        if self.margin is not None and self.means is not None and self.radii is not None:
            far = (states - self.means[best]).norm(dim=-1) > self.margin * self.radii[best]
            routes = [None if f else r for r, f in zip(routes, far.tolist(), strict=True)]
        return routes


def _radius(states: torch.Tensor) -> torch.Tensor:
    """The largest distance of a prompt's state from the mean of the task's other prompts."""
    n = len(states)
    others = (states.sum(0) - states) / (n - 1)
    return (states - others).norm(dim=-1).max()


def _leave_one_out(states: torch.Tensor, labels: torch.Tensor, n_tasks: int) -> float:
    """Nearest-centroid accuracy, each prompt routed by centroids made without it."""
    centred = states - states.mean(0)
    sums = torch.stack([centred[labels == i].sum(0) for i in range(n_tasks)])
    counts = torch.bincount(labels, minlength=n_tasks).float()
    correct = 0
    for x, y in zip(centred, labels.tolist(), strict=True):
        own_sums, own_counts = sums.clone(), counts.clone()
        own_sums[y] -= x
        own_counts[y] -= 1
        centroids = own_sums / own_counts.clamp(min=1).unsqueeze(-1)
        scores = torch.nn.functional.cosine_similarity(x.unsqueeze(0), centroids, dim=-1)
        scores[own_counts == 0] = -2.0
        correct += int(scores.argmax()) == y
    return correct / len(labels)
