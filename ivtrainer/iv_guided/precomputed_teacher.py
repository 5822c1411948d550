"""The precomputed teacher of IV-guided training (``IVGuidedConfig(teacher="precomputed")``).

Before the first step, one no-grad pass of the teacher (the model before training with the IVs
added: the live teacher's very computation) over the training set stores what the loss needs at
the KL positions: the whole distribution at each row's last prompt token, the top-k
log-probabilities + token ids + the log of the remaining mass at the other positions, and the IV
heads' outputs at the last prompt token when the head term is on. Every step then reads its rows
back instead of running the teacher, so no reference model is needed at train time.

With ``top_k=0`` (no truncation) it stores instead the teacher's last hidden states (the LM head's
input) at every KL position and the LM head's weights once; each step applies that head to its
rows' hidden states: the teacher's exact logits, for one LM-head matmul a step.

Rows are matched by content: a row's key is a hash of its attended tokens and labels, so
shuffling, padding side, batch composition and multi-process sampling do not matter; a row the
store has not seen is an error, never a silently wrong teacher.

The store lives in ``<output_dir>/_ivtrainer_teacher/<fingerprint>/`` (memory-mapped ``.npy``
files and ``meta.json``; the leading underscore keeps ``Trainer.push_to_hub`` from uploading it).
The fingerprint covers the data (the row keys), the model's weights (sampled), the IVs and the
settings, so a rerun or a resumed run reuses it and any change recomputes it. It is written under
a temporary name and renamed when complete: a killed precompute leaves nothing that is read back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.kl_loss import SparseTeacher, kl_positions
from ivtrainer.modeling.hooks import hooks, is_peft_model
from ivtrainer.steering.intervention import last_prompt_positions
from ivtrainer.utils.distributed import gathered
from ivtrainer.utils.outputs import sweep_stale

__all__ = [
    "CACHE_FOLDER",
    "TeacherStore",
    "check_cache_dir",
    "model_fingerprint",
    "precompute_teacher",
    "row_keys",
    "stored_masks",
    "vectors_fingerprint",
]

logger = logging.get_logger(__name__)

CACHE_FOLDER = "_ivtrainer_teacher"
FORMAT = 2  # 2: meta.json holds digests of itself and of every file
# a mean top-k tail mass above this is pointed out in the log (the coarsened KL misses its shape)
_TAIL_NOTE = 0.05
# elements of float32 log-probabilities computed at once while storing (16 MiB)
_CHUNK_ELEMENTS = 1 << 22
# the dtype of each stored array ("hidden": the model's, in meta.json)
_DTYPES = {
    "keys": np.uint64, "offsets": np.int64, "columns": np.int32, "full": np.float16, "full_column": np.int32,
    "top_values": np.float32, "top_indices": np.int32, "top_tail": np.float32, "heads": np.float32,
}  # fmt: skip
# a store folder's name: its fingerprint's digest; a killed precompute's: ".<name>.tmp-<pid>-<random>"
_STORE_NAME = re.compile(r"[0-9a-f]{20}")
_TMP_NAME = re.compile(r"\.([0-9a-f]{20})\.tmp(-.*)?")
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

#: ``teacher(input_ids, attention_mask, prompt_end) -> (logits, {(layer, head): (rows, head_dim)} | None)``:
#: the live teacher's pass; head outputs at ``prompt_end``'s positions, in row order.
TeacherPass = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], tuple[torch.Tensor, dict | None]]


# -- matching rows ----------------------------------------------------------------------------------------


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


# -- computing it -----------------------------------------------------------------------------------------


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _distributed()[1] > 1:
        torch.distributed.barrier()


def _from_main(value: Any) -> Any:
    """``value`` as the main process has it, on every process."""
    if _distributed()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _describe_change(old: dict[str, str], new: dict[str, str]) -> str:
    changed = [name for name in new if old.get(name) != new[name]]
    return ", ".join(changed) or "the format"


def precompute_teacher(
    cache_dir: str | os.PathLike,
    dataset,
    collate_fn,
    teacher: TeacherPass,
    *,
    fingerprint: dict[str, str],
    positions: Sequence[str],
    top_k: int,
    temperature: float,
    heads: Sequence[tuple[int, int]] = (),
    lm_head: nn.Module | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = True,
    compute: bool = True,
    prune: bool = True,
) -> TeacherStore:
    """The store for ``dataset`` (rows as the Trainer's ``collate_fn`` makes them), reused from
    ``cache_dir`` when its fingerprint matches, else computed with ``teacher`` and written there.

    ``fingerprint``: the model's, the IVs' and the settings' hashes (the data's is added here).
    ``top_k=0``: store the input of ``lm_head`` (the model's output embeddings, which ``teacher``
    runs) at every KL position, and its weights.
    Multi-process: every process computes its share of the rows into one folder (which must be on
    a file system they all see), and all of them read the whole store. ``compute=False``: the
    store must exist (a resumed full fine-tuning, whose model is no longer the teacher).
    ``prune``: remove the stores of other fingerprints in ``cache_dir`` (the default folder under
    ``output_dir`` belongs to one run; a shared one is left alone).
    """
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise InvalidInputError(
            "teacher='precomputed' needs a map-style training dataset (rows it can count and read twice), not "
            f"{type(dataset).__name__}: pass a datasets.Dataset, or use the live teacher for streamed data"
        )
    if top_k < 0:
        raise InvalidInputError(
            f"teacher_top_k must be >= 0 (0: exact, from stored hidden states), got {top_k}"
        )
    if top_k == 0 and lm_head is None:
        raise InvalidInputError(
            "teacher_top_k=0 applies the model's LM head to stored hidden states, but the model has none "
            "(get_output_embeddings() is None): use teacher_top_k >= 1"
        )
    rank, world = _distributed()
    device = torch.device(device)
    # what every row stores, from its collated form alone (cheap: no forward)
    keys, n_top, has_full = [], [], []
    for batch in _batches(dataset, collate_fn, range(len(dataset)), batch_size):
        labels = batch.get("labels")
        if labels is None:
            raise InvalidInputError("teacher='precomputed' needs labels in the training batches")
        if "position_ids" in batch or any(k.startswith("cu_seq_lens") for k in batch):
            raise InvalidInputError(
                "the training batches are packed without padding (position_ids in the batch): their rows depend on "
                "how examples are batched, so the precomputed teacher cannot match them; use packing with padding "
                "(trl: padding_free=False) or the live teacher"
            )
        attention_mask = batch.get("attention_mask")
        _starts(_attended(attention_mask, labels))
        keys.append(row_keys(batch["input_ids"], attention_mask, labels))
        full, top = stored_masks(positions, labels, attention_mask, whole_last_prompt=top_k > 0)
        n_top.append(top.sum(1).numpy())
        has_full.append(full.any(1).numpy())
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    counts, fulls = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (n_top, has_full))
    settings = {
        "format": FORMAT, "positions": sorted(positions), "top_k": top_k, "temperature": temperature,
        "heads": [list(h) for h in heads],
    }  # fmt: skip
    components = {**fingerprint, "settings": _digest(settings), "data": _digest(np.sort(all_keys).tobytes())}
    name = _digest(components)[:20]
    root = Path(cache_dir).expanduser()
    if rank == 0:
        _check_cache_folder(root)
    folder = root / name

    # the main process decides: reuse a complete store, or compute a new one (the others follow)
    decision, tmp = None, None
    if rank == 0:
        decision = "compute"
        if folder.is_dir():
            try:
                TeacherStore.load(folder, components)
                decision = "reuse"
            except DamagedStoreError as exc:
                logger.warning("teacher cache %s is damaged (%s): recomputing it", folder, exc)
                shutil.rmtree(folder, ignore_errors=True)
    decision = _from_main(decision)
    if decision == "compute" and not compute:
        raise InvalidInputError(
            f"the precomputed teacher of this run is missing, stale or damaged in {root} (resuming full fine-tuning: "
            "the model has been trained, so the teacher cannot be computed from it again). Restore the folder the "
            "first run wrote, or start the run over"
        )
    if decision == "compute" and rank == 0:
        for old in sorted(root.glob("*/meta.json")) if root.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                changed = _describe_change(json.loads(old.read_text()).get("fingerprint", {}), components)
                logger.warning(
                    "teacher cache %s is stale (%s changed)%s", old.parent, changed,
                    ": removed" if prune else "; kept (a shared teacher_cache_dir)",
                )  # fmt: skip
                if prune:
                    shutil.rmtree(old.parent, ignore_errors=True)
        # what killed precomputes left (their process is gone; a live one's is its own): this
        # store's, or in a folder of this run's own, any
        root.mkdir(parents=True, exist_ok=True)
        for entry in list(root.iterdir()):
            if (m := _TMP_NAME.fullmatch(entry.name)) and (prune or m.group(1) == name):
                if m.group(2) is None:  # an earlier version's name, without its owner
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    sweep_stale(root, f".{m.group(1)}.tmp-")
        # a unique name: another run sharing the folder may be writing the same store
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=root))
    tmp = _from_main(tmp)
    if decision == "reuse":
        store = TeacherStore.load(folder, components)
        if rank == 0:
            logger.warning(
                "precomputed teacher reused: %s (%d rows, %.1f MB)",
                folder,
                len(store.keys),
                store.n_bytes / 1e6,
            )
        return store

    _barrier()
    start = time.perf_counter()
    mine = np.arange(rank, len(all_keys), world)
    try:
        shapes = _write_part(
            tmp, rank, dataset, collate_fn, teacher, mine, counts, fulls, all_keys,
            positions=positions, top_k=top_k, temperature=temperature, heads=heads, lm_head=lm_head,
            batch_size=batch_size, device=device, progress=progress and rank == 0,
            n_batches=math.ceil(math.ceil(len(all_keys) / world) / batch_size),
        )  # fmt: skip
    except BaseException:  # nothing half-written is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    all_shapes = [shapes]
    if world > 1:
        all_shapes = [None] * world  # type: ignore[list-item]
        torch.distributed.all_gather_object(all_shapes, shapes)
    if rank == 0:
        vocab = next(s["vocab"] for s in all_shapes if s.get("vocab"))
        dtype = next((s["hidden_dtype"] for s in all_shapes if s.get("hidden_dtype")), None)
        meta = {
            **settings, "vocab": vocab, "hidden_dtype": dtype, "head_digest": shapes.get("head_digest"),
            "fingerprint": components, "rows": len(all_keys),
            "parts": [{"shapes": s["shapes"]} for s in all_shapes],
            "files": {f.name: _file_digest(f) for f in sorted(tmp.glob("*.npy"))},
            "seconds": round(time.perf_counter() - start, 2),
        }  # fmt: skip
        meta["digest"] = _digest(meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:  # another run sharing the folder wrote the same store first: read theirs
            shutil.rmtree(tmp, ignore_errors=True)
            if not folder.is_dir():
                raise
            logger.warning("precomputed teacher: %s was written by another run meanwhile; using it", folder)
    _barrier()
    store = TeacherStore.load(folder, components)
    if rank == 0:
        mass = [
            float(np.exp(part["top_tail"]).mean()) for part in store.parts if len(part.get("top_tail", ()))
        ]
        what = (
            f"top-{top_k} tail mass {f'{np.mean(mass):.4f} on average' if mass else 'n/a'}"
            + (
                " (the KL there is that of the coarsened distributions, a lower bound: teacher_top_k=0 stores the "
                "teacher exactly)"
                if mass and np.mean(mass) > _TAIL_NOTE
                else ""
            )
            if top_k
            else f"hidden states + the LM head (exact; applied again it gives the pass's logits to {shapes['head_error']:.2g})"
        )
        logger.warning(
            "precomputed teacher: %d rows in %.1f s, %.1f MB at %s (%.0f bytes a row); %s",
            len(all_keys), time.perf_counter() - start, store.n_bytes / 1e6, folder,
            store.n_bytes / max(len(all_keys), 1), what,
        )  # fmt: skip
    return store


def _check_cache_folder(root: Path) -> None:
    """Refuse a cache folder that is a file, or that holds anything but teacher stores (a home
    folder, the working directory, a project): stale stores are pruned there."""
    if root.exists() and not root.is_dir():
        raise InvalidInputError(f"teacher cache {root} is a file: give a folder (teacher_cache_dir)")
    foreign = sorted(e.name for e in (root.iterdir() if root.is_dir() else ()) if not _is_ours(e))
    if foreign:
        raise InvalidInputError(
            f"teacher cache {root} holds {len(foreign)} entries that are not precomputed teachers (e.g. "
            f"{foreign[0]!r}): give teacher_cache_dir a folder of its own (new or empty); ivtrainer writes and "
            "removes stores there"
        )


def check_cache_dir(cache_dir: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Refuse, before any work, a ``teacher_cache_dir`` that ``push_to_hub`` would upload (the
    Trainer uploads ``output_dir`` except names starting with ``_`` and checkpoints), or one that
    is a file or holds anything but teacher stores."""
    cache, out = Path(cache_dir).expanduser().resolve(), Path(output_dir).expanduser().resolve()
    if cache == out or out in cache.parents:
        first = cache.relative_to(out).parts[:1]
        if not first or not first[0].startswith("_"):
            raise InvalidInputError(
                f"teacher_cache_dir {cache_dir} is inside output_dir ({output_dir}) where push_to_hub would upload "
                f"it: use a folder whose name starts with '_' there (the default is {out / CACHE_FOLDER}), or one "
                "outside output_dir"
            )
    _check_cache_folder(Path(cache_dir).expanduser())


