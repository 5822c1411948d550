"""Model folders read one tensor at a time: local folders or Hub snapshots, their weight maps and
safetensors shard headers, without loading a model."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ivtrainer.errors import InputNotFoundError, InvalidInputError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_tensor(f, info: dict, start: int) -> torch.Tensor:
    """One tensor, read with plain file I/O: no mmap, so only this tensor is resident."""
    begin, end = info["data_offsets"]
    f.seek(start + begin)
    buffer = bytearray(end - begin)
    if f.readinto(buffer) != len(buffer):
        raise InvalidInputError(f"{f.name} is truncated: a tensor ends past the end of the file")
    dtype = _DTYPES[info["dtype"]]
    if not buffer:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"])


def weight_map(folder: Path) -> dict[str, str]:
    """tensor name -> shard file name."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = folder / "model.safetensors"
    if single.is_file():
        return dict.fromkeys(read_header(single)[0], "model.safetensors")
    raise InvalidInputError(
        f"{folder} has no model.safetensors(.index.json); re-save it with model.save_pretrained(dir) "
        "(safetensors is the default)"
    )


def model_folder(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    from ivtrainer.hub.push import looks_like_path, split_revision
    from ivtrainer.modeling.loading import DEFAULT_MODEL, default_model_path

    name = os.fspath(name_or_path)
    if name == DEFAULT_MODEL:
        return default_model_path()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    name, pinned = split_revision(name)
    revision = revision or pinned
    if path.exists() or looks_like_path(name):
        raise InputNotFoundError(
            f"{name!r} is {'a file' if path.exists() else 'not an existing folder'}; pass a model folder or a Hub id"
        )
    from huggingface_hub import snapshot_download

    try:  # one commit of `revision` for every file
        return Path(
            snapshot_download(
                name,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        )
    except Exception as exc:
        raise InvalidInputError(
            f"cannot find model {name!r}: not a local folder, and the Hub download failed ({type(exc).__name__})"
        ) from None


class FolderTensors(Mapping):
    """Tensors of a safetensors model folder, read on access."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.map = folder, weight_map(folder)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.folder / self.map[name], framework="pt") as f:
            return f.get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self.map

    def __iter__(self):
        return iter(self.map)

    def __len__(self) -> int:
        return len(self.map)
