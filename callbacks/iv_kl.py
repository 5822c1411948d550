"""IVKLCallback: add ``w(t) * KL(student, teacher)`` to the training loss, where the teacher is
the model as it was before this fine-tuning with the instruction vectors added (Jiang et al. 2024).

A thin wrapper over :class:`~ivtrainer.iv_guided.guidance.IVGuidance` for an unmodified
``transformers.Trainer``: a forward hook on the trained model sees the batch (labels, attention
mask, ``num_items_in_batch``) and adds the guidance's loss to ``outputs.loss``. ivtrainer's own
trainers add the same loss in ``compute_loss`` instead (``in_forward=False``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ivtrainer.callbacks.iv_intervention import (
    IVCallback,
    IVLike,
    _into_history,
    check_labels_reach_the_model,
)
from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.guidance import IVGuidance, check_supported
from ivtrainer.iv_guided.kl_loss import KLTerm
from ivtrainer.iv_guided.schedules import Schedule
from ivtrainer.modeling.hooks import hooks

__all__ = ["IVKLCallback"]


class IVKLCallback(IVCallback):
    """Adds the KL terms towards the IV-intervened original model to every training loss.

    Args:
        instruction_vectors: the IV(s) added to the teacher (objects, folders or Hub ids); may be
            left out when nothing uses them (``teacher_strength=0`` and no head term: a plain
            KL anchor to the model before training).
        weight: the KL weight, a number or a :class:`~ivtrainer.iv_guided.schedules.Schedule`.
        teacher_strength: the teacher's IV strength, a multiple of each IV's own (default 1: as calibrated).
        direction: ``"reverse"`` KL(student || teacher) (FvForgetting's), ``"forward"``
            KL(teacher || student), or ``"jsd"``.
        temperature: softmax temperature of both distributions (FvForgetting: 2).
        positions: ``"all"`` attended tokens, ``"answer"`` tokens (those the CE covers) or the
            ``"last_prompt"`` token.
        threshold: per micro-batch, drop the term while its mean per-position value is below
            this (FvForgetting: 0.1; 0 keeps gradient accumulation exact).
        terms: several KL terms (:class:`~ivtrainer.iv_guided.kl_loss.KLTerm`), all from one
            teacher pass, instead of ``weight``/``positions``/``threshold``.
        head_mse_weight: weight of an extra MSE between the student's and a teacher's outputs of
            the IVs' heads at the last prompt token, each head counted only above
            ``head_mse_threshold`` (FvForgetting: 1.0 above 0.01).
        head_mse_reference: the teacher pass those head outputs come from: ``"with_iv"`` (the KL's
            pass: no extra forward) or ``"without_iv"`` (FvForgetting's: a second pass without the
            IVs, ending at the deepest head; the KL's pass is used when no IV is added before a head).
        teacher: ``"auto"``: a PEFT model's own base (adapters disabled, no copy in memory), else a
            frozen copy made when training begins; or pass a module. ``"precomputed"``: the
            same teacher run once over the training set before the first step and stored (see
            :mod:`ivtrainer.iv_guided.precomputed_teacher`): no teacher forward per step and no
            reference copy; the training dataset must be map-style and its collator deterministic.
        teacher_top_k: with ``teacher="precomputed"``, how many of the teacher's most likely tokens
            are stored at each position other than the last prompt token (whose whole
            distribution is stored); the rest is one bucket (its total mass). ``0``: no
            truncation: the teacher's last hidden states are stored instead, and its LM head
            applied to them at each step (the exact KL at every position, for one LM-head matmul).
        teacher_cache_dir: where the precomputed teacher is stored (default
            ``<output_dir>/_ivtrainer_teacher``, which ``push_to_hub`` does not upload).
        in_forward: add the loss through a forward hook on the model (a plain ``Trainer``). False:
            the trainer adds ``self.guidance``'s loss in its ``compute_loss`` (IVGuidedTrainer);
            the callback keeps the teacher, schedules, metrics and checkpoint state.

    The teacher is fixed when the Trainer is built (``on_init_end``), so a run resumed from a
    checkpoint keeps the original model as its teacher. The teacher pass runs with the student's
    own interventions suspended. Batches must carry
    ``labels``. A batch whose ``positions`` select no token adds nothing and is counted in the
    logged ``kl_skipped``. Logged each logging step: ``ce``, ``kl`` and ``kl_weight`` (with
    several terms ``kl_<positions>`` and ``kl_weight_<positions>`` for each), ``head_mse``.
    """

    def __init__(
        self,
        instruction_vectors: IVLike | Sequence[IVLike] | None = None,
        weight: float | Schedule | dict = 1.0,
        *,
        teacher_strength: float = 1.0,
        direction: str = "reverse",
        temperature: float = 2.0,
        positions: str = "all",
        threshold: float = 0.0,
        terms: Sequence[KLTerm | dict] | None = None,
        head_mse_weight: float = 0.0,
        head_mse_threshold: float = 0.0,
        head_mse_reference: Literal["with_iv", "without_iv"] = "with_iv",
        iv_weights: Sequence[float] | None = None,
        teacher: str | nn.Module = "auto",
        teacher_top_k: int = 64,
        teacher_cache_dir: str | os.PathLike | None = None,
        in_forward: bool = True,
    ) -> None:
        super().__init__(instruction_vectors, iv_weights, required=False)
        if terms is None:
            terms = [KLTerm(positions, weight, threshold)]  # type: ignore[arg-type]  # checked there
        elif (weight, positions, threshold) != (1.0, "all", 0.0):
            raise InvalidInputError("pass either terms= or weight=/positions=/threshold=, not both")
        self.guidance = IVGuidance(
            self.vectors, terms, iv_weights=iv_weights, teacher_strength=teacher_strength, direction=direction,
            temperature=temperature, head_mse_weight=head_mse_weight, head_mse_threshold=head_mse_threshold,
            head_mse_reference=head_mse_reference, teacher=teacher, teacher_top_k=teacher_top_k,
            teacher_cache_dir=teacher_cache_dir,
        )  # fmt: skip
        self.in_forward = in_forward
        self._stack: contextlib.ExitStack | None = None

    # -- training events ---------------------------------------------------------------------------

    role = "kl"

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self.guidance.prepare(args, model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.in_forward:
            check_labels_reach_the_model(args)
        check_supported(args, model, self.guidance.teacher, self.guidance.head_mse_weight)
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self.close()
        self.guidance.begin(args, state, model, kwargs.get("train_dataloader"))
        if self.in_forward:
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(hooks(model.register_forward_hook(self._hook, with_kwargs=True)))

    def on_step_begin(self, args, state, control, **kwargs):
        self.guidance.update(state)

    def on_step_end(self, args, state, control, **kwargs):
        self.guidance.step_end()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            for key, value in self.metrics().items():
                logs.setdefault(key, value)
            _into_history(state, logs)

    def metrics(self) -> dict[str, float]:
        """Averages since the last call (per optimizer step), then reset; {} if nothing new. In a
        multi-process run every process must call it (the values are reduced over processes)."""
        return self.guidance.metrics()

    def close(self) -> None:
        """Remove the hooks (also done at the end of training). The teacher is kept for a later
        ``train()``; :meth:`release` drops it."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self.guidance.close()

    def release(self) -> None:
        """Drop the frozen reference copy (full fine-tuning) or the stored teacher to free memory."""
        self.close()
        self.guidance.release()

    @property
    def reference(self) -> nn.Module | None:
        """The frozen reference model, or None (a PEFT model's own base, or a stored teacher)."""
        return self.guidance.reference

    # what a checkpoint restores (``state()["attributes"]``), kept on the guidance
    @property
    def kl_weights(self) -> list[float]:
        return self.guidance.kl_weights

    @kl_weights.setter
    def kl_weights(self, value: list[float]) -> None:
        self.guidance.kl_weights = value

    @property
    def _model_fingerprint(self) -> str | None:
        return self.guidance.model_fingerprint

    @_model_fingerprint.setter
    def _model_fingerprint(self, value: str | None) -> None:
        self.guidance.model_fingerprint = value

    # -- the loss ----------------------------------------------------------------------------------

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if self.guidance.busy or not module.training or not torch.is_grad_enabled():
            return output
        if kwargs.get("labels") is None:
            raise InvalidInputError(
                "IV-guided KL needs labels in every training batch (to place the IV and the KL): tokenise with "
                "labels, or use a collator that adds them (DataCollatorForLanguageModeling(mlm=False), "
                "DataCollatorForSeq2Seq); label_smoothing_factor > 0 and a compute_loss_func make the Trainer "
                "remove them before the forward, so neither can be used with this callback (IVGuidedTrainer "
                "supports both)"
            )
        inputs = dict(kwargs)
        if inputs.get("input_ids") is None and args:
            inputs["input_ids"] = args[0]
        logits = getattr(output, "logits", None)
        extra = self.guidance(module, inputs, logits, output.loss, kwargs.get("num_items_in_batch"))
        output.loss = output.loss + extra
        return output

    # -- checkpoint state ----------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "args": {
                "instruction_vectors": self._saved,
                "terms": [dataclasses.asdict(t) for t in self.guidance.terms],
                "teacher_strength": self.guidance.teacher_strength,
                "direction": self.guidance.direction,
                "temperature": self.guidance.temperature,
                "head_mse_weight": self.guidance.head_mse_weight,
                "head_mse_threshold": self.guidance.head_mse_threshold,
                "head_mse_reference": self.guidance.head_mse_reference,
                "iv_weights": self.weights,
                "in_forward": self.in_forward,
                **(
                    {"teacher": self.guidance.teacher, "teacher_top_k": self.guidance.teacher_top_k}
                    if isinstance(self.guidance.teacher, str)
                    else {}
                ),
                "teacher_cache_dir": None
                if self.guidance.teacher_cache_dir is None
                else str(self.guidance.teacher_cache_dir),
            },
            "attributes": {"kl_weights": self.kl_weights, "_model_fingerprint": self._model_fingerprint},
        }
