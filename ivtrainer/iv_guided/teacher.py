"""The teacher of IV-guided training behind one call: the model as it was before this fine-tuning
with the instruction vectors added, run at every step (:class:`LiveTeacher`) or read back from a
store computed once before training (:class:`StoredTeacher`).

Either is called as ``teacher(model, inputs, prompt_end, kl_mask)`` and returns the teacher's
logits (or, stored with top-k, a :class:`~ivtrainer.iv_guided.kl_loss.SparseTeacher`), each IV
head's teacher output at ``prompt_end``'s positions (with the head term), and the sequence
positions the logits cover (``None``: all).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, Protocol

import torch
from torch import nn

from ivtrainer.iv_guided.kl_loss import SparseTeacher
from ivtrainer.iv_guided.precomputed_teacher import TeacherStore
from ivtrainer.modeling.architectures import get_layout
from ivtrainer.modeling.hooks import eval_mode, is_peft_model, record_head_outputs, stop_before
from ivtrainer.steering.intervention import add_to_residual, suspend_interventions
from ivtrainer.utils.distributed import is_zero3_partitioned, zero3_copy

__all__ = ["LiveTeacher", "StoredTeacher", "Teacher", "TeacherOutput"]

Head = tuple[int, int]
# what the student's forward takes that the teacher's must not (its loss; set per pass)
_NOT_TEACHER_INPUTS = ("labels", "num_items_in_batch", "use_cache", "logits_to_keep", "return_dict")
#: (logits or a stored sparse distribution, {(layer, head): outputs at prompt_end} or None, the
#: sequence positions the logits cover or None for all)
TeacherOutput = tuple[torch.Tensor | SparseTeacher, dict[Head, torch.Tensor] | None, torch.Tensor | None]


class Teacher(Protocol):
    def __call__(
        self, model: nn.Module, inputs: dict[str, Any], prompt_end: torch.Tensor, kl_mask: torch.Tensor
    ) -> TeacherOutput: ...


class LiveTeacher:
    """The teacher run at every step: a PEFT model's own modules with its adapters (and the
    student's interventions) off, or a frozen reference copy made by :meth:`prepare`.

    Args:
        pairs: ``(edit_layer, scaled vector)`` of each IV, added at ``strength``.
        strength: the teacher's IV strength (a multiple of each IV's own).
        heads: the IV heads the head term compares (empty: no head term).
        head_reference: ``"with_iv"`` (the KL's pass) or ``"without_iv"`` (a second pass without
            the IVs, ending at the deepest head, when an IV is added before one).
        every_position: a KL term covers every token (no ``logits_to_keep`` saving).
        module: a given teacher module (instead of the model before training).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[int, torch.Tensor]],
        *,
        strength: float,
        heads: Sequence[Head] = (),
        head_reference: str = "with_iv",
        every_position: bool = True,
        module: nn.Module | None = None,
    ) -> None:
        self.pairs, self.strength, self.heads = list(pairs), strength, list(heads)
        self.head_reference, self.every_position, self.module = head_reference, every_position, module
        self.reference: nn.Module | None = None
        self.ready = False
        self.engine: Any = None  # the DeepSpeed engine around the reference, when there is one
        self._keeps_logits: bool | None = None

    # -- the reference model -----------------------------------------------------------------------

    def prepare(self, model: nn.Module) -> nn.Module | None:
        """Fix the teacher: the given module, or a frozen copy of ``model`` as it is now (none for a
        PEFT model, whose base with adapters off is the teacher)."""
        self.reference, self.ready = self._make_reference(model), True
        return self.reference

    def adopt(self, reference: nn.Module) -> None:
        """The reference a replaced callback made (a run resumed with its callbacks restored)."""
        self.reference, self.ready = reference, True

    def shard(self) -> None:
        """Under DeepSpeed, the reference wrapped as trl does its own: sharded under ZeRO-3, a
        replica otherwise."""
        if self.reference is None or self.engine is not None:
            return
        from accelerate.state import AcceleratorState
        from trl.models.utils import prepare_deepspeed

        self.engine = prepare_deepspeed(self.reference, SimpleNamespace(state=AcceleratorState()))
        self.reference = self.engine.module

    def release(self) -> None:
        self.reference, self.ready, self.engine = None, False, None

    def _make_reference(self, model: nn.Module) -> nn.Module | None:
        if self.module is not None:
            return self.module
        if is_peft_model(model):
            return None
        if is_zero3_partitioned(model):
            reference = zero3_copy(model, "the KL teacher; or pass teacher=, or train LoRA adapters").eval()
            reference.requires_grad_(False)
            return reference
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
        for module in reference.modules():  # the copy would carry the student's hooks (its IV) along
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
            module._forward_hooks_with_kwargs.clear()
            module._forward_pre_hooks_with_kwargs.clear()
        return reference

    # -- the pass ----------------------------------------------------------------------------------

    def __call__(
        self, model: nn.Module, inputs: dict[str, Any], prompt_end: torch.Tensor, kl_mask: torch.Tensor
    ) -> TeacherOutput:
        # the teacher sees what the student saw: a packed batch's position_ids (and the sequence
        # boundaries trl adds for varlen kernels) keep its sequences apart
        inputs = {k: v for k, v in inputs.items() if k not in _NOT_TEACHER_INPUTS and v is not None}
        columns = self._columns(model, kl_mask)
        logits, heads = self.run(model, inputs, prompt_end, columns)
        return logits, heads, columns

    def run(
        self, model: nn.Module, inputs: dict[str, Any], prompt_end: torch.Tensor, columns=None, *, logits=True
    ):
        """The teacher's logits (at ``columns``) and, with the head term, each IV head's teacher
        output at ``prompt_end``'s positions (from the pass without the IVs when that is the
        reference): what the stored teacher holds too. ``inputs``: the student's own model inputs
        (``position_ids`` of a packed batch included), without its labels. ``logits=False``: the
        pass ends before the LM head and returns None for them (what the exact store reads is the
        LM head's input, recorded by its caller's hook)."""
        out, heads = self._pass(model, inputs, prompt_end, columns, logits=logits)
        if self.heads and self.separate_head_pass():
            # causal: the heads at prompt_end see nothing after the last of them
            cut = _through_last(inputs, prompt_end)
            _, heads = self._pass(model, cut, prompt_end[:, : _width(cut, prompt_end)], None, with_iv=False)
        if heads is None:
            return out, None
        rows, cols = prompt_end.nonzero(as_tuple=True)
        return out, {(layer, head): heads[layer][rows, cols, head] for layer, head in self.heads}

    def head_layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})

    def separate_head_pass(self) -> bool:
        """Whether the head term needs its own pass: its reference is the teacher without the IVs,
        and some IV is added at or before a head's layer (the output of layer ``l`` changes the
        heads of later layers only)."""
        if not self.heads or self.head_reference == "with_iv" or self.strength == 0 or not self.pairs:
            return False
        return min(layer for layer, _ in self.pairs) < self.head_layers()[-1]

    @torch.no_grad()
    def _pass(self, module: nn.Module, inputs: dict, positions, columns, *, with_iv=True, logits=True):
        """Logits (and head outputs if needed) with the IVs at ``strength``; logits only at sequence
        positions ``columns`` when not None (the LM head's share of the pass saved), none with
        ``logits=False`` (the pass ends before the LM head).
        ``with_iv=False``: the heads' outputs only, without the IVs, from a pass that ends there."""
        teacher = self.reference if self.reference is not None else module
        heads_here = bool(self.heads) and (not with_iv or not self.separate_head_pass())
        with contextlib.ExitStack() as stack:
            if self.reference is None:  # the same modules: adapters and student IVs off
                if is_peft_model(module):
                    stack.enter_context(module.disable_adapter())  # type: ignore[operator]  # a PeftModel
                stack.enter_context(suspend_interventions(module))
            stack.enter_context(eval_mode(teacher))
            if with_iv and self.pairs:
                stack.enter_context(
                    add_to_residual(teacher, self.pairs, strength=self.strength, positions=positions)
                )
            heads = (
                stack.enter_context(record_head_outputs(teacher, self.head_layers())) if heads_here else None
            )
            if not with_iv:
                stack.enter_context(stop_before(get_layout(teacher).attn_outputs[self.head_layers()[-1]]))
            elif not logits:
                stack.enter_context(stop_before(teacher.get_output_embeddings()))  # type: ignore[operator]
            kwargs = {"logits_to_keep": columns} if columns is not None else {}
            out = teacher(**inputs, use_cache=False, **kwargs)
        return out.logits if with_iv and logits else None, (dict(heads) if heads is not None else None)

    def _columns(self, module: nn.Module, mask: torch.Tensor) -> torch.Tensor | None:
        """The sequence positions the KL needs logits at, if fewer than all and the model takes
        ``logits_to_keep`` (transformers' causal LMs do)."""
        if self.every_position:
            return None
        if self._keeps_logits is None:
            teacher = self.reference if self.reference is not None else module
            base = teacher.get_base_model() if is_peft_model(teacher) else teacher  # type: ignore[operator]
            self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        if not self._keeps_logits:
            return None
        columns = mask.any(0).nonzero().squeeze(1)
        return columns if 0 < columns.numel() < mask.shape[1] else None


