"""The precomputed teacher's format and read side: a finished store's arrays, memory-mapped, and
the teacher's distribution (or exact logits) for a batch's rows."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.kl_loss import SparseTeacher
from ivtrainer.iv_guided.precomputed_teacher.keys import (
    _attended,
    _describe_change,
    _digest,
    _starts,
    _summary,
    row_keys,
)
from ivtrainer.utils.distributed import gathered

__all__ = ["FORMAT", "DamagedStoreError", "TeacherPass", "TeacherStore"]

FORMAT = 2  # 2: meta.json holds digests of itself and of every file
# the dtype of each stored array ("hidden": the model's, in meta.json)
_DTYPES = {
    "keys": np.uint64, "offsets": np.int64, "columns": np.int32, "full": np.float16, "full_column": np.int32,
    "top_values": np.float32, "top_indices": np.int32, "top_tail": np.float32, "heads": np.float32,
}  # fmt: skip
_ARRAYS = (
    "keys",
    "offsets",
    "columns",
    "full",
    "full_column",
    "top_values",
    "top_indices",
    "top_tail",
    "hidden",
    "head_weight",
    "head_bias",
    "heads",
)

#: ``teacher(input_ids, attention_mask, prompt_end, logits=True) -> (logits | None, {(layer, head): (rows,
#: head_dim)} | None)``: the live teacher's pass; head outputs at ``prompt_end``'s positions, in row
#: order; ``logits=False``: the pass may end before the LM head (its input is what is stored).
TeacherPass = Callable[..., tuple[torch.Tensor | None, dict | None]]


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    # numpy has no bfloat16: its bits are stored as uint16
    return np.dtype(np.uint16) if dtype == torch.bfloat16 else np.dtype(str(dtype).removeprefix("torch."))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return (tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.require(array, requirements=["C", "W"]))  # a copy of a read-only map
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _head_parameters(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a (possibly PEFT-wrapped) LM head computes the teacher's logits with:
    a LoRA layer's base layer, a ``modules_to_save`` wrapper's original module (the adapters are
    off in the teacher)."""
    for inner in ("base_layer", "original_module"):
        if isinstance(getattr(head, inner, None), nn.Module):
            head = getattr(head, inner)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise InvalidInputError(
            f"teacher_top_k=0 applies the model's LM head to stored hidden states, but its output embeddings "
            f"({type(head).__name__}) have no weight: use teacher_top_k >= 1"
        )
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, torch.Tensor) else None


