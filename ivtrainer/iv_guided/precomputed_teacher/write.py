"""The precomputed teacher's write pass: one no-grad pass of the live teacher over the training set
before the first step, each process writing its share of the rows into one folder (accelerate's
process state, broadcast and gather), checked for non-finite values and free disk before
anything is kept."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn
from transformers.utils import logging

from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.precomputed_teacher.cache import claim, publish
from ivtrainer.iv_guided.precomputed_teacher.keys import _attended, _digest, _starts, row_keys, stored_masks
from ivtrainer.iv_guided.precomputed_teacher.store import (
    FORMAT,
    TeacherPass,
    TeacherStore,
    _file_digest,
    _head_digest,
    _head_parameters,
    _numpy_dtype,
    _to_numpy,
    _whole,
)
from ivtrainer.modeling.hooks import hooks
from ivtrainer.steering.intervention import last_prompt_positions

__all__ = ["precompute_teacher"]

logger = logging.get_logger(__name__)

# a mean top-k tail mass above this is pointed out in the log (the coarsened KL misses its shape)
_TAIL_NOTE = 0.05
# elements of float32 log-probabilities computed at once while storing (16 MiB)
_CHUNK_ELEMENTS = 1 << 22


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
    state = PartialState()
    rank, world = state.process_index, state.num_processes
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
    folder = root / name
    # the main process decides: reuse a complete store, or compute a new one (the others follow)
    claimed = claim(root, name, components, compute=compute, prune=prune) if state.is_main_process else None
    decision, tmp = broadcast_object_list([claimed])[0]
    if decision == "missing":
        raise InvalidInputError(
            f"the precomputed teacher of this run is missing, stale or damaged in {root} (resuming full fine-tuning: "
            "the model has been trained, so the teacher cannot be computed from it again). Restore the folder the "
            "first run wrote, or start the run over"
        )
    if decision == "reuse":
        store = TeacherStore.load(folder, components)
        if state.is_main_process:
            logger.warning(
                "precomputed teacher reused: %s (%d rows, %.1f MB)",
                folder,
                len(store.keys),
                store.n_bytes / 1e6,
            )
        return store

    state.wait_for_everyone()
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
    all_shapes = gather_object([shapes])  # one per process, in rank order
    if state.is_main_process:
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
        publish(tmp, folder)
    state.wait_for_everyone()
    store = TeacherStore.load(folder, components)
    if state.is_main_process:
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
            # the exact store keeps the LM head's input: once its check is done, the pass ends there
            logits: Any  # None from a pass that ended before the LM head
            logits, head_outputs = teacher(
                input_ids, attention_mask, prompt_end, logits=top_k > 0 or head_error is None
            )
            bar.update()
            if not chunk:
                captured.clear()
                continue
            if vocab is None:
                vocab = logits.shape[-1]  # the first pass has logits
                if top_k >= vocab:
                    raise InvalidInputError(
                        f"teacher_top_k ({top_k}) must be smaller than the vocabulary ({vocab})"
                    )
                n = int(offsets[-1])
                array("columns", (n,), np.int32)
                if top_k == 0:
                    hidden = _hidden_states(captured, logits, input_ids)
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
                hidden = _hidden_states(captured, logits, input_ids)[selected]
                if head_error is None and hidden.shape[0]:  # the logits: the head's output, nothing more
                    head_error = _head_error(
                        hidden[:8],
                        captured[1][selected][:8],
                        logits[selected][:8],
                        *head,  # type: ignore[misc]
                    )
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


def _hidden_states(
    captured: list[torch.Tensor], logits: torch.Tensor | None, input_ids: torch.Tensor
) -> torch.Tensor:
    """The LM head's input of the teacher's pass (which ran the head when it returned ``logits``,
    else ended before it), checked to be one per position."""
    calls = 2 if logits is not None else 1
    if len(captured) != calls or captured[0].shape[:-1] != input_ids.shape:
        raise InvalidInputError(
            "teacher_top_k=0 stores the input of the model's LM head, but the teacher's pass did not call its "
            f"output embeddings once on every position ({len(captured) / calls:g} calls): use teacher_top_k >= 1"
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
