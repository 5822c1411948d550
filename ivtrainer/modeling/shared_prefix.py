"""Forwards of many sequences that start with the same tokens, that prefix computed once.

The prefix runs once and its KV cache is kept; the sequences' remaining tokens then run as one
tree-masked sequence after it, each sequence's tokens attending to the prefix and causally to
themselves only, at their own positions. With five shared demonstrations before short queries
(fixed-demonstration ICL) or a shared instruction before short inputs, that is several times fewer
tokens than batched full forwards, with the same logits.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ivtrainer.modeling.architectures import takes_logits_to_keep
from ivtrainer.modeling.hooks import cache_argument, eval_mode, output_cache

__all__ = ["common_prefix", "shared_prefix_logits"]

logger = logging.getLogger(__name__)

# Models whose attention or cache rejected the tree-masked step once (plain forwards from then on),
# and those whose tree step matched a plain forward once (not checked again).
_UNSUPPORTED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_CHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()

#: Shorter shared prefixes are not worth a separate pass.
MIN_PREFIX = 4


def common_prefix(sequences: Sequence[Sequence[int]], limit: int | None = None) -> int:
    """How many leading tokens every sequence shares (at most ``limit``)."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences) if limit is None else min(limit, *map(len, sequences))
    for s in sequences[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n


@torch.no_grad()
def shared_prefix_logits(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    *,
    max_tokens: int = 512,
    atol: float = 1e-3,
) -> list[torch.Tensor] | None:
    """Logits (float32, on the CPU) at ``positions[i]`` of each ``sequences[i]``, the shared prefix
    run once; ``None`` when the sequences share fewer than :data:`MIN_PREFIX` tokens before the
    first wanted position, or when the model cannot run the tree-masked step (its attention ignores
    custom 4D masks, its cache cannot be rolled back): the caller then runs plain forwards.

    The suffixes run in tree steps of about ``max_tokens`` tokens (large steps keep the matrix
    products efficient; the mask grows with their square). The first sequence is checked against a
    plain forward, once per model.
    """
    first_wanted = min((min(p) for p in positions if len(p)), default=0)
    n_prefix = common_prefix(sequences, limit=first_wanted)  # every wanted position in a suffix
    if n_prefix < MIN_PREFIX or model in _UNSUPPORTED:
        return None
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            cache = output_cache(
                model(torch.tensor([list(sequences[0][:n_prefix])], device=device), use_cache=True)
            )
            out: list[torch.Tensor] = []
            for chunk in _chunks([len(s) - n_prefix for s in sequences], max_tokens):
                suffixes = [list(sequences[i][n_prefix:]) for i in chunk]
                wanted = [[p - n_prefix for p in positions[i]] for i in chunk]
                out += _tree_step(model, cache, n_prefix, suffixes, wanted)
                cache.crop(-sum(map(len, suffixes)))  # back to the prefix (negative: tokens to drop)
            if model not in _CHECKED:
                ids = torch.tensor([list(sequences[0])], device=device)
                plain = model(ids, use_cache=False).logits[0, list(positions[0])].float().cpu()
                if not torch.allclose(out[0], plain, atol=atol, rtol=0):
                    raise RuntimeError("the tree step differs from the plain forward")
                _CHECKED.add(model)
    except Exception as exc:  # any failure here means: plain forwards
        logger.warning("shared-prefix forward unsupported here (%s); using plain forwards", exc)
        _UNSUPPORTED.add(model)
        return None
    return out


def _chunks(lengths: list[int], max_tokens: int) -> list[range]:
    """Consecutive index ranges of about ``max_tokens`` tokens each (at least one sequence)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > max_tokens:
            out.append(range(start, i))
            start, total = i, 0
        total += n
    return [*out, range(start, len(lengths))] if lengths else out


def _tree_step(
    model: nn.Module, cache: Any, n_prefix: int, suffixes: list[list[int]], wanted: list[list[int]]
) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lengths = torch.tensor([len(s) for s in suffixes])
    owner = torch.repeat_interleave(torch.arange(len(suffixes)), lengths).to(device)
    starts = torch.cumsum(lengths, 0) - lengths
    offset = torch.cat([torch.arange(len(s)) for s in suffixes]).to(device)
    rows = torch.arange(len(owner), device=device)
    visible = (owner[:, None] == owner[None, :]) & (rows[None, :] <= rows[:, None])
    mask = torch.zeros(1, 1, len(owner), n_prefix + len(owner), dtype=dtype, device=device)
    mask[0, 0, :, n_prefix:] = torch.where(visible, 0.0, torch.finfo(dtype).min)
    keep = torch.tensor([int(starts[i]) + p for i, ps in enumerate(wanted) for p in ps], dtype=torch.long)
    extra = {"logits_to_keep": keep.to(device)} if takes_logits_to_keep(model) else {}
    logits = model(
        torch.tensor([[t for s in suffixes for t in s]], device=device),
        **{cache_argument(model): cache},
        attention_mask=mask,
        position_ids=(n_prefix + offset)[None],
        use_cache=True,
        **extra,
    ).logits[0]
    logits = (logits if extra else logits[keep.to(device)]).float().cpu()
    return list(logits.split([len(ps) for ps in wanted]))