def _head_digest(weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    return _digest(_summary(weight.detach()), b"" if bias is None else _summary(bias.detach()))


def _whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter as a whole, detached: gathered into a copy under ZeRO-3 or FSDP (collective),
    else itself (no copy: it is only read before training changes it)."""
    if hasattr(param, "full_tensor"):  # an FSDP2 DTensor
        return param.full_tensor().detach()
    if not hasattr(param, "ds_id"):
        return param.detach()
    with gathered(param):  # type: ignore[arg-type]
        return param.detach().clone()


# -- the store --------------------------------------------------------------------------------------------


class DamagedStoreError(Exception):
    """A store folder whose files do not match its ``meta.json`` (truncated, missing, edited)."""


@dataclasses.dataclass
class TeacherStore:
    """A finished store: its arrays memory-mapped, one part per process that wrote it."""

    folder: Path
    meta: dict[str, Any]
    parts: list[dict[str, np.ndarray]]
    keys: np.ndarray  # sorted row keys over all parts
    where: np.ndarray  # (n, 2): part and row of each sorted key
    _head: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = dataclasses.field(
        default_factory=dict, repr=False
    )

    @classmethod
    def load(cls, folder: Path, fingerprint: dict[str, str] | None = None) -> TeacherStore:
        """The store in ``folder``, checked against what wrote it: meta.json's own digest, its
        fingerprint against the folder's name (and ``fingerprint``, the run's), every file's digest,
        shape and dtype. Raises :class:`DamagedStoreError` naming the first mismatch."""
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("format") != FORMAT:
                raise DamagedStoreError(
                    f"written in format {meta.get('format')}, this ivtrainer reads {FORMAT}"
                )
            if meta.get("digest") != _digest({k: v for k, v in meta.items() if k != "digest"}):
                raise DamagedStoreError("meta.json was edited")
            if _digest(meta["fingerprint"])[:20] != folder.name:
                raise DamagedStoreError(
                    f"meta.json describes another store ({_digest(meta['fingerprint'])[:20]})"
                )
            if fingerprint is not None and meta["fingerprint"] != fingerprint:
                raise DamagedStoreError(
                    f"it was written for other inputs ({_describe_change(meta['fingerprint'], fingerprint)})"
                )
            parts = []
            for p, info in enumerate(meta["parts"]):
                arrays = {}
                for name in info["shapes"]:
                    path = folder / f"{name}-{p}.npy"
                    if _file_digest(path) != meta["files"][path.name]:
                        raise DamagedStoreError(f"{path.name} differs from what was written")
                    array = np.load(path, mmap_mode="r")
                    dtype = _DTYPES.get(name) or _numpy_dtype(_torch_dtype(meta["hidden_dtype"]))
                    if list(array.shape) != info["shapes"][name] or array.dtype != dtype:
                        raise DamagedStoreError(
                            f"{path.name} is {array.dtype} {array.shape}, meta.json says {dtype} {info['shapes'][name]}"
                        )
                    arrays[name] = array
                parts.append(arrays)
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
        ) as exc:  # missing, truncated, unparsable
            raise DamagedStoreError(f"{type(exc).__name__}: {exc}") from exc
        keys = np.concatenate([part["keys"] for part in parts]) if parts else np.zeros(0, np.uint64)
        where = np.concatenate(
            [np.stack([np.full(len(part["keys"]), p), np.arange(len(part["keys"]))], 1) for p, part in enumerate(parts)]
        ) if parts else np.zeros((0, 2), np.int64)  # fmt: skip
        order = np.argsort(keys, kind="stable")
        return cls(folder, meta, parts, keys[order], where[order])

    @property
    def n_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.iterdir())

    def head(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored LM head (``top_k=0``) on ``device``, read there once (or the model's own, see
        :meth:`share_head`)."""
        if device not in self._head:
            weight = self._read("head_weight", device)
            if weight is None:
                raise InvalidInputError(
                    f"the precomputed teacher {self.folder} stores no LM head (teacher_top_k >= 1)"
                )
            self._head[device] = (weight, self._read("head_bias", device))
        return self._head[device]

    def _read(self, name: str, device: torch.device) -> torch.Tensor | None:
        if name not in self.parts[0]:
            return None
        # read, not mapped: the copy on the device is all that stays in memory
        array = np.load(self.folder / f"{name}-0.npy")
        return _from_numpy(array, self.meta["hidden_dtype"]).to(device)

    def share_head(self, head: nn.Module) -> bool:
        """Use the model's own LM head weights as the stored head when they are frozen and the same
        (LoRA leaves them so): no copy in memory. Returns whether they were taken."""
        weight, bias = _head_parameters(head)
        if (
            self.meta.get("top_k") != 0
            or any(
                p.requires_grad or hasattr(p, "ds_id") or hasattr(p, "full_tensor")
                for p in (weight, bias)
                if p is not None
            )
            or str(weight.dtype).removeprefix("torch.") != self.meta.get("hidden_dtype")
            or _head_digest(weight, bias) != self.meta.get("head_digest")
        ):
            return False
        self._head[weight.device] = (weight.detach(), None if bias is None else bias.detach())
        return True

    def batch(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, labels: torch.Tensor
    ) -> tuple[SparseTeacher, torch.Tensor | None]:
        """The stored teacher for a training batch: its distributions as a
        :class:`~ivtrainer.iv_guided.kl_loss.SparseTeacher` over the batch's flat positions, and
        the heads' outputs at each row's last prompt token ``(batch, heads, head_dim)`` (None
        without the head term)."""
        if input_ids is None:
            raise InvalidInputError(
                "the precomputed teacher matches rows by their input_ids: the batch has none"
            )
        device, seq = labels.device, labels.shape[1]
        keys = row_keys(input_ids, attention_mask, labels)
        slot = np.searchsorted(self.keys, keys).clip(max=max(len(self.keys) - 1, 0))
        missing = np.flatnonzero(self.keys[slot] != keys) if len(self.keys) else np.arange(len(keys))
        if len(missing):
            raise InvalidInputError(
                f"a training row (batch row {int(missing[0])}) is not in the precomputed teacher {self.folder}: the "
                "training data differs from what was precomputed (a collator that changes rows at random, data "
                "changed during training, or rows packed per batch); use the live teacher for such data"
            )
        starts = _starts(_attended(attention_mask, labels)).cpu().numpy()
        full_pos, full, top_pos, values, indices, tail, hidden, heads = [], [], [], [], [], [], [], []
        for b, (p, r) in enumerate(self.where[slot]):
            part = self.parts[p]
            base = b * seq + int(starts[b])
            if "full" in part and part["full_column"][r] >= 0:
                full_pos.append(base + int(part["full_column"][r]))
                full.append(part["full"][r])
            lo, hi = int(part["offsets"][r]), int(part["offsets"][r + 1])
            if hi > lo:
                top_pos.append(base + part["columns"][lo:hi].astype(np.int64))
                if "hidden" in part:
                    hidden.append(part["hidden"][lo:hi])
                else:
                    values.append(part["top_values"][lo:hi])
                    indices.append(part["top_indices"][lo:hi])
                    tail.append(part["top_tail"][lo:hi])
            if "heads" in part:
                heads.append(part["heads"][r])
        vocab, k = self.meta["vocab"], self.meta["top_k"]

        def tensor(chunks, shape, dtype=None):
            array = np.concatenate(chunks) if chunks else np.zeros(shape, dtype or np.float32)
            return torch.from_numpy(np.ascontiguousarray(array)).to(device)

        logit_positions = logits = None
        if k == 0:  # the stored LM head applied to the stored hidden states: the teacher's logits
            logit_positions, top_pos = tensor(top_pos, (0,), np.int64).long(), []
            weight, bias = self.head(device)
            states = (
                np.concatenate(hidden)
                if hidden
                else np.zeros((0, weight.shape[1]), _numpy_dtype(weight.dtype))
            )
            logits = F.linear(_from_numpy(states, self.meta["hidden_dtype"]).to(device), weight, bias)
        sparse = SparseTeacher(
            temperature=self.meta["temperature"],
            full_positions=torch.tensor(full_pos, dtype=torch.long, device=device),
            full=torch.from_numpy(np.stack(full)).to(device)
            if full
            else torch.zeros((0, vocab), device=device),
            top_positions=tensor(top_pos, (0,), np.int64).long(),
            top_values=tensor(values, (0, max(k, 1))),
            top_indices=tensor(indices, (0, max(k, 1)), np.int32).long(),
            top_tail=tensor(tail, (0,)),
            logit_positions=logit_positions,
            logits=logits,
        )
        return sparse, (torch.from_numpy(np.stack(heads)).to(device) if heads else None)
