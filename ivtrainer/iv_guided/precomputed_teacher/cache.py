"""Where precomputed teachers live and how a store comes and goes: the cache folder's checks, the
main process's decision (reuse a store, or claim a temporary folder to write one), stale and
abandoned stores removed, a finished store published by a rename."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging

from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.precomputed_teacher.keys import _describe_change
from ivtrainer.iv_guided.precomputed_teacher.store import DamagedStoreError, TeacherStore
from ivtrainer.utils.outputs import sweep_stale

__all__ = ["CACHE_FOLDER", "check_cache_dir", "claim", "publish"]

logger = logging.get_logger(__name__)

CACHE_FOLDER = "_ivtrainer_teacher"
# a store folder's name: its fingerprint's digest; a killed precompute's: ".<name>.tmp-<pid>-<random>"
_STORE_NAME = re.compile(r"[0-9a-f]{20}")
_TMP_NAME = re.compile(r"\.([0-9a-f]{20})\.tmp(-.*)?")


def claim(
    root: Path, name: str, components: dict[str, str], *, compute: bool, prune: bool
) -> tuple[str, Path | None]:
    """The main process's decision for the store ``root / name``: ``("reuse", None)`` when a
    complete one matches, ``("compute", tmp)`` with a fresh temporary folder to write it in (stale
    stores and abandoned temporary folders removed first), or ``("missing", None)`` when it must
    be computed but ``compute`` is False."""
    _check_cache_folder(root)
    folder = root / name
    if folder.is_dir():
        try:
            TeacherStore.load(folder, components)
            return "reuse", None
        except DamagedStoreError as exc:
            logger.warning("teacher cache %s is damaged (%s): recomputing it", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    if not compute:
        return "missing", None
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
    return "compute", Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=root))


def publish(tmp: Path, folder: Path) -> None:
    """A finished store, renamed into place (or another run's, written there meanwhile)."""
    try:
        os.rename(tmp, folder)
    except OSError:  # another run sharing the folder wrote the same store first: read theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            raise
        logger.warning("precomputed teacher: %s was written by another run meanwhile; using it", folder)


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
