"""IVInterventionCallback: add instruction vectors to the model being trained, with a strength
annealed by a schedule (progressive IV intervention, Jiang et al. 2024)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.schedules import Schedule
from ivtrainer.steering.instruction_vector import InstructionVector, load_vectors
from ivtrainer.steering.intervention import Positions, add_to_residual, residual_pairs

__all__ = [
    "IVCallback",
    "IVInterventionCallback",
    "check_labels_reach_the_model",
    "load_vectors",
    "residual_pairs",
    "save_vectors",
]

IVLike = InstructionVector | str | os.PathLike


class IVCallback(TrainerCallback, ExportableState):
    """What both IV callbacks share: their vectors, saved under ``<output_dir>/instruction_vectors/
    <role>/<i>`` when training begins (the copy a callback restored from a checkpoint reloads) and
    into every checkpoint.

    The protocol between the callbacks and the trainers:

    - a callback changes the model only through hooks it installs in ``on_train_begin`` and
      removes in ``on_train_end`` or :meth:`close` (the trainers call ``close()`` after
      ``train()`` whatever happens); it changes ``control`` and nothing else of the trainer's;
    - :meth:`metrics` returns what the callback measured since its last call and starts over, so
      it is called once per training log: by ivtrainer's trainers in ``Trainer.log`` (so that
      ``report_to`` sees the values), and otherwise by the callback's own ``on_log``, which then
      finds nothing left when a trainer already took the values;
    - what must survive a resume is in :meth:`state` (transformers' ``ExportableState``).
    """

    def metrics(self) -> dict[str, float]:
        """Values since the last call (see the protocol above)."""
        return {}

    def close(self) -> None:
        """Remove the callback's hooks (see the protocol above)."""

    role = "iv"

    def __init__(
        self, instruction_vectors, weights: Sequence[float] | None = None, *, required: bool = True
    ) -> None:
        # required=False: no vector is fine (a KL anchor without IV)
        none = instruction_vectors is None or (
            isinstance(instruction_vectors, (list, tuple)) and not instruction_vectors
        )
        self.vectors = [] if none and not required else load_vectors(instruction_vectors)
        self.weights = list(weights) if weights is not None else None
        self.pairs = residual_pairs(self.vectors, self.weights)
        self._saved: list[str] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for iv in self.vectors:
            iv.check_compatible(model)
        folder = Path(args.output_dir) / "instruction_vectors" / self.role
        if state.is_world_process_zero:
            save_vectors(self.vectors, folder)
        self._saved = [str(folder / str(i)) for i in range(len(self.vectors))]

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            save_vectors(self.vectors, folder / "instruction_vectors" / self.role)


class IVInterventionCallback(IVCallback):
    """Adds ``strength(t) * sum_i w_i * IV_i`` at each IV's edit layer while training.

    ``strength(t)`` follows ``schedule`` (default: linear from 1 to 0 over the first half of
    training) in training forwards only (evaluation and prediction see the model without it),
    set at the start of every optimizer step from ``state.global_step`` and ``state.max_steps``
    alone, so a resumed run continues exactly. ``positions`` defaults to the last prompt token of
    each training row (the token before its first label; of each sequence in a packed row).

    Works on an unmodified ``transformers.Trainer`` or ``trl.SFTTrainer``::

        trainer = Trainer(model, args, ..., callbacks=[IVInterventionCallback(iv)])

    The vectors are saved with every checkpoint (``<checkpoint>/instruction_vectors/<i>``) and the
    schedule in its ``trainer_state.json``.
    """

    def __init__(
        self,
        instruction_vectors: IVLike | Sequence[IVLike] | None = None,
        schedule: Schedule | dict | None = None,
        *,
        positions: Positions = "last_prompt",
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(instruction_vectors, weights)
        if isinstance(schedule, dict):
            schedule = Schedule(**schedule)
        self.schedule = schedule if schedule is not None else Schedule("linear", 1.0, 0.0, 0.5)
        self.positions = positions
        self.strength = self.schedule(0, 1)
        self.handle = None
        self._stack: contextlib.ExitStack | None = None

    # -- training events ---------------------------------------------------------------------------

    role = "intervention"

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self.close()
        self._stack = contextlib.ExitStack()
        self.handle = self._stack.enter_context(
            # training forwards only: Trainer.evaluate, predict and LMEvalCallback measure the model
            add_to_residual(
                model, self.pairs, strength=self.strength, positions=self.positions, training_only=True
            )
        )
        self._update(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and "iv_strength" not in logs:
            logs["iv_strength"] = self.strength
            _into_history(state, logs)

    def metrics(self) -> dict[str, float]:
        return {"iv_strength": self.strength}

    def close(self) -> None:
        """Remove the hooks (also done at the end of training)."""
        if self._stack is not None:
            self._stack.close()
            self._stack, self.handle = None, None

    def _update(self, state) -> None:
        self.strength = self.schedule(state.global_step, state.max_steps)
        if self.handle is not None:
            self.handle.strength = self.strength

    # -- checkpoint state ----------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "args": {
                "instruction_vectors": self._saved,
                "schedule": dataclasses.asdict(self.schedule),
                "positions": self.positions if isinstance(self.positions, str) else "last_prompt",
                "weights": self.weights,
            },
            "attributes": {"strength": self.strength},
        }


def check_labels_reach_the_model(args, compute_loss_func=None) -> None:
    """Refuse settings under which the Trainer takes ``labels`` out of the batch before the
    forward: the last prompt token (where the IV goes) and the KL's mask are found from them."""
    if getattr(args, "label_smoothing_factor", 0) > 0 or compute_loss_func is not None:
        what = "label_smoothing_factor > 0" if compute_loss_func is None else "compute_loss_func"
        raise InvalidInputError(
            f"{what} makes the Trainer remove the labels before the forward, so IV-guided training cannot find "
            "the last prompt token (for the IV) or the answer tokens (for the KL): use the model's own loss "
            "(label_smoothing_factor=0, no compute_loss_func)"
        )


def save_vectors(vectors: Sequence[InstructionVector], folder: Path) -> None:
    """``<folder>/<i>``, each an ``InstructionVector.save_pretrained`` folder."""
    for i, iv in enumerate(vectors):
        iv.save_pretrained(Path(folder) / str(i))


def _into_history(state, logs: dict) -> None:
    """Callbacks see ``logs`` after the Trainer copied it into ``log_history``: add ours there too."""
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update({k: v for k, v in logs.items() if k not in state.log_history[-1]})
