"""Reading artifacts from a local folder or one commit of a Hub repo: the one resolver behind every
``from_pretrained`` of ivtrainer's own artifacts (instruction vectors, head sets)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ivtrainer.errors import InputNotFoundError
from ivtrainer.hub.push import looks_like_path, split_revision

__all__ = ["artifact_folder", "read_artifact", "write_artifact"]


def artifact_folder(
    path_or_repo_id: str | os.PathLike,
    files: list[str],
    what: str,
    *,
    hint: str = "",
    revision: str | None = None,
    token: str | None = None,
) -> Path:
    """The folder holding ``files``: a local folder, or a snapshot of a Hub repo (``id@rev`` takes
    a revision; all files from one commit). A path-like name that does not exist is an error,
    never a download; so is a folder without ``files``. ``what`` names the artifact in messages,
    ``hint`` (in parentheses, with a trailing space) says where one comes from."""
    where = os.fspath(path_or_repo_id)
    repo, pinned = split_revision(where)
    revision = revision or pinned
    path = Path(where).expanduser()
    if path.is_dir():
        folder = path
    elif path.exists() or looks_like_path(where):
        raise InputNotFoundError(
            f"{where!r} is {'a file' if path.exists() else 'not an existing folder'}; pass {what} folder "
            f"{hint}or a Hub id"
        )
    else:
        from huggingface_hub import snapshot_download

        try:  # one call: the revision is resolved to one commit for every file
            folder = Path(snapshot_download(repo, revision=revision, token=token, allow_patterns=files))
        except Exception as exc:
            raise InputNotFoundError(
                f"cannot load {what} from {where!r}: not a local folder, and the Hub download failed "
                f"({type(exc).__name__})"
            ) from None
    if not all((folder / f).is_file() for f in files):
        raise InputNotFoundError(f"{where} holds no {' + '.join(files)}: not {what} folder {hint}".rstrip())
    return folder


def write_artifact(
    out: str | os.PathLike,
    *,
    config_name: str,
    config: dict[str, Any],
    weights_name: str,
    tensors: dict[str, torch.Tensor],
    card: Any,
) -> Path:
    """``weights_name`` (safetensors, float32 on CPU), ``config_name`` (JSON) and ``README.md`` (a
    ``huggingface_hub.ModelCard``) in ``out``, each written to a temporary name and renamed."""
    from safetensors.torch import save_file

    from ivtrainer.utils.outputs import atomic_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / weights_name) as tmp:
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"format": "pt"},
        )
    with atomic_file(folder / config_name) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    with atomic_file(folder / "README.md") as tmp:
        card.save(str(tmp))
    return folder


def read_artifact(
    folder: Path,
    *,
    config_name: str,
    weights_name: str,
    format_version: int,
    what: str,
    where: str,
    error: type[Exception],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON config (without its version fields) and the tensors; a corrupt file, another
    format version or a non-object config raise ``error`` with one line naming ``where``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / config_name).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{where}: {config_name} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise error(f"{where}: {config_name} must hold a JSON object")
    if config.get("format_version") != format_version:
        raise error(
            f"{where}: unsupported {what} format {config.get('format_version')!r} (this ivtrainer reads {format_version})"
        )
    try:
        tensors = load_file(folder / weights_name)
    except (SafetensorError, OSError, ValueError) as exc:
        raise error(f"{where}: {weights_name} cannot be read ({exc})") from None
    config.pop("format_version")
    config.pop("ivtrainer_version", None)
    return config, tensors
