"""Row keys and fingerprints of the precomputed teacher: a row is matched by its content (a hash
of its attended tokens and labels), and a store by the fingerprint of its data, model, IVs and
settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.kl_loss import kl_positions
from ivtrainer.modeling.hooks import is_peft_model
from ivtrainer.steering.intervention import last_prompt_positions
from ivtrainer.utils.distributed import gathered

__all__ = ["model_fingerprint", "row_keys", "stored_masks", "vectors_fingerprint"]


def _attended(attention_mask: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()


def row_keys(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor
) -> np.ndarray:
    """One ``uint64`` per row: a hash of its attended tokens and their labels (the IV's position
    depends on the labels), the same whatever the padding around them."""
    attended = _attended(attention_mask, labels).cpu().numpy()
    ids, lab = input_ids.cpu().numpy().astype(np.int64), labels.cpu().numpy().astype(np.int64)
    keys = np.empty(len(ids), dtype=np.uint64)
    for i, row in enumerate(attended):
        digest = hashlib.blake2b(ids[i][row].tobytes(), digest_size=8)
        digest.update(lab[i][row].tobytes())
        keys[i] = int.from_bytes(digest.digest(), "little")
    return keys


def stored_masks(
    positions: Sequence[str],
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    whole_last_prompt: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(full, each)`` bool masks of what is stored for ``positions``' KL terms: the whole
    distribution at the last prompt token (when a term covers it and ``whole_last_prompt``), a
    per-position record (top-k, or hidden state) at every other position some term covers."""
    full = (
        last_prompt_positions(labels)
        if "last_prompt" in positions and whole_last_prompt
        else torch.zeros_like(labels, dtype=torch.bool)
    )
    covered = torch.zeros_like(full)
    for which in positions:
        covered |= kl_positions(which, labels, attention_mask)  # type: ignore[arg-type]  # checked by KLTerm
    return full, covered & ~full


def _starts(attended: torch.Tensor) -> torch.Tensor:
    """Each row's first attended column, after checking that its attended tokens are contiguous
    (the stored columns are relative to it)."""
    counts = attended.sum(1)
    first = attended.int().argmax(1)
    last = attended.shape[1] - 1 - attended.flip(1).int().argmax(1)
    if bool(((counts > 0) & (last - first + 1 != counts)).any()):
        raise InvalidInputError(
            "a training row's attention mask has holes (packed or padding-free batches): the precomputed teacher "
            "matches whole rows, so it cannot serve such batches; use packing with padding, or the live teacher"
        )
    return first


# -- fingerprints -------------------------------------------------------------------------------------------


def _digest(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the weights the teacher uses: every parameter's name, shape, dtype, sum and 16
    evenly spaced values (a PEFT model's adapters left out: its teacher runs with them off)."""
    skip: tuple[str, ...] = ()
    if is_peft_model(model):
        skip = tuple(f".{name}." for name in getattr(model, "peft_config", {}))
    h = hashlib.blake2b(digest_size=16)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if skip and any(s in f"{name}." for s in skip):
            continue
        with gathered(param):
            h.update(f"{name}:".encode() + _summary(param.detach()))
    return h.hexdigest()


def _summary(data: torch.Tensor) -> bytes:
    """A tensor's shape, dtype, sum and 16 evenly spaced values."""
    flat = data.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 16)][:16].float().cpu().numpy()
    total = float(torch.sum(data, dtype=torch.float64))
    return f"{tuple(data.shape)}:{data.dtype}:{total!r}".encode() + sample.tobytes()


def vectors_fingerprint(pairs: Sequence[tuple[int, torch.Tensor]], heads: Sequence[tuple[int, int]]) -> str:
    """A hash of what the teacher adds (each IV's layer and scaled vector) and the heads compared."""
    parts: list[Any] = [[list(h) for h in heads]]
    for layer, vector in pairs:
        parts += [layer, vector.detach().float().cpu().numpy().tobytes()]
    return _digest(*parts)


def _describe_change(old: dict[str, str], new: dict[str, str]) -> str:
    changed = [name for name in new if old.get(name) != new[name]]
    return ", ".join(changed) or "the format"