def _is_ours(entry: Path) -> bool:
    """A store folder (its name a fingerprint, with meta.json or still empty) or a temporary one."""
    if entry.is_symlink() or not entry.is_dir():
        return False
    if _TMP_NAME.fullmatch(entry.name):
        return True
    return bool(_STORE_NAME.fullmatch(entry.name)) and (
        (entry / "meta.json").is_file() or not any(entry.iterdir())
    )


def _batches(dataset, collate_fn, rows: Sequence[int], batch_size: int):
    for start in range(0, len(rows), batch_size):
        yield collate_fn([dataset[int(i)] for i in rows[start : start + batch_size]])


def _write_part(
    folder: Path, rank: int, dataset, collate_fn, teacher: TeacherPass, rows: np.ndarray, counts: np.ndarray,
    fulls: np.ndarray, keys: np.ndarray, *, positions: Sequence[str], top_k: int, temperature: float,
    heads: Sequence[tuple[int, int]], lm_head: nn.Module | None, batch_size: int, device: torch.device,
    progress: bool, n_batches: int,
) -> dict[str, Any]:  # fmt: skip
    """This process's rows into ``<name>-<rank>.npy`` files; returns their shapes, the vocabulary
    size and (``top_k=0``) the hidden states' dtype and how far the LM head applied to them is from
    the teacher's logits."""
    from tqdm.auto import tqdm

    offsets = np.concatenate([[0], np.cumsum(counts[rows])]).astype(np.int64)
    arrays: dict[str, np.memmap] = {}

    def array(name: str, shape: tuple[int, ...], dtype) -> np.memmap:
        arrays[name] = np.lib.format.open_memmap(
            folder / f"{name}-{rank}.npy", mode="w+", dtype=dtype, shape=shape
        )
        return arrays[name]

    array("keys", (len(rows),), np.uint64)[:] = keys[rows]
    array("offsets", offsets.shape, np.int64)[:] = offsets
    vocab, dtype, head_error = None, None, None
    filled, position = 0, 0
    order = list(rows)
    captured: list[torch.Tensor] = []  # the LM head's input and output, per teacher pass
    handles, head = [], None
    if top_k == 0:  # the LM head's input (the teacher's last hidden states), and the head itself
        weight, bias = _head_parameters(lm_head)  # type: ignore[arg-type]
        head = _whole(weight), None if bias is None else _whole(bias)  # collective: before any rank can fail
        handles += [
            lm_head.register_forward_pre_hook(lambda module, args: captured.append(args[0])),  # type: ignore[union-attr]
            lm_head.register_forward_hook(lambda module, args, out: captured.append(out)),  # type: ignore[union-attr]
        ]
    with hooks(*handles):
        bar = tqdm(total=n_batches, desc="precomputing the teacher", disable=not progress)
        for step in range(n_batches):
            chunk = order[step * batch_size : (step + 1) * batch_size]
            # under ZeRO-3 every process runs the same number of forwards: a process out of rows
            # repeats its last batch and stores nothing
            batch = collate_fn([dataset[int(i)] for i in (chunk or order[-1:] or [0])])
            labels = batch["labels"].to(device)
            attention_mask = batch.get("attention_mask")
            attention_mask = attention_mask.to(device) if attention_mask is not None else None
            input_ids = batch["input_ids"].to(device)
            prompt_end = last_prompt_positions(labels)
            logits, head_outputs = teacher(input_ids, attention_mask, prompt_end)
            bar.update()
            if not chunk:
                captured.clear()
                continue
            if vocab is None:
                vocab = logits.shape[-1]
                if top_k >= vocab:
                    raise InvalidInputError(
                        f"teacher_top_k ({top_k}) must be smaller than the vocabulary ({vocab})"
                    )
                n = int(offsets[-1])
                array("columns", (n,), np.int32)
                if top_k == 0:
                    hidden = _hidden_states(captured, logits)
                    dtype = hidden.dtype
                    array("hidden", (n, hidden.shape[-1]), _numpy_dtype(dtype))
                else:
                    array("top_values", (n, top_k), np.float32)
                    array("top_indices", (n, top_k), np.int32)
                    array("top_tail", (n,), np.float32)
                if "last_prompt" in positions and top_k > 0:
                    array("full", (len(rows), vocab), np.float16)
                    array("full_column", (len(rows),), np.int32)[:] = -1
                if heads:
                    head_dim = next(iter(head_outputs.values())).shape[-1]  # type: ignore[union-attr]
                    array("heads", (len(rows), len(heads), head_dim), np.float32)
                _check_space(folder, sum(a.nbytes for a in arrays.values()) + sum(
                    t.numel() * t.element_size() for t in head or () if t is not None
                ))  # fmt: skip
            full, top = stored_masks(positions, labels, attention_mask, whole_last_prompt=top_k > 0)
            starts = _starts(_attended(attention_mask, labels))
            selected = top.nonzero(as_tuple=True)
            if top_k == 0:
                hidden = _hidden_states(captured, logits)[selected]
                if (
                    head_error is None and hidden.shape[0]
                ):  # the logits: the head's output, nothing more (no soft-cap)
                    head_error = _head_error(
                        hidden[:8], captured[1][selected][:8], logits[selected][:8], *head
                    )  # type: ignore[misc]
                m = slice(position, position + hidden.shape[0])
                arrays["columns"][m] = (selected[1] - starts[selected[0]]).cpu().numpy()
                arrays["hidden"][m] = _to_numpy(hidden)
                position += hidden.shape[0]
                selected = selected[0][:0], selected[1][:0]
            # a few positions at a time: no float32 copy of the whole (batch, seq, vocab) logits
            step_rows = max(1, _CHUNK_ELEMENTS // vocab)
            for lo in range(0, selected[0].numel(), step_rows):
                at = selected[0][lo : lo + step_rows], selected[1][lo : lo + step_rows]
                log_probs = F.log_softmax(logits[at].float() / temperature, dim=-1)
                values, indices = log_probs.topk(top_k, dim=-1)
                rest = (1.0 - values.double().exp().sum(-1)).clamp(min=1e-30)  # the teacher's tail mass
                m = slice(position, position + values.shape[0])
                arrays["columns"][m] = (at[1] - starts[at[0]]).cpu().numpy()
                arrays["top_values"][m] = values.cpu().numpy()
                arrays["top_indices"][m] = indices.cpu().numpy()
                arrays["top_tail"][m] = rest.log().float().cpu().numpy()
                position += values.shape[0]
            if "full" in arrays:
                rows_with, cols = full.nonzero(as_tuple=True)
                target = filled + rows_with.cpu().numpy()
                log_probs = F.log_softmax(logits[rows_with, cols].float() / temperature, dim=-1)
                arrays["full"][target] = log_probs.to(torch.float16).cpu().numpy()
                arrays["full_column"][target] = (cols - starts[rows_with]).cpu().numpy()
            del logits
            if "heads" in arrays and head_outputs is not None:
                rows_with = prompt_end.any(1).nonzero().squeeze(1)
                stacked = torch.stack([head_outputs[tuple(h)] for h in heads], 1)  # (rows, heads, head_dim)
                arrays["heads"][filled + rows_with.cpu().numpy()] = stacked.float().cpu().numpy()
            filled += len(chunk)
            captured.clear()  # the pass's tensors go before the next pass
        bar.close()
    if head is not None and rank == 0:  # once, in part 0, in the hidden states' dtype
        dtype = dtype or head[0].dtype
        for name, tensor in zip(("head_weight", "head_bias"), head, strict=True):
            if tensor is not None:
                array(name, tuple(tensor.shape), _numpy_dtype(dtype))[:] = _to_numpy(tensor.to(dtype))
    if position != offsets[-1]:  # the collated rows differ from the counting pass: a random collator
        raise InvalidInputError(
            "the training rows changed between two passes of the collator (it changes rows at random): the "
            "precomputed teacher needs a deterministic collator; use the live teacher"
        )
    for name, a in arrays.items():
        a.flush()
        _check_finite(name, a, dtype)
    shapes = {name: list(a.shape) for name, a in arrays.items()}
    return {
        "vocab": vocab, "shapes": shapes, "hidden_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "head_error": head_error or 0.0, "head_digest": None if head is None else _head_digest(*head),
    }  # fmt: skip


def _check_finite(name: str, array: np.ndarray, dtype: torch.dtype | None) -> None:
    """Refuse a teacher whose pass gave NaN or +inf (log-probabilities may be -inf), a block of
    rows at a time: a store is never written with values that would turn training into NaN."""
    if array.dtype.kind not in "fu" or name in ("offsets", "keys"):
        return
    bits = array.dtype == np.uint16  # bfloat16 stored as its bits
    if bits and dtype != torch.bfloat16:
        return
    for lo in range(0, len(array), 4096):
        block = torch.from_numpy(np.ascontiguousarray(array[lo : lo + 4096]))
        block = block.view(torch.bfloat16) if bits else block
        bad = block.isnan() | (block == float("inf"))
        if name not in ("full", "top_values"):
            bad |= block == float("-inf")
        if bool(bad.any()):
            raise InvalidInputError(
                f"the teacher's pass gave non-finite values (NaN or inf) in its {name}: the model before training, with "
                "its IVs added, cannot serve as a teacher. Check the model in its dtype (float16 overflows: use "
                "bfloat16 or float32) and the IVs' strength (teacher_iv_strength)"
            )


def _check_space(folder: Path, size: int) -> None:
    """Refuse, before the pass writes anything, a store that the disk cannot hold (the files are
    sparse until written)."""
    free = shutil.disk_usage(folder).free
    if size > free:
        raise InvalidInputError(
            f"the precomputed teacher needs {size / 1e6:.1f} MB in {folder.parent} but {free / 1e6:.1f} MB is "
            "free: point teacher_cache_dir at a larger disk, store less (a smaller teacher_top_k, or KL at fewer "
            "positions), or use the live teacher"
        )
    logger.info("precomputed teacher: writing %.1f MB in %s", size / 1e6, folder.parent)


def _hidden_states(captured: list[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """The LM head's input of the teacher's pass, checked to be one per position."""
    if len(captured) != 2 or captured[0].shape[:-1] != logits.shape[:-1]:
        raise InvalidInputError(
            "teacher_top_k=0 stores the input of the model's LM head, but the teacher's pass did not call its "
            f"output embeddings once on every position ({len(captured) // 2} calls): use teacher_top_k >= 1"
        )
    return captured[0].detach()


# the stored head applied again may differ from the pass's own by its precision (a bf16 autocast
# pass against float32 hidden states), never by more
_HEAD_TOLERANCE = 0.02


def _head_error(
    hidden: torch.Tensor,
    head_output: torch.Tensor,
    logits: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> float:
    """How far the stored head applied to ``hidden`` is from the head's own output in the pass,
    relative to the logits' scale; raises when the model's ``logits`` are not that output (a final
    soft-cap, a scale) or the stored head is not the one the pass ran."""
    scale = max(float(logits.float().abs().max()), 1e-6)
    changed = float((head_output.float() - logits.float()).abs().max()) / scale
    if changed > 1e-6:
        raise InvalidInputError(
            f"the model changes its LM head's output before returning logits (by {changed:.2g} relative: a final "
            "soft-cap or scale), so teacher_top_k=0 cannot rebuild them from hidden states: use teacher_top_k >= 1"
        )
    again = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)).float()
    error = float((again - head_output.float()).abs().max()) / scale
    if not error <= _HEAD_TOLERANCE:
        raise InvalidInputError(
            f"the LM head's weights ({tuple(weight.shape)}) do not compute its output (off by {error:.2g} relative): "
            "an output-embeddings module teacher_top_k=0 cannot store; use teacher_top_k >= 1"
        )
    return error
