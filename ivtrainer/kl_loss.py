"""The KL term of IV-guided training: keep the student's next-token distributions close to the
IV-intervened teacher's, at chosen positions, normalised like the causal-LM cross-entropy.

Normalisation: the per-position KL values are *summed* and divided by ``num_items_in_batch``
(the number of label tokens in the whole accumulated batch) when the Trainer passes it, as the
model's own loss is; otherwise by the number of selected positions in the micro-batch (a mean,
which the Trainer then divides by the accumulation steps, as it does the loss). Either way,
gradient accumulation gives the gradients of one large batch (for ``threshold=0``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .intervention import last_prompt_positions

__all__ = ["KL_DIRECTIONS", "KL_POSITIONS", "kl_positions", "kl_term", "token_kl"]

KL_DIRECTIONS = ("forward", "reverse", "jsd")
KL_POSITIONS = ("last_prompt", "answer", "all")


def kl_positions(
    which: Literal["last_prompt", "answer", "all"],
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(batch, seq)`` bool mask of the logits positions the KL is taken at.

    - ``last_prompt``: the token before each row's first label (its logits predict the answer's
      first token), where the IV is added;
    - ``answer``: the positions whose logits predict a label (``labels[:, t + 1] != -100``), the
      positions the cross-entropy covers;
    - ``all``: every attended position.
    """
    if which == "last_prompt":
        return last_prompt_positions(labels)
    if which == "answer":
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        return mask
    if which == "all":
        return torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    raise ValueError(f"KL positions must be one of {KL_POSITIONS}, not {which!r}")


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
    raise ValueError(f"KL direction must be one of {KL_DIRECTIONS}, not {direction!r}")


def kl_term(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    direction: Literal["forward", "reverse", "jsd"] = "reverse",
    temperature: float = 1.0,
    num_items_in_batch: int | torch.Tensor | None = None,
    threshold: float = 0.0,
) -> torch.Tensor | None:
    """The KL at ``mask``'s positions, normalised like the CE (see the module doc); ``None`` when
    ``mask`` selects nothing. ``threshold`` zeroes a micro-batch's term below it (FvForgetting
    counts each KL term only above 0.1)."""
    if not bool(mask.any()):
        return None
    rows, cols = mask.nonzero(as_tuple=True)
    per_position = token_kl(student_logits[rows, cols], teacher_logits[rows, cols], direction, temperature)
    total = per_position.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else per_position.numel()
    value = total / denominator
    if threshold > 0 and float(per_position.mean()) < threshold:
        return value * 0.0  # keeps the graph (all ranks run the same backward)
    return value
