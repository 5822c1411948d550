"""The KL term of IV-guided training: keep the student's next-token distributions close to the
IV-intervened teacher's, at chosen positions, normalised like the causal-LM cross-entropy.

Normalisation: the per-position KL values are *summed* and divided by ``num_items_in_batch``
(the number of label tokens in the whole accumulated batch) when the Trainer passes it, as the
model's own loss is; otherwise by the number of selected positions in the micro-batch (a mean,
which the Trainer then divides by the accumulation steps, as it does the loss). Either way,
gradient accumulation gives the gradients of one large batch (for ``threshold=0``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.schedules import Schedule
from ivtrainer.steering.intervention import last_prompt_positions
from ivtrainer.utils.checks import finite_number

__all__ = [
    "KL_DIRECTIONS",
    "KL_POSITIONS",
    "KLTerm",
    "SparseTeacher",
    "kl_positions",
    "kl_term",
    "kl_terms",
    "token_kl",
    "top_k_log_probs",
]

KL_DIRECTIONS = ("forward", "reverse", "jsd")
KL_POSITIONS = ("last_prompt", "answer", "all")


@dataclasses.dataclass(frozen=True)
class KLTerm:
    """One KL term of the loss: at which ``positions``, with what ``weight`` (a number, or a
    :class:`~ivtrainer.iv_guided.schedules.Schedule` over training), counted in a micro-batch only
    when its mean per-position value is above ``threshold``. FvForgetting's loss has two:
    ``KLTerm("last_prompt", 20, 0.1)`` and ``KLTerm("all", 0.1, 0.1)``."""

    positions: Literal["last_prompt", "answer", "all"] = "all"
    weight: Schedule = dataclasses.field(default_factory=lambda: Schedule("constant", 1.0))
    threshold: float = 0.0

    def __init__(
        self,
        positions: Literal["last_prompt", "answer", "all"] = "all",
        weight: float | Schedule | dict[str, Any] = 1.0,
        threshold: float = 0.0,
    ) -> None:
        if positions not in KL_POSITIONS:
            raise InvalidInputError(f"KL positions must be one of {KL_POSITIONS}, not {positions!r}")
        if isinstance(weight, dict):
            weight = Schedule(**weight)
        if not isinstance(weight, Schedule):
            weight = float(finite_number("KL weight", weight))
            weight = Schedule("constant", weight, weight)
        if min(weight.start, weight.end) < 0:
            raise InvalidInputError(f"KL weights must be >= 0, got {weight.start:g} -> {weight.end:g}")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0 <= threshold < math.inf
        ):
            raise InvalidInputError(f"a KL threshold must be a finite number >= 0, got {threshold!r}")
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "threshold", float(threshold))


def kl_positions(
    which: Literal["last_prompt", "answer", "all"],
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(batch, seq)`` bool mask of the logits positions the KL is taken at.

    - ``last_prompt``: the token before each row's first label (its logits predict the answer's
      first token), where the IV is added;
    - ``answer``: the positions whose logits predict a label (``labels[:, t + 1] != -100``), the
      positions the cross-entropy covers;
    - ``all``: every attended position.
    """
    if which == "last_prompt":
        return last_prompt_positions(labels, position_ids)
    if which == "answer":
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        return mask
    if which == "all":
        return torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    raise InvalidInputError(f"KL positions must be one of {KL_POSITIONS}, not {which!r}")