def _width(inputs: dict[str, Any], prompt_end: torch.Tensor) -> int:
    return int(inputs["input_ids"].shape[1]) if "input_ids" in inputs else int(prompt_end.shape[1])


def _through_last(inputs: dict[str, Any], prompt_end: torch.Tensor) -> dict[str, Any]:
    """The batch cut after the last ``prompt_end`` position of any row: what a causal model's
    outputs there depend on. Left whole when it has inputs that cannot be cut by columns (the
    sequence boundaries of a padding-free batch, a 4D mask)."""
    seq = prompt_end.shape[1]
    if not prompt_end.any() or any(k.startswith("cu_seq_lens") or k.startswith("max_length") for k in inputs):
        return inputs
    cut = int(prompt_end.any(0).nonzero().max()) + 1
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    if cut == seq or any(v.dim() != 2 or v.shape[1] != seq for v in tensors):
        return inputs
    return {k: v[:, :cut] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


class StoredTeacher:
    """The teacher read back from a :class:`~ivtrainer.iv_guided.precomputed_teacher.TeacherStore`
    (rows matched by content); ``heads`` in the order the store holds them."""

    def __init__(self, store: TeacherStore, heads: Sequence[Head] = ()) -> None:
        self.store, self.heads = store, list(heads)

    def __call__(
        self, model: nn.Module, inputs: dict[str, Any], prompt_end: torch.Tensor, kl_mask: torch.Tensor
    ) -> TeacherOutput:
        logits, stored = self.store.batch(inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"])
        if stored is None:
            return logits, None, None
        rows = prompt_end.nonzero(as_tuple=True)[0]
        return logits, {h: stored[rows, i] for i, h in enumerate(self.heads)}, None
