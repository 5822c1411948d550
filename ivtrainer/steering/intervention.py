"""Adding vectors to a decoder layer's output hidden state, at chosen token positions.

Used for steering with an instruction vector and, during IV-guided training, for the annealed
intervention on the student and the fixed one on the teacher. ``strength`` and ``positions`` are
read at every forward, so a training loop can change them between steps.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers.utils import logging

from ivtrainer.errors import InvalidInputError
from ivtrainer.modeling.architectures import get_layout, unwrap_model
from ivtrainer.modeling.hooks import hooks
from ivtrainer.utils.checks import finite_numbers

logger = logging.get_logger(__name__)

__all__ = [
    "Intervention",
    "Positions",
    "add_to_residual",
    "last_prompt_positions",
    "residual_pairs",
    "suspend_interventions",
]

#: ``"last"``: the last non-pad token of each row; ``"all"``: every non-pad token;
#: ``"last_prompt"``: the token before each row's first label (the last prompt token of a training
#: batch; ``"last"`` when the forward has no labels, as in generation); or a bool tensor
#: ``(batch, seq)`` that matches the forward's input.
Positions = str | torch.Tensor

# bare model -> its active interventions, so that a teacher pass through the same modules can
# switch the student's off (suspend_interventions)
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list[Intervention]] = weakref.WeakKeyDictionary()


def last_prompt_positions(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch, seq)`` bool mask of the position before each run of labels != -100 (whose logits
    predict the answer's first token): one per prompt/completion row, one per assistant turn of a
    chat labelled on its assistant turns. Rows without labels, or whose first token is a label,
    select nothing there.

    With ``position_ids`` (a packed, padding-free batch: trl's ``packing=True``), each sequence
    packed into a row starts where its position id is 0, and a sequence that starts with a label
    has no prompt."""
    has = labels != -100
    seq = labels.shape[-1]
    index = torch.arange(seq, device=labels.device).expand_as(labels)
    if position_ids is None or position_ids.shape[-1] != seq:
        start = torch.zeros_like(index)
    else:  # the index where each token's packed sequence starts
        starts = position_ids.to(labels.device).expand_as(labels) == 0
        start = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values
    after_label = torch.zeros_like(has)
    after_label[:, 1:] = has[:, :-1]
    first = has & ~after_label & (index > start)  # a run's first label, with a prompt before it
    mask = torch.zeros_like(has)
    mask[:, :-1] = first[:, 1:]
    return mask