def token_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    direction: Literal["forward", "reverse", "jsd"] = "reverse",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence between ``softmax(logits / T)`` distributions, shape ``logits[..., 0]``.

    ``forward`` = KL(teacher || student) (distillation's), ``reverse`` = KL(student || teacher)
    (FvForgetting's ``kl_div(log_softmax(teacher), softmax(student))``), ``jsd`` = Jensen-Shannon.
    Computed in float32.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if direction == "forward":
        return (t.exp() * (t - s)).sum(-1)
    if direction == "reverse":
        return (s.exp() * (s - t)).sum(-1)
    if direction == "jsd":
        m = torch.logaddexp(s, t) - torch.log(torch.tensor(2.0, device=s.device))
        return 0.5 * ((s.exp() * (s - m)).sum(-1) + (t.exp() * (t - m)).sum(-1))
    raise InvalidInputError(f"KL direction must be one of {KL_DIRECTIONS}, not {direction!r}")


@dataclasses.dataclass
class SparseTeacher:
    """The teacher's log-probabilities (at the KL's temperature) at some positions of a batch, as
    stored by the precomputed teacher: the whole distribution at ``full_positions``, the top-k
    entries and the log of the remaining mass at ``top_positions``, the raw logits at
    ``logit_positions`` (its LM head applied to stored hidden states: exact; flat
    ``row * seq + column`` indices, each sorted).

    At a top-k position the KL is taken between the two distributions coarsened to the stored
    tokens plus one bucket for all the others (the teacher's tail mass against the student's): exact
    on the stored support, a lower bound of the full KL (the tail's inner shape is not stored), and
    its gradient is the gradient of that coarsened KL.
    """

    temperature: float
    full_positions: torch.Tensor  # (n_full,)
    full: torch.Tensor  # (n_full, vocab) log-probs
    top_positions: torch.Tensor  # (n_top,)
    top_values: torch.Tensor  # (n_top, k) log-probs
    top_indices: torch.Tensor  # (n_top, k) token ids
    top_tail: torch.Tensor  # (n_top,) log of the mass outside the top k
    logit_positions: torch.Tensor | None = None  # (n_logits,)
    logits: torch.Tensor | None = None  # (n_logits, vocab) logits before the temperature

    def log_probs(self, positions: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """Float32 ``(n, vocab)`` teacher log-probabilities at flat ``positions``, given the
        student's log-probabilities there: a top-k position's tail gets the student's own shape
        scaled to the teacher's tail mass, which makes the KL over the vocabulary equal the
        coarsened KL (and its gradient the coarsened KL's)."""
        out = torch.empty_like(student)
        found = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
        for stored in (self.full_positions, self.top_positions, self.logit_positions):
            if stored is None or stored.numel() == 0:
                continue
            slot = torch.searchsorted(stored, positions).clamp_(max=stored.numel() - 1)
            here = stored[slot] == positions
            if not bool(here.any()):
                continue
            found |= here
            if stored is self.full_positions:
                out[here] = self.full[slot[here]].float()
            elif stored is self.logit_positions:
                out[here] = F.log_softmax(self.logits[slot[here]].float() / self.temperature, dim=-1)  # type: ignore[index]
            else:
                out[here] = top_k_log_probs(
                    student[here],
                    self.top_values[slot[here]].float(),
                    self.top_indices[slot[here]].long(),
                    self.top_tail[slot[here]].float(),
                )
        if not bool(found.all()):
            raise InvalidInputError("the precomputed teacher has no distribution at a position the KL covers")
        return out


# the teacher's tail mass is floored here (log space): a tail that underflowed to 0 would make the
# reverse KL infinite for any student mass outside the stored tokens
_MIN_LOG_TAIL = -60.0


def top_k_log_probs(
    student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor
) -> torch.Tensor:
    """Full-vocabulary teacher log-probabilities from its top-k ``values`` at ``indices`` and the
    log of its remaining mass ``tail``: outside the top k, the student's log-probabilities
    ``student`` shifted so that they hold the teacher's tail mass (see :class:`SparseTeacher`)."""
    # the student's tail mass is 1 minus its mass on the stored tokens (its log-probabilities are
    # normalised): a gather instead of a pass over the vocabulary; float64 keeps a small tail exact
    inside = student.gather(-1, indices).double().exp().sum(-1, keepdim=True)
    student_tail = (1.0 - inside).clamp(min=math.exp(_MIN_LOG_TAIL)).log().float()
    shift = tail.clamp(min=_MIN_LOG_TAIL).unsqueeze(-1) - student_tail
    return (student + shift).scatter_(-1, indices, values)


def kl_term(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher,
    mask: torch.Tensor,
    *,
    direction: Literal["forward", "reverse", "jsd"] = "reverse",
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    threshold: float = 0.0,
    overwrite_teacher: bool = False,
    teacher_columns: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The KL at ``mask``'s positions, normalised like the CE (see the module doc); ``None`` when
    ``mask`` selects nothing. ``threshold`` zeroes a micro-batch's term below it (FvForgetting
    counts each KL term only above 0.1).

    Equal to ``token_kl`` summed over the selected positions, but computed in chunks of positions
    with its gradient in closed form: no float32 copies of the logits are kept for backward (only
    the gradient, in the student's dtype), so the teacher's logits can be freed at once.
    ``overwrite_teacher=True`` writes that gradient into ``teacher_logits`` (when dtypes and
    shapes match; a :class:`SparseTeacher`'s ``logits`` when they cover exactly the selected
    positions), which then hold garbage: for callers that drop them right after.
    ``teacher_columns``: the sequence positions ``teacher_logits`` cover (dim 1) when the teacher
    was run with ``logits_to_keep=teacher_columns``; they must include every position in ``mask``.
    ``teacher_logits`` may instead be a :class:`SparseTeacher` (the precomputed teacher), whose
    temperature must be ``temperature``. Several terms at once: :func:`kl_terms`.
    """
    if not bool(mask.any()):
        return None
    loss, _ = kl_terms(
        student_logits, teacher_logits, [mask], [1.0], direction=direction, temperature=temperature,
        num_items_in_batch=num_items_in_batch, thresholds=[threshold], overwrite_teacher=overwrite_teacher,
        teacher_columns=teacher_columns,
    )  # fmt: skip
    return loss


def kl_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher,
    masks: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    direction: Literal["forward", "reverse", "jsd"] = "reverse",
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    thresholds: Sequence[float] | None = None,
    overwrite_teacher: bool = False,
    teacher_columns: torch.Tensor | None = None,
    student_hidden: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Several KL terms from one pass: ``sum(weights[i] * kl_term(..., masks[i], threshold=thresholds[i]))``
    and each term's value (detached; ``None`` when its mask selects nothing, 0 below its
    threshold). A position several masks select is computed once, and the gradient is one buffer
    over the positions any mask selects, each row scaled by the weights of the terms counting it
    (FvForgetting's last prompt token is in both of its terms). Arguments as :func:`kl_term`'s.

    ``student_hidden`` ``(batch, seq, hidden)``: the input of the student's LM head, a frozen
    ``head_weight`` (``student_logits`` is ``student_hidden @ head_weight.T``, plus a frozen bias):
    the gradient then goes to the hidden states, ``(positions, hidden)`` kept for backward instead
    of a ``(batch * seq, vocab)`` gradient of the logits beside the CE's own.
    """
    if isinstance(teacher_logits, SparseTeacher) and teacher_logits.temperature != temperature:
        raise InvalidInputError(
            f"the stored teacher's temperature is {teacher_logits.temperature:g}, the KL's {temperature:g}"
        )
    if direction not in KL_DIRECTIONS:
        raise InvalidInputError(f"KL direction must be one of {KL_DIRECTIONS}, not {direction!r}")
    if (student_hidden is None) != (head_weight is None):
        raise InvalidInputError("student_hidden and head_weight go together")
    thresholds = [0.0] * len(masks) if thresholds is None else list(thresholds)
    if not len(masks) == len(weights) == len(thresholds) or not masks:
        raise InvalidInputError("kl_terms needs one weight and one threshold per mask, and at least one mask")
    member = torch.stack([m.reshape(-1) for m in masks], 1)  # (batch * seq, terms)
    selected = member.any(1)
    index = selected.nonzero().squeeze(1)
    if index.numel() == 0:
        return student_logits.new_zeros((), dtype=torch.float32), [None] * len(masks)
    teacher_index = index
    if teacher_columns is not None:
        seq = masks[0].shape[1]
        where = torch.full((seq,), -1, dtype=torch.long, device=index.device)
        where[teacher_columns] = torch.arange(teacher_columns.numel(), device=index.device)
        column = where[index % seq]
        if bool((column < 0).any()):
            raise InvalidInputError("teacher_columns must include every position the mask selects")
        teacher_index = index // seq * teacher_columns.numel() + column
    member = member[index]
    counts = member.sum(0)
    denominators = (
        torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=index.device).expand(len(masks))
        if num_items_in_batch is not None
        else counts.float().clamp(min=1)  # an empty term sums to 0 (and is reported as None)
    )
    values = torch.empty(len(masks), dtype=torch.float32, device=index.device)
    loss = _FusedKL.apply(
        student_logits, teacher_logits, index, teacher_index, member,
        torch.tensor([float(w) for w in weights], device=index.device), denominators,
        torch.tensor([float(t) for t in thresholds], device=index.device), values, direction,
        float(temperature), overwrite_teacher, student_hidden, head_weight,
    )  # fmt: skip
    return loss, [values[i] if counts[i] > 0 else None for i in range(len(masks))]


# elements per float32 temporary when the KL is computed chunk by chunk: 1 MiB stays in a CPU's
# cache (0.12 s instead of 0.23 s with 8 MiB for 8 x 64 positions of a 49k vocabulary, 2 cores);
# 64 MiB on accelerators, where each chunk costs kernel launches
_CHUNK_ELEMENTS = {"cpu": 1 << 18}
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 24


def _kl_and_grad(s: torch.Tensor, t: torch.Tensor, direction: str, temperature: float):
    """Per-position divergence of float32 log-probabilities ``s`` (student) and ``t`` (teacher), and
    its gradient with respect to the student's logits (before the temperature)."""
    p = s.exp()
    if direction == "forward":
        q = t.exp()
        value = (q * (t - s)).sum(-1)
        grad = (p - q).div_(temperature)
        return value, grad
    if direction == "reverse":  # d/dz = p * (g - <p, g>) / T with g = s - t, and <p, g> is the KL
        g = s - t
        value = (p * g).sum(-1)
    else:  # jsd: dJSD/dp = 0.5 * (log p - log m)
        m = torch.logaddexp(s, t) - math.log(2.0)
        g = (s - m).mul_(0.5)
        value = (p * g).sum(-1) + 0.5 * (t.exp() * (t - m)).sum(-1)
    grad = g.sub_((p * g).sum(-1, keepdim=True)).mul_(p).div_(temperature)
    return value, grad


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student_logits,
        teacher_logits,
        index,
        teacher_index,
        member,
        weights,
        denominators,
        thresholds,
        values,
        direction,
        temperature,
        overwrite,
        student_hidden,
        head_weight,
    ):
        vocab = student_logits.shape[-1]
        sparse = teacher_logits if isinstance(teacher_logits, SparseTeacher) else None
        student = student_logits.detach().reshape(-1, vocab)
        teacher = student if sparse is not None else teacher_logits.reshape(-1, vocab)
        n = index.numel()
        everything = n == student.shape[0] and teacher.shape[0] == n
        # the gradient may go into the teacher's logits, each chunk once it is read: no new buffer
        in_teacher = (
            overwrite
            and sparse is None
            and teacher_logits.is_contiguous()
            and teacher.shape == student.shape
            and teacher.dtype == student.dtype
        )
        # or into the stored teacher's logits when they are exactly these positions, in order
        in_sparse = (
            overwrite
            and sparse is not None
            and sparse.logits is not None
            and everything
            and sparse.logits.dtype == student.dtype
            and torch.equal(sparse.logit_positions, index)
        )
        if student_hidden is not None:  # the logits' gradient at the n positions, then the hidden states'
            in_teacher = False
        grad = sparse.logits if in_sparse else teacher if in_teacher else student.new_empty((n, vocab))
        per_position = torch.empty(n, dtype=torch.float32, device=student.device)
        chunk = max(1, _CHUNK_ELEMENTS.get(student.device.type, _CHUNK_ELEMENTS_ACCELERATOR) // vocab)
        for start in range(0, n, chunk):
            part, rows = slice(start, start + chunk), index[start : start + chunk]
            if everything:
                s_in, t_in = student[part], teacher[part]
            else:
                s_in, t_in = student[rows], teacher[teacher_index[start : start + chunk]]
            s = F.log_softmax(s_in.float() / temperature, dim=-1)
            if sparse is not None:
                t = sparse.log_probs(index[start : start + chunk], s)
            else:
                t = F.log_softmax(t_in.float() / temperature, dim=-1)
            per_position[part], g = _kl_and_grad(s, t, direction, temperature)
            if in_teacher and not everything:
                grad.index_copy_(0, rows, g.to(grad.dtype))
            else:
                grad[part] = g
        if in_teacher and not everything:
            selected = torch.zeros(student.shape[0], dtype=torch.bool, device=grad.device)
            selected[index] = True
            grad.masked_fill_(~selected[:, None], 0)
        # each term's value; one below its threshold (per-position mean) counts for nothing
        totals = (per_position[:, None] * member).sum(0)
        active = (thresholds <= 0) | (totals / member.sum(0).clamp(min=1) >= thresholds)
        values.copy_(torch.where(active, totals / denominators, torch.zeros_like(totals)))
        ctx.shape, ctx.full, ctx.used = student_logits.shape, in_teacher or everything, False
        ctx.hidden = student_hidden.shape if student_hidden is not None else None
        if not bool(active.any()):
            ctx.grad = None
            return (weights * values).sum()
        # a position's gradient, times the weights of the (counted) terms selecting it
        scale = (member * (active * weights / denominators)).sum(1)
        if in_teacher and not everything:  # the rows of the whole batch (the others are zeros)
            scale = scale.new_zeros(student.shape[0]).index_copy_(0, index, scale)
        grad.mul_(scale[:, None].to(grad.dtype))
        if student_hidden is not None:  # through the frozen head, all positions in one matmul
            grad = grad.to(head_weight.dtype) @ head_weight
        ctx.save_for_backward(index)
        ctx.grad = grad  # an attribute, not a saved tensor: dropped in backward
        return (weights * values).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError(
                "the IV-guided KL term supports one backward pass per forward (retain_graph is not supported)"
            )
        ctx.used = True
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # every term below its threshold
            return (None,) * 14
        grad.mul_(grad_output)  # in place: nothing else holds the gradient
        if ctx.hidden is not None:  # the hidden states' gradient, zeros at the other positions
            (index,) = ctx.saved_tensors
            whole = grad.new_zeros((ctx.hidden[0] * ctx.hidden[1], ctx.hidden[2])).index_copy_(0, index, grad)
            return (None,) * 12 + (whole.view(ctx.hidden), None)
        if not ctx.full:
            (index,) = ctx.saved_tensors
            grad = grad.new_zeros((ctx.shape[0] * ctx.shape[1], ctx.shape[2])).index_copy_(0, index, grad)
        return (grad.view(ctx.shape),) + (None,) * 13
