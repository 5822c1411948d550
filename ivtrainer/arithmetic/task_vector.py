"""Task vectors on disk: ``theta - lam * (theta_ft - theta)`` streamed from two model folders into a
new one, shard by shard, one tensor in memory at a time."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ivtrainer.arithmetic.safetensors_files import model_folder, read_header, read_tensor, weight_map
from ivtrainer.arithmetic.subtraction import check_lambdas, finish_stats, record_change
from ivtrainer.errors import InvalidInputError
from ivtrainer.utils.outputs import atomic_dir, check_output_dir

_SKIP_FILES = {"README.md", "ivtrainer_source.json", ".gitattributes", ".ivtrainer-output.json"}


def subtract_task_vector(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    lam: float,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``theta - lam * (theta_ft - theta)`` as a model folder, one tensor in memory at a time.

    ``base`` and ``finetuned`` are ``"default"``, local folders or Hub ids with safetensors
    weights of identical names and shapes. The output keeps the base's shard layout, config,
    generation config and tokenizer, plus ``ivtrainer_task_vector.json`` recording the operation.
    It is written to a temporary folder and renamed into place; nothing is left on failure.
    ``out_dir`` follows :func:`ivtrainer.utils.outputs.check_output_dir` (never an input; an existing
    non-empty folder only with ``overwrite``, and only if ivtrainer wrote it).
    """
    (lam,) = check_lambdas([lam], 1)
    out = check_output_dir(
        out_dir,
        inputs=[base, finetuned],
        overwrite=overwrite,
        flag="out_dir",
        overwrite_flag="overwrite=True",
    )
    plan = task_vector_plan(base, finetuned)
    with atomic_dir(out, marker={"command": "subtract_task_vector"}) as tmp:
        write_task_vector(plan, lam, tmp)
    return out


def task_vector_plan(base: str | os.PathLike, finetuned: str | os.PathLike, **download) -> dict:
    """Both models' folders, weight maps and shard headers, checked to match (names and shapes)."""
    base_dir, ft_dir = model_folder(base, **download), model_folder(finetuned, **download)
    base_map, ft_map = weight_map(base_dir), weight_map(ft_dir)
    if base_map.keys() != ft_map.keys():
        only_base, only_ft = sorted(base_map.keys() - ft_map.keys()), sorted(ft_map.keys() - base_map.keys())
        raise InvalidInputError(
            f"the models have different tensors: only in base {only_base[:3]}, only in finetuned {only_ft[:3]}; "
            "a task vector needs two checkpoints of the same architecture"
        )
    ft_headers = {shard: read_header(ft_dir / shard) for shard in set(ft_map.values())}
    base_headers = {shard: read_header(base_dir / shard) for shard in set(base_map.values())}
    for name, shard in base_map.items():
        b, f = base_headers[shard][0][name], ft_headers[ft_map[name]][0][name]
        if b["shape"] != f["shape"]:
            raise InvalidInputError(f"{name} has shape {b['shape']} in base but {f['shape']} in finetuned")
    return {"base": os.fspath(base), "finetuned": os.fspath(finetuned), "base_dir": base_dir, "ft_dir": ft_dir,
            "ft_map": ft_map, "ft_headers": ft_headers, "base_headers": base_headers}  # fmt: skip


def write_task_vector(plan: dict, lam: float, folder: Path, stats: dict[str, float] | None = None) -> None:
    """Stream ``theta - lam * (theta_ft - theta)`` into ``folder`` (shards, config, tokenizer,
    ``ivtrainer_task_vector.json``); ``plan`` from :func:`task_vector_plan`."""
    base_dir, ft_dir, ft_map, ft_headers = (
        plan["base_dir"],
        plan["ft_dir"],
        plan["ft_map"],
        plan["ft_headers"],
    )
    handles = {shard: open(ft_dir / shard, "rb") for shard in ft_headers}  # noqa: SIM115 - closed below
    try:
        for shard, (header, start) in tqdm(
            sorted(plan["base_headers"].items()), desc="task vector", unit="shard"
        ):
            with open(base_dir / shard, "rb") as fb:
                _write_shard(folder / shard, header, start, fb, ft_map, ft_headers, handles, lam, stats)
    finally:
        for handle in handles.values():
            handle.close()
    for item in base_dir.iterdir():
        if item.is_file() and item.name not in _SKIP_FILES and not item.name.endswith(".safetensors"):
            shutil.copy2(item, folder / item.name)
    record = {"operation": "theta - lam * (theta_finetuned - theta)", "lam": lam,
              "base": plan["base"], "finetuned": plan["finetuned"]}  # fmt: skip
    (folder / "ivtrainer_task_vector.json").write_text(json.dumps(record, indent=2) + "\n")
    finish_stats(stats)


def _write_shard(
    path: Path, header: dict, start: int, fb, ft_map, ft_headers, handles, lam: float, stats=None
) -> None:
    """Stream one output shard: the header first (shapes and dtypes are known), then each tensor."""
    names = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    out_header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        size = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
        out_header[name] = {
            "dtype": header[name]["dtype"],
            "shape": header[name]["shape"],
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(out_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            theta = read_tensor(fb, header[name], start)
            shard = ft_map[name]
            tuned = read_tensor(handles[shard], ft_headers[shard][0][name], ft_headers[shard][1])
            if theta.is_floating_point():
                theta32 = theta.float()
                result = (theta32 - lam * (tuned.float() - theta32)).to(theta.dtype)
                record_change(stats, theta32, result.float())
            else:  # integer buffers are not parameters: keep the base's
                result = theta
            f.write(result.contiguous().reshape(-1).view(torch.uint8).numpy().data)
