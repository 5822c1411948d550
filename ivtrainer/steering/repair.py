"""IV repair: add the instruction vector of each prompt's task back at inference.

The IV papers' mechanism claim is that fine-tuning mostly suppresses earlier skills rather than
erasing them; if so, a task's IV added back should bring the task back. :class:`TaskVectors` holds
one IV per task (each at its own edit layer and strength) and adds, in a batch of prompts of
several tasks, each row's own IV at its last token; :class:`~ivtrainer.steering.routing.NearestTaskRouter`
finds a prompt's task when the user does not name it (:mod:`ivtrainer.steering.routing`).
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
from ivtrainer.steering.instruction_vector import InstructionVector
from ivtrainer.steering.intervention import Positions, add_to_residual
from ivtrainer.steering.routing import MARGIN, NearestTaskRouter

__all__ = ["IVRepair", "TaskVectors", "choose_strengths", "exact_match"]

logger = logging.getLogger(__name__)

REPAIR_CONFIG, ROUTER_WEIGHTS = "repair.json", "router.safetensors"

#: The strengths :func:`choose_strengths` tries, as multiples of each IV's own (0: no repair).
STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0)


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