class Intervention:
    """Handle of an active intervention; change ``strength`` or ``positions`` between forwards."""

    def __init__(
        self, strength: float | torch.Tensor, positions: Positions, training_only: bool = False
    ) -> None:
        self.strength = strength
        self.positions = positions
        self.training_only = training_only
        self.suspended = False
        self._where: tuple[torch.Tensor, ...] | None = None
        self._warned_fallback = False

    def _locate(
        self,
        input_shape: tuple[int, int],
        attention_mask: torch.Tensor | None,
        past: int,
        device,
        labels: torch.Tensor | None = None,
        training: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> None:
        """Set the (rows, cols) to edit in this forward from the model's own inputs."""
        batch, seq = input_shape
        positions = self.positions
        if isinstance(self.strength, torch.Tensor) and tuple(self.strength.shape) != (batch,):
            raise InvalidInputError(
                f"per-row strengths have shape {tuple(self.strength.shape)} but the batch has {batch} rows: "
                "give one strength per row (0 leaves a row alone)"
            )
        if self.training_only and not training:  # evaluation, prediction, lm-eval: the model as it is
            self._where = None
            return
        if positions == "last_prompt":
            if labels is not None and labels.shape == (batch, seq):
                positions = last_prompt_positions(labels, position_ids)
            else:
                if training and not self._warned_fallback and torch.is_grad_enabled():
                    self._warned_fallback = True  # once per intervention
                    logger.warning(
                        "IV positions 'last_prompt' need the batch's labels, but this training forward has none "
                        "(label_smoothing_factor > 0 or a compute_loss_func make the Trainer remove them): the IV "
                        "is added at the last token instead, which is the end of the answer"
                    )
                positions = "last"
        if isinstance(positions, torch.Tensor):
            if positions.shape != (batch, seq):
                raise InvalidInputError(
                    f"positions mask has shape {tuple(positions.shape)} but the input is {(batch, seq)}; "
                    "pass a (batch, seq) bool mask per forward, or 'last' / 'all'"
                )
            self._where = positions.to(device).bool().nonzero(as_tuple=True)
            return
        if past > 0:  # a cached decoding step: the prompt was edited when it was processed
            self._where = None
            return
        mask = (
            torch.ones(batch, seq, dtype=torch.long, device=device)
            if attention_mask is None
            else attention_mask
        )
        mask = mask[:, -seq:].to(device)
        if positions == "all":
            self._where = mask.bool().nonzero(as_tuple=True)
        else:  # last non-pad token, whether padding is on the left or the right
            cols = (mask * torch.arange(1, seq + 1, device=device)).argmax(-1)
            self._where = (torch.arange(batch, device=device), cols)


def _check_positions(positions: Positions) -> None:
    if isinstance(positions, torch.Tensor):
        if positions.dim() != 2:
            raise InvalidInputError(
                f"a positions mask must be (batch, seq), got shape {tuple(positions.shape)}"
            )
    elif positions not in ("last", "all", "last_prompt"):
        raise InvalidInputError(
            f"positions must be 'last', 'all', 'last_prompt' or a (batch, seq) bool tensor, not {positions!r}"
        )


@contextlib.contextmanager
def add_to_residual(
    model: nn.Module,
    vectors: Sequence[tuple[int, torch.Tensor]],
    *,
    strength: float | torch.Tensor = 1.0,
    positions: Positions = "last",
    training_only: bool = False,
) -> Iterator[Intervention]:
    """Add ``strength * vector`` to the output hidden state of each ``(layer, vector)`` pair.

    ``strength``: one number, or a ``(batch,)`` tensor of per-row strengths (0 leaves a row alone:
    a batch of prompts of different tasks, each with its own IV).

    ``training_only``: only in forwards of the model in training mode (the student's IV during
    fine-tuning), so that evaluation, prediction and lm-eval see the model without it.

    The positions are worked out once per model forward from its ``attention_mask`` (a pre-hook
    on the model), so the layer hooks are pure functions of their input: safe under gradient
    checkpointing, where they fire twice. Cached decoding steps (generation after the prompt) are
    left alone for ``"last"`` and ``"all"``. All hooks are removed on exit, even on error.
    """
    _check_positions(positions)
    layout = get_layout(model)
    for layer, vector in vectors:
        if not 0 <= layer < layout.n_layers:
            raise InvalidInputError(f"layer {layer} is out of range: the model has {layout.n_layers} layers")
        if vector.shape != (layout.hidden_size,):
            raise InvalidInputError(
                f"vector has shape {tuple(vector.shape)}, the model's hidden size is {layout.hidden_size}"
            )
    handle = Intervention(strength, positions, training_only)
    bare = unwrap_model(model)
    signature = inspect.signature(bare.forward)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def locate(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if handle.suspended:
            # a teacher pass through the same modules: keep the student's positions, which gradient
            # checkpointing reads again when it recomputes the student's layers in backward
            return
        bound = signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get(var_kw, {}) if var_kw else {}
        ids = bound.get("input_ids", extra.get("input_ids"))
        embeds = bound.get("inputs_embeds", extra.get("inputs_embeds"))
        source = ids if ids is not None else embeds
        if source is None:
            raise InvalidInputError("cannot intervene: the forward got neither input_ids nor inputs_embeds")
        past = next(
            (v for k in ("cache", "past_key_values") if (v := bound.get(k, extra.get(k))) is not None), None
        )
        past_len = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        handle._locate(
            tuple(source.shape[:2]),
            bound.get("attention_mask", extra.get("attention_mask")),
            past_len,
            source.device,
            bound.get("labels", extra.get("labels")),
            module.training,
            bound.get("position_ids", extra.get("position_ids")),
        )

    def make_hook(vector: torch.Tensor):
        cache: dict[tuple, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple, output):
            hidden = output[0] if isinstance(output, tuple) else output
            strength = handle.strength
            if (
                handle._where is None
                or handle.suspended
                or (not isinstance(strength, torch.Tensor) and strength == 0)
            ):
                return output
            key = (hidden.device, hidden.dtype)
            if key not in cache:
                cache[key] = vector.to(device=hidden.device, dtype=hidden.dtype)
            rows, cols = handle._where
            if isinstance(strength, torch.Tensor):  # one strength per row
                added = strength.to(device=hidden.device, dtype=hidden.dtype)[rows].unsqueeze(-1) * cache[key]
            else:
                added = strength * cache[key]
            edited = torch.index_put(hidden, (rows, cols), added, accumulate=True)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook

    handles = [bare.register_forward_pre_hook(locate, with_kwargs=True)]
    handles += [layout.layers[layer].register_forward_hook(make_hook(vector)) for layer, vector in vectors]
    active = _ACTIVE.setdefault(bare, [])
    active.append(handle)
    try:
        with hooks(*handles):
            yield handle
    finally:
        active.remove(handle)


@contextlib.contextmanager
def suspend_interventions(model: nn.Module) -> Iterator[None]:
    """Switch off the interventions already active on ``model`` for the body (a teacher pass
    through the same modules, e.g. a PEFT model with adapters disabled, must not see the
    student's annealed intervention); interventions entered inside the body are unaffected."""
    suspended = [h for h in _ACTIVE.get(unwrap_model(model), []) if not h.suspended]
    for handle in suspended:
        handle.suspended = True
    try:
        yield
    finally:
        for handle in suspended:
            handle.suspended = False


def residual_pairs(
    vectors: Sequence, weights: Sequence[float] | None = None
) -> list[tuple[int, torch.Tensor]]:
    """``(edit_layer, weight * strength * vector)`` for each IV: several IVs are added together,
    each at its own layer and its own (calibrated) strength, so the strengths the callbacks and
    configs take are multiples of each IV's own."""
    weights = [1.0] * len(vectors) if weights is None else finite_numbers("iv_weights", list(weights))
    if len(weights) != len(vectors):
        raise InvalidInputError(f"{len(weights)} IV weights for {len(vectors)} instruction vectors")
    return [(iv.edit_layer, w * iv.strength * iv.vector) for iv, w in zip(vectors, weights, strict=True)]
