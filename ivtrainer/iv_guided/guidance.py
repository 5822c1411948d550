"""The extra loss of IV-guided training (Jiang et al. 2024) and the teacher it needs: KL terms
towards the model as it was before this fine-tuning, with the instruction vectors added, and the
optional head term.

:class:`IVGuidance` is the one object both training routes use: ``IVGuidedTrainer.compute_loss``
calls it after the student's forward (as trl's trainers compute their extra losses), and
:class:`~ivtrainer.callbacks.IVKLCallback` calls it from a forward hook for users of an unmodified
``Trainer``. The maths is in :mod:`ivtrainer.iv_guided.kl_loss`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from transformers.utils import logging

from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.kl_loss import KL_DIRECTIONS, KLTerm, kl_positions, kl_terms
from ivtrainer.iv_guided.precomputed_teacher import (
    CACHE_FOLDER,
    TeacherStore,
    check_cache_dir,
    model_fingerprint,
    precompute_teacher,
    vectors_fingerprint,
)
from ivtrainer.iv_guided.teacher import LiveTeacher, StoredTeacher, Teacher
from ivtrainer.modeling.hooks import is_peft_model, record_head_outputs, record_input
from ivtrainer.steering.instruction_vector import InstructionVector
from ivtrainer.steering.intervention import (
    last_prompt_positions,
    residual_pairs,
)
from ivtrainer.utils.checks import finite_number
from ivtrainer.utils.distributed import deepspeed_enabled

__all__ = ["IVGuidance", "check_supported"]

logger = logging.get_logger(__name__)

# model -> {output_dir: the frozen teacher made when its Trainer was built}, all weak (the copy
# lives as long as the guidance that made it): what a callback restored from a checkpoint
# (restore_callback_states_from_checkpoint) takes over
_TEACHERS: weakref.WeakKeyDictionary[nn.Module, dict[str, weakref.ref[nn.Module]]] = (
    weakref.WeakKeyDictionary()
)

NO_HEAD_GRADIENT = (
    "the head term (head_mse_weight > 0) gets no gradient under reentrant gradient checkpointing: the "
    "checkpointed layers' first forward runs without autograd, and the head outputs are recorded there. Set "
    "gradient_checkpointing_kwargs={'use_reentrant': False} (transformers' and trl's default; trl forces True "
    "for PEFT under DeepSpeed ZeRO-3), turn gradient checkpointing off, or set head_mse_weight=0"
)


class IVGuidance:
    """The KL terms (and head term) of IV-guided training, with their teacher.

    Args:
        vectors: the IVs added to the teacher (empty: a plain KL anchor to the model before training).
        terms: the KL terms, all from one teacher pass.
        iv_weights: one multiple of each IV's own strength.

    The other arguments (``teacher_strength``, ``direction``, ``temperature``, the ``head_mse_*``
    settings, ``teacher``, ``teacher_top_k``, ``teacher_cache_dir``) are as
    :class:`~ivtrainer.callbacks.IVKLCallback` documents them.

    Its lifecycle follows the Trainer's: :meth:`prepare` when the Trainer is built (the teacher is
    the model *before* fine-tuning, copied before a resumed run loads its checkpoint), :meth:`begin`
    when training begins (the stored teacher computed or reused, the student's head outputs
    recorded), :meth:`update` at every optimizer step (the terms' scheduled weights), the call
    itself once per training micro-batch, :meth:`close` after training.
    """

    def __init__(
        self,
        vectors: Sequence[InstructionVector] = (),
        terms: Sequence[KLTerm | Mapping[str, Any]] = (KLTerm(),),
        *,
        iv_weights: Sequence[float] | None = None,
        teacher_strength: float = 1.0,
        direction: str = "reverse",
        temperature: float = 2.0,
        head_mse_weight: float = 0.0,
        head_mse_threshold: float = 0.0,
        head_mse_reference: Literal["with_iv", "without_iv"] = "with_iv",
        teacher: str | nn.Module = "auto",
        teacher_top_k: int = 64,
        teacher_cache_dir: str | os.PathLike | None = None,
    ) -> None:
        for name, value in (
            ("teacher_strength", teacher_strength),
            ("head_mse_weight", head_mse_weight),
            ("head_mse_threshold", head_mse_threshold),
        ):
            finite_number(name, value)
        if min(teacher_strength, head_mse_weight, head_mse_threshold) < 0:
            raise InvalidInputError("teacher_strength, head_mse_weight and head_mse_threshold must be >= 0")
        if not vectors and (teacher_strength != 0 or head_mse_weight != 0):
            raise InvalidInputError(
                "no instruction vector given: pass instruction_vectors= (InstructionVector objects or folders "
                "written by `ivtrainer extract-iv`), or set teacher_strength=0 and head_mse_weight=0 for a plain "
                "KL anchor to the model before training"
            )
        self.vectors = list(vectors)
        self.pairs = residual_pairs(self.vectors, iv_weights)
        self.terms = [t if isinstance(t, KLTerm) else KLTerm(**t) for t in terms]
        if not self.terms or len({t.positions for t in self.terms}) != len(self.terms):
            raise InvalidInputError(
                f"terms must be one or more KL terms at different positions, got {[t.positions for t in self.terms]}"
            )
        if not math.isfinite(temperature) or temperature <= 0:
            raise InvalidInputError(f"temperature must be > 0, got {temperature!r}")
        if direction not in KL_DIRECTIONS:
            raise InvalidInputError(f"direction must be one of {KL_DIRECTIONS}, not {direction!r}")
        if head_mse_reference not in ("with_iv", "without_iv"):
            raise InvalidInputError(
                f"head_mse_reference must be 'with_iv' or 'without_iv', not {head_mse_reference!r}"
            )
        self.teacher_strength, self.direction, self.temperature = teacher_strength, direction, temperature
        self.head_mse_weight, self.head_mse_threshold = head_mse_weight, head_mse_threshold
        self.head_mse_reference = head_mse_reference
        if not isinstance(teacher, nn.Module) and teacher not in ("auto", "precomputed"):
            raise InvalidInputError(f"teacher must be 'auto', 'precomputed' or a module, not {teacher!r}")
        if isinstance(teacher_top_k, bool) or not isinstance(teacher_top_k, int) or teacher_top_k < 0:
            raise InvalidInputError(
                f"teacher_top_k must be a whole number >= 0 (0: exact, from stored hidden states), got {teacher_top_k!r}"
            )
        self.teacher, self.teacher_top_k, self.teacher_cache_dir = teacher, teacher_top_k, teacher_cache_dir
        self.live = LiveTeacher(
            self.pairs, strength=teacher_strength, heads=self.heads(), head_reference=head_mse_reference,
            every_position=any(t.positions == "all" for t in self.terms),
            module=teacher if isinstance(teacher, nn.Module) else None,
        )  # fmt: skip
        self.stored: StoredTeacher | None = None  # with teacher="precomputed", once computed or reused
        self.model_fingerprint: str | None = None  # the model before training, for the stored teacher
        self.kl_weights = [t.weight(0, 1) for t in self.terms]
        self.busy = False  # True during the teacher's own pass (a forward hook must not add a loss there)
        self._stack: contextlib.ExitStack | None = None
        self._student_heads: dict[int, torch.Tensor] | None = None
        # the input of the student's LM head, when it is frozen: the KL's gradient goes there
        self._student_hidden: dict[str, torch.Tensor] | None = None
        self._head: tuple[nn.Module, torch.Tensor] | None = None  # the frozen LM head and its weight
        self._head_checked: bool | None = None  # its output is the logits (checked on the first batch)
        self._sums: dict[str, float | torch.Tensor] = dict.fromkeys(["ce", *self.kl_keys(), "head_mse"], 0.0)
        self._steps, self._skipped, self._accumulation = 0, 0, 1
        self._device, self._global_items, self._tokens_across = torch.device("cpu"), False, False

    # -- lifecycle ---------------------------------------------------------------------------------

    def prepare(self, args, model: nn.Module | None) -> None:
        """When the Trainer is built: refuse what cannot work; fix the teacher (the model *before*
        fine-tuning: copied now, before a resumed run loads its checkpoint into the model)."""
        check_supported(args, model, self.teacher, self.head_mse_weight)
        if self.teacher == "precomputed":
            if self.teacher_cache_dir is not None:
                check_cache_dir(self.teacher_cache_dir, args.output_dir)
            if model is not None and self.model_fingerprint is None:
                self.model_fingerprint = model_fingerprint(model)
            return
        if model is not None and not self.live.ready:
            reference = self.live.prepare(model)
            if reference is not None and not isinstance(self.teacher, nn.Module):
                _TEACHERS.setdefault(model, {})[str(args.output_dir)] = weakref.ref(reference)

    def begin(self, args, state, model: nn.Module, dataloader=None) -> None:
        """When training begins: the teacher ready (a stored one computed or reused), the student's
        IV-head outputs recorded in its forwards."""
        check_supported(args, model, self.teacher, self.head_mse_weight)
        self.close()
        self._accumulation = args.gradient_accumulation_steps
        self._tokens_across = getattr(args, "average_tokens_across_devices", False)
        if not self.live.ready and state.global_step > 0 and model in _TEACHERS:
            # restore_callback_states_from_checkpoint: the Trainer replaced the callback built with
            # it by one made from the checkpoint's state; take the teacher the first one made
            made = _TEACHERS[model].get(str(args.output_dir))
            reference = made() if made is not None else None
            if reference is not None:
                self.live.adopt(reference)
        if self.teacher == "precomputed":
            self._prepare_store(args, state, model, dataloader)
        elif not self.live.ready:
            if state.global_step > 0 and not is_peft_model(model) and not isinstance(self.teacher, nn.Module):
                raise InvalidInputError(
                    "IVKLCallback was added after the Trainer was built, and training resumes from a checkpoint: "
                    "the teacher would be the resumed model, not the model before fine-tuning. Pass the callback "
                    "in Trainer(callbacks=[...]) or give it teacher=<the original model>"
                )
            self.live.prepare(model)
        if deepspeed_enabled():  # as trl does for its reference model
            self.live.shard()
        self._stack = contextlib.ExitStack()
        if self.head_mse_weight > 0:
            self._student_heads = self._stack.enter_context(
                record_head_outputs(model, self.live.head_layers())
            )
        self._head, self._head_checked = _frozen_head(model), None
        if self._head is not None:
            self._student_hidden = self._stack.enter_context(record_input(self._head[0]))
        self.update(state)

    def update(self, state) -> None:
        """At every optimizer step: the terms' weights from their schedules."""
        self.kl_weights = [t.weight(state.global_step, state.max_steps) for t in self.terms]

    def step_end(self) -> None:
        self._steps += 1

    def close(self) -> None:
        """Stop recording the student's head outputs. The teacher is kept for a later ``train()``;
        :meth:`release` drops it."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self._student_heads = self._student_hidden = self._head = None

    def release(self) -> None:
        """Drop the frozen reference copy (full fine-tuning) or the stored teacher to free memory."""
        self.close()
        self.live.release()
        self.stored = None

    @property
    def reference(self) -> nn.Module | None:
        """The frozen reference model (full fine-tuning; under DeepSpeed the module its engine
        wraps, ZeRO-3-partitioned with ZeRO-3), or None when the teacher is the trained PEFT model
        itself with its adapters disabled, or stored."""
        return self.live.reference

    @property
    def store(self) -> TeacherStore | None:
        """The stored teacher (``teacher="precomputed"``), once computed or reused."""
        return self.stored.store if self.stored is not None else None

    # -- metrics -----------------------------------------------------------------------------------

    def kl_keys(self) -> list[str]:
        """``kl`` for one term; ``kl_<positions>`` for each of several."""
        return ["kl"] if len(self.terms) == 1 else [f"kl_{t.positions}" for t in self.terms]

    def metrics(self) -> dict[str, float]:
        """Averages since the last call (per optimizer step), then reset; {} if nothing new. In a
        multi-process run every process must call it (the values are reduced over processes)."""
        if self._steps == 0:
            return {}
        keys = ["ce", *self.kl_keys()] + (["head_mse"] if self.head_mse_weight > 0 else [])
        values = torch.stack([torch.as_tensor(self._sums[k], dtype=torch.float32) for k in keys])
        values = torch.cat(
            [values.to(self._device), torch.tensor([float(self._skipped)], device=self._device)]
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # each process holds its share of a loss normalised by the global token count (sum the
            # shares), or a mean over its own tokens (average the means); skipped batches add up
            torch.distributed.all_reduce(values)
            if not self._global_items:
                values[:-1] /= torch.distributed.get_world_size()
        summed = values.tolist()
        out = {k: v / self._steps for k, v in zip(keys, summed, strict=False)}
        for key, value in zip(self.kl_keys(), self.kl_weights, strict=True):
            out[key.replace("kl", "kl_weight", 1)] = value
        if summed[-1]:
            out["kl_skipped"] = int(summed[-1])
        self._sums = dict.fromkeys(self._sums, 0.0)
        self._steps = self._skipped = 0
        return out

    # -- the loss ----------------------------------------------------------------------------------

    def __call__(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        logits: torch.Tensor | None,
        ce: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The extra loss of one training micro-batch: the weighted KL terms plus the head term.

        Args:
            model: the model being trained (a PEFT model is its own teacher, adapters off).
            inputs: the batch the student's forward took, ``labels`` included.
            logits: the student's logits on it.
            ce: the student's own loss on it (logged as ``ce``).
            num_items_in_batch: the token count the CE is normalised by (None: a per-batch mean);
                the KL and head terms are normalised the same way.
        """
        labels = inputs.get("labels")
        if labels is None:
            raise InvalidInputError(
                "IV-guided KL needs labels in every training batch (to place the IV and the KL): tokenise with "
                "labels, or use a collator that adds them (DataCollatorForLanguageModeling(mlm=False), "
                "DataCollatorForSeq2Seq)"
            )
        if logits is None:
            raise InvalidInputError(
                "the trainer asked the model for a loss without logits (trl's SFTTrainer uses a fused LM head), "
                "so IVKLCallback cannot add its KL term there: use it with transformers.Trainer or IVGuidedTrainer "
                "(IVInterventionCallback alone works with SFTTrainer)"
            )
        attention_mask = inputs.get("attention_mask")
        position_ids = inputs.get("position_ids")
        prompt_end = last_prompt_positions(labels, position_ids)
        masks = [kl_positions(t.positions, labels, attention_mask, position_ids) for t in self.terms]
        # the student's head outputs, taken before the teacher pass: a PEFT teacher runs through the
        # same modules, and the student's recording hooks would overwrite them with the teacher's
        student_heads = dict(self._student_heads) if self._student_heads is not None else None
        hidden = self._student_hidden.pop("input", None) if self._student_hidden is not None else None
        head = self._hidden_route(hidden, logits)
        if (
            student_heads
            and logits.requires_grad
            and not all(h.requires_grad for h in student_heads.values())
        ):
            raise InvalidInputError(NO_HEAD_GRADIENT)
        teacher: Teacher = self.stored if self.stored is not None else self.live
        self.busy = True
        try:
            teacher_logits, teacher_heads, columns = teacher(
                model, dict(inputs), prompt_end, torch.stack(masks).any(0)
            )
        finally:
            self.busy = False
        scale = (
            1.0 if num_items_in_batch is not None else 1.0 / self._accumulation
        )  # per optimizer step, for logs
        self._device = ce.device
        self._global_items = num_items_in_batch is not None and self._tokens_across
        self._sums["ce"] += ce.detach() * scale  # a tensor: no device sync per step
        # every term from one pass over the positions: the gradient may reuse the teacher's buffer
        extra, values = kl_terms(
            logits, teacher_logits, masks, self.kl_weights,
            direction=self.direction,  # type: ignore[arg-type]  # checked in __init__
            temperature=self.temperature, num_items_in_batch=num_items_in_batch,
            thresholds=[t.threshold for t in self.terms], overwrite_teacher=True, teacher_columns=columns,
            student_hidden=hidden if head is not None else None, head_weight=head,
        )  # fmt: skip
        for key, value in zip(self.kl_keys(), values, strict=True):
            if value is None:
                self._skipped += 1
            else:
                self._sums[key] += value * scale
        del teacher_logits  # only the KL's gradient is kept for backward
        if self.head_mse_weight > 0 and bool(prompt_end.any()):
            mse = self._head_mse(student_heads, teacher_heads, prompt_end, num_items_in_batch)
            extra = extra + self.head_mse_weight * mse
            self._sums["head_mse"] += mse.detach() * scale
        return extra

    def _hidden_route(self, hidden: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
        """The frozen LM head weight when the KL's gradient can go to the student's hidden states
        (``hidden``, its LM head's input in this forward, made these ``logits`` and nothing after
        the head changed them: checked on a few positions of the first batch), else None."""
        if self._head is None or hidden is None or not hidden.requires_grad or not logits.requires_grad:
            return None
        head, weight = self._head
        if hidden.shape[:2] != logits.shape[:2] or hidden.shape[-1] != weight.shape[1]:
            return None
        if self._head_checked is None:
            again = head(hidden[:1, :4].detach()).float()  # no graph: a detached input, a frozen head
            given = logits[:1, :4].detach().float()
            off = float((again - given).abs().max()) / max(float(given.abs().max()), 1e-6)
            self._head_checked = off <= max(1e-5, 2 * torch.finfo(logits.dtype).eps)
            if not self._head_checked:
                logger.info("the model changes its LM head's output: the KL's gradient goes to the logits")
        return weight if self._head_checked else None

    def _head_mse(self, student_heads, teacher_heads, prompt_end: torch.Tensor, num_items) -> torch.Tensor:
        """Per head, the squared error at each row's last prompt token averaged over the head's
        dimensions, summed over rows and normalised like the CE; a head whose mean over the rows is
        not above ``head_mse_threshold`` adds nothing to this micro-batch. ``teacher_heads``: each
        head's teacher output at ``prompt_end``'s positions, in row order."""
        rows, cols = prompt_end.nonzero(as_tuple=True)
        total: Any = student_heads[next(iter(student_heads))].new_zeros((), dtype=torch.float32)
        for iv in self.vectors:
            for layer, head in iv.heads:
                s = student_heads[layer][rows, cols, head].float()
                t = teacher_heads[(layer, head)].float()
                per_row = ((s - t) ** 2).mean(-1)
                if float(per_row.detach().mean()) > self.head_mse_threshold:
                    total = total + per_row.sum()
        return total / (num_items if num_items is not None else rows.numel())

    # -- the teacher -------------------------------------------------------------------------------

    def heads(self) -> list[tuple[int, int]]:
        """The IV heads the head term compares, in order (a head in two IVs counted twice)."""
        return (
            [(layer, head) for iv in self.vectors for layer, head in iv.heads]
            if self.head_mse_weight > 0
            else []
        )

    def _prepare_store(self, args, state, model: nn.Module, dataloader) -> None:
        """The stored teacher for this run: reused when its fingerprint matches, else computed now
        (before the first step, from the model as it is: the model before training)."""
        if self.stored is not None:
            return
        if dataloader is None:
            raise InvalidInputError(
                "teacher='precomputed' needs the Trainer's training dataloader (a train_dataset)"
            )
        if self.model_fingerprint is None:
            if state.global_step > 0 and not is_peft_model(model):
                raise InvalidInputError(
                    "IVKLCallback(teacher='precomputed') was added after the Trainer was built, and training resumes "
                    "from a checkpoint: the model is no longer the model before fine-tuning, so its teacher cannot be "
                    "computed from it. Pass the callback in Trainer(callbacks=[...])"
                )
            self.model_fingerprint = model_fingerprint(model)
        settings = {
            "teacher_strength": self.teacher_strength, "head_mse_reference": self.head_mse_reference,
            "separate_head_pass": self.live.separate_head_pass(),
        }  # fmt: skip
        fingerprint = {
            "model": self.model_fingerprint,
            "instruction_vectors": vectors_fingerprint(self.pairs, self.heads()),
            "teacher": json.dumps(settings, sort_keys=True),
        }
        cache = self.teacher_cache_dir or os.path.join(args.output_dir, CACHE_FOLDER)
        if self.teacher_cache_dir is not None:  # the callback may have been added after the Trainer was built
            check_cache_dir(self.teacher_cache_dir, args.output_dir)

        def teacher(input_ids, attention_mask, prompt_end, logits=True):
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            return self.live.run(model, inputs, prompt_end, logits=logits)

        store = precompute_teacher(
            cache, dataloader.dataset, dataloader.collate_fn, teacher, fingerprint=fingerprint,
            positions=[t.positions for t in self.terms], top_k=self.teacher_top_k, temperature=self.temperature,
            heads=self.heads(), lm_head=model.get_output_embeddings() if self.teacher_top_k == 0 else None,  # type: ignore[operator]
            batch_size=args.per_device_eval_batch_size,
            device=next(model.parameters()).device, progress=not args.disable_tqdm,
            # a resumed full fine-tuning: the model is trained, only the stored teacher can serve
            compute=state.global_step == 0 or is_peft_model(model), prune=self.teacher_cache_dir is None,
        )  # fmt: skip
        self.stored = StoredTeacher(store, self.heads())
        if self.teacher_top_k == 0 and store.share_head(model.get_output_embeddings()):  # type: ignore[operator]
            logger.info("the stored teacher applies the model's own frozen LM head (no copy in memory)")


def _frozen_head(model: nn.Module) -> tuple[nn.Module, torch.Tensor] | None:
    """The LM head and its weight when nothing in it trains and it is whole on this process (not
    ZeRO-3 or FSDP shards): LoRA's usual case."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if any(p.requires_grad or hasattr(p, "ds_id") or hasattr(p, "full_tensor") for p in head.parameters()):
        return None
    return head, weight.detach()


def _fsdp_enabled(args) -> bool:
    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in (
        "1",
        "true",
    )


def _reentrant_checkpointing(args) -> bool:
    """Whether the Trainer will checkpoint the layers with ``use_reentrant=True``."""
    on = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None)
    options = getattr(args, "activation_checkpointing_kwargs", None) or getattr(
        args, "gradient_checkpointing_kwargs", None
    )
    return bool(on) and isinstance(options, dict) and options.get("use_reentrant") is True


def check_supported(args, model: nn.Module | None, teacher, head_mse_weight: float = 0.0) -> None:
    """What the KL term cannot work with, refused when the Trainer is built."""
    if head_mse_weight > 0 and _reentrant_checkpointing(args):
        raise InvalidInputError(NO_HEAD_GRADIENT)
    if _fsdp_enabled(args) and teacher != "precomputed":
        raise InvalidInputError(
            "IVKLCallback's live teacher does not support FSDP (for full fine-tuning it would be an unsharded copy "
            "of the model, and its per-step pass is untested on FSDP modules): use teacher='precomputed' "
            "(IVGuidedConfig(teacher='precomputed')), which needs no teacher at train time, or DeepSpeed ZeRO-3 "
            "(ds_configs/zero3.json, a sharded teacher)"
        )
    if isinstance(teacher, nn.Module) and model is not None:
        shared = {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}
        if teacher is model or shared:
            raise InvalidInputError(
                "teacher= is the model being trained (or shares its weights), so the KL would pull the model "
                "towards itself as it changes: leave teacher='auto' (a frozen copy; for PEFT models the base with "
                "adapters off) or pass a separate frozen copy of the original model"
            )
