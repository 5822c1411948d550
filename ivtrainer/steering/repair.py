"""IV repair: add the instruction vector of each prompt's task back at inference.

The IV papers' mechanism claim is that fine-tuning mostly suppresses earlier skills rather than
erasing them; if so, a task's IV added back should bring the task back. :class:`TaskVectors` holds
one IV per task (each at its own edit layer and strength) and adds, in a batch of prompts of
several tasks, each row's own IV at its last token; :class:`NearestTaskRouter` finds a prompt's
task when the user does not name it.

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

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ivtrainer.errors import InvalidInputError
from ivtrainer.modeling.architectures import get_layout
from ivtrainer.modeling.hooks import eval_mode
from ivtrainer.steering.instruction_vector import InstructionVector
from ivtrainer.steering.intervention import Positions, add_to_residual

__all__ = [
    "IVRepair",
    "NearestTaskRouter",
    "TaskVectors",
    "choose_strengths",
    "exact_match",
    "last_token_states",
]

logger = logging.getLogger(__name__)

REPAIR_CONFIG, ROUTER_WEIGHTS = "repair.json", "router.safetensors"

#: The strengths :func:`choose_strengths` tries, as multiples of each IV's own (0: no repair).
STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0)

#: A prompt further from its nearest task's mean than this many times the task's radius gets no IV.
MARGIN = 2.0


class TaskVectors:
    """Each task's IV, added back to the rows of its task.

    Args:
        vectors: task name -> its IV (captured on the model that knew the task, e.g. right after
            training it).
        strengths: task name -> a multiple of that IV's own strength (default 1; 0 switches the
            task's repair off), chosen on the task's validation rows, never on its test rows.
    """

    def __init__(
        self, vectors: Mapping[str, InstructionVector], strengths: Mapping[str, float] | None = None
    ) -> None:
        if not vectors:
            raise InvalidInputError("TaskVectors needs at least one task's IV")
        self.vectors = dict(vectors)
        self.strengths = {name: 1.0 for name in self.vectors} | dict(strengths or {})
        unknown = sorted(set(self.strengths) - set(self.vectors))
        if unknown:
            raise InvalidInputError(f"strengths for tasks without an IV: {unknown}")

    @contextlib.contextmanager
    def apply(
        self, model: nn.Module, tasks: Sequence[str | None], *, positions: Positions = "last"
    ) -> Iterator[None]:
        """While the block runs, add to row ``i`` of every forward the IV of ``tasks[i]`` (None:
        nothing) at its last token, as ``InstructionVector.apply`` does for one IV: prompt
        forwards and ``generate`` (its cached steps are left alone). ``positions``: a ``(batch,
        seq)`` bool mask instead (each row's last prompt token in a teacher-forced forward)."""
        unknown = sorted({t for t in tasks if t is not None and t not in self.vectors})
        if unknown:
            raise InvalidInputError(f"no IV for tasks {unknown}: known tasks are {sorted(self.vectors)}")
        with contextlib.ExitStack() as stack:
            for name in dict.fromkeys(t for t in tasks if t is not None):
                iv = self.vectors[name]
                iv.check_compatible(model)
                rows = torch.tensor([iv.strength * self.strengths[name] if t == name else 0.0 for t in tasks])
                stack.enter_context(
                    add_to_residual(model, [(iv.edit_layer, iv.vector)], strength=rows, positions=positions)
                )
            yield


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


class IVRepair:
    """What a model needs to repair itself at inference: each task's IV and strength, and the
    router that names a prompt's task. Written by ``ivtrainer continual --repair`` (``<out>/repair``)
    or by :meth:`save_pretrained`; used around ``generate``::

        repair = IVRepair.from_pretrained("cl/repair")
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        with repair.apply(model, tokenizer, prompts) as tasks:  # routed, one task per row
            out = model.generate(**batch, max_new_tokens=16)

    Each row gets its own task's IV at its last prompt token (left or right padding), the
    generated tokens none, as the repair was measured.
    """

    def __init__(self, vectors: TaskVectors, router: NearestTaskRouter | None = None) -> None:
        if router is not None and sorted(router.names) != sorted(vectors.vectors):
            raise InvalidInputError(
                f"the router knows tasks {sorted(router.names)}, the vectors {sorted(vectors.vectors)}: they must match"
            )
        self.vectors, self.router = vectors, router

    @contextlib.contextmanager
    def apply(
        self,
        model: nn.Module,
        tokenizer=None,
        prompts: Sequence[str] | None = None,
        *,
        tasks: Sequence[str | None] | None = None,
    ) -> Iterator[list[str | None]]:
        """While the block runs, add to row ``i`` of every prompt forward the IV of its task:
        ``tasks[i]`` when given (None: no IV), else the task the router finds for ``prompts[i]``
        (the rows of the batch, in order; None where it finds no known task: no IV). Yields the
        tasks used."""
        if tasks is None:
            if self.router is None:
                raise InvalidInputError("this repair has no router: name each row's task with tasks=")
            if prompts is None or tokenizer is None:
                raise InvalidInputError(
                    "routing needs the tokenizer and the batch's prompts (or give tasks=)"
                )
            tasks = self.router.route(model, tokenizer, prompts)
        chosen = list(tasks)
        with self.vectors.apply(model, chosen):
            yield chosen

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """``repair.json`` (strengths, the router's layer and tasks), ``router.safetensors`` and
        one IV folder per task, written to a temporary folder and renamed into place."""
        from safetensors.torch import save_file

        from ivtrainer.utils.outputs import atomic_dir

        names = list(self.vectors.vectors)
        config: dict = {"tasks": names, "strengths": dict(self.vectors.strengths), "router": None}
        with atomic_dir(save_directory) as tmp:
            for i, name in enumerate(names):
                self.vectors.vectors[name].save_pretrained(tmp / f"task_{i}")
            if self.router is not None:
                router = self.router
                config["router"] = {"layer": router.layer, "tasks": router.names, "margin": router.margin}
                tensors = {"centroids": router.centroids, "mean": router.mean}
                if router.means is not None and router.radii is not None:
                    tensors |= {"means": router.means, "radii": router.radii}
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ROUTER_WEIGHTS))
            (tmp / REPAIR_CONFIG).write_text(json.dumps(config, indent=1))
        return Path(save_directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> IVRepair:
        """Load a folder written by :meth:`save_pretrained`; every problem is one clear error."""
        folder = Path(path).expanduser()
        config_file = folder / REPAIR_CONFIG
        if not config_file.is_file():
            raise InvalidInputError(
                f"{folder} holds no IV repair ({REPAIR_CONFIG} missing): give the folder IVRepair.save_pretrained "
                "or `ivtrainer continual --repair` wrote (<out>/repair)"
            )
        try:
            config = json.loads(config_file.read_text())
            names, strengths = list(config["tasks"]), dict(config["strengths"])
            vectors = {
                n: InstructionVector.from_pretrained(folder / f"task_{i}") for i, n in enumerate(names)
            }
            router = None
            if config.get("router"):
                from safetensors.torch import load_file

                tensors = load_file(str(folder / ROUTER_WEIGHTS))
                router = NearestTaskRouter(
                    int(config["router"]["layer"]),
                    config["router"]["tasks"],
                    tensors["centroids"],
                    tensors["mean"],
                    tensors.get("means"),
                    tensors.get("radii"),
                    config["router"].get("margin", MARGIN),
                )
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise InvalidInputError(f"{folder} is not a whole IV repair ({exc}): write it again") from None
        if router is not None and router.radii is None:
            logger.warning(
                "%s: its router was saved before prompts of no known task could be left alone: every prompt gets "
                "some task's IV (write the repair again, e.g. `ivtrainer continual --repair` on the same run)",
                folder,
            )
        return cls(TaskVectors(vectors, strengths), router)


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


def exact_match(
    model: nn.Module,
    tokenizer,
    rows: Sequence[Mapping[str, str]],
    *,
    repair: TaskVectors | None = None,
    tasks: Sequence[str | None] | None = None,
    batch_size: int = 32,
) -> list[bool]:
    """Per ``{"prompt", "output"}`` row, whether every answer token is the teacher-forced argmax
    (greedy decoding's answer), with ``repair`` adding the IV of ``tasks[i]`` to row ``i`` at its
    last prompt token."""
    from ivtrainer.evaluation.predictions import target_predictions

    intervene = None
    if repair is not None:
        if tasks is None or len(tasks) != len(rows):
            raise InvalidInputError("repair needs one task (or None) per row")
        chosen = list(tasks)

        def intervene(batch: list[int], mask: torch.Tensor):
            return repair.apply(model, [chosen[i] for i in batch], positions=mask)

    predictions = target_predictions(
        model, tokenizer, [r["prompt"] for r in rows], [r["output"] for r in rows], batch_size=batch_size,
        intervene=intervene,
    )  # fmt: skip
    return [pred == target for pred, target in predictions]


def choose_strengths(
    model: nn.Module,
    tokenizer,
    repair: TaskVectors,
    validation: Mapping[str, Sequence[Mapping[str, str]]],
    *,
    grid: Sequence[float] = STRENGTHS,
    batch_size: int = 32,
) -> dict[str, dict[float, float]]:
    """Set each task's strength to the one in ``grid`` with the best exact match on its
    ``validation`` rows (the task given; the smallest strength on a tie, so 0, no repair, wins
    when the IV does not help), and return each task's accuracy at every strength tried."""
    if not grid or any(g < 0 for g in grid):
        raise InvalidInputError(f"grid must hold strengths >= 0, got {list(grid)}")
    tried: dict[str, dict[float, float]] = {}
    for name, rows in validation.items():
        if name not in repair.vectors or not rows:
            raise InvalidInputError(f"no IV or no validation rows for task {name!r}")
        tried[name] = {}
        for strength in sorted(grid):
            single = TaskVectors({name: repair.vectors[name]}, {name: strength})
            hits = exact_match(
                model, tokenizer, rows, repair=single, tasks=[name] * len(rows), batch_size=batch_size
            )
            tried[name][strength] = sum(hits) / len(hits)
        repair.strengths[name] = max(sorted(grid), key=lambda s: (tried[name][s], -s))
    return tried
