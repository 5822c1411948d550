"""Training data as users have it: a dataset on the Hub or in a local folder (``dataset_name``,
through ``datasets.load_dataset``) or local JSON / JSONL / CSV / parquet files (``data_files``).
Every problem is one :class:`~ivtrainer.errors.InvalidInputError` naming the fix, raised before
any model is loaded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ivtrainer.errors import InvalidInputError

__all__ = ["BUILDERS", "load_split"]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No ``datasets`` progress bars while a split loads: small local files load in a blink, and an
    error must be the only line a user sees."""
    import datasets

    if datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


#: file suffix -> the ``datasets`` builder that reads it
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _builder(files: Sequence[str], flag: str) -> tuple[str, list[str]]:
    paths = []
    for given in files:
        path = Path(given).expanduser()
        if path.is_dir():
            raise InvalidInputError(
                f"{flag} {given!r} is a folder: give the files in it, or the folder as the dataset name "
                f"({flag.replace('data_files', 'dataset_name')} {given})"
            )
        if not path.is_file():
            raise InvalidInputError(f"{flag} {given!r}: no such file")
        if path.suffix.lower() not in BUILDERS:
            raise InvalidInputError(
                f"{flag} {given!r}: unknown file type {path.suffix or '(none)'!r}; give {', '.join(BUILDERS)} files"
            )
        if not path.read_bytes().strip():
            raise InvalidInputError(f"{flag} {given!r} is empty: it has no rows")
        paths.append(str(path.resolve()))
    kinds = {BUILDERS[Path(p).suffix.lower()] for p in paths}
    if len(kinds) > 1:
        raise InvalidInputError(f"{flag} mixes file types ({', '.join(sorted(kinds))}): give one type")
    return kinds.pop(), paths


def load_split(
    name: str | None,
    files: Sequence[str] | None,
    *,
    config: str | None = None,
    split: str = "train",
    what: str = "dataset",
) -> Any:
    """One split of a dataset: ``name`` (a Hub id or a local folder, with ``config``) or
    ``files`` (their rows are the ``train`` split). ``what`` names the flags in errors (``dataset``
    or ``old_dataset``). The split must exist and hold rows."""
    name_flag, files_flag = f"--{what}_name", f"--{what.replace('dataset', 'data')}_files"
    if name and files:
        raise InvalidInputError(f"{name_flag} and {files_flag} both given: give one source of the data")
    if not name and not files:
        raise InvalidInputError(
            f"no data: give {name_flag} (a Hub id or a folder) or {files_flag} (local files)"
        )
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    if files:
        builder, paths = _builder(files, files_flag)
        if split != "train":
            raise InvalidInputError(
                f"{files_flag} hold one split, 'train' ({split!r} asked): for more splits give "
                f"{name_flag} a folder with train/test files"
            )
        try:
            with _quiet():
                loaded = load_dataset(builder, data_files={"train": paths})
        except Exception as exc:  # what datasets raises for a malformed file varies by builder
            cause = exc.__cause__ if isinstance(exc, DatasetGenerationError) and exc.__cause__ else exc
            raise InvalidInputError(
                f"{files_flag}: cannot read {', '.join(files)} as {builder} ({type(cause).__name__}: "
                f"{str(cause).splitlines()[0][:200] if str(cause) else ''})"
            ) from None
        source = ", ".join(files)
    else:
        assert name is not None
        path = Path(name).expanduser()
        if path.is_file():
            raise InvalidInputError(f"{name_flag} {name!r} is a file: give it as {files_flag} {name}")
        local = path.is_dir() or name.startswith((".", "/", "~"))
        if local and not path.is_dir():
            raise InvalidInputError(f"{name_flag} {name!r}: no such folder")
        try:
            with _quiet():
                loaded = load_dataset(str(path) if local else name, name=config)
        except Exception as exc:  # the Hub, offline or a wrong id: one line, not datasets' traceback
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            hint = "" if local else "; check the id and that the Hub is reachable (offline: give data_files)"
            raise InvalidInputError(f"{name_flag} {name!r}: cannot load it ({reason}){hint}") from None
        source = name
    if split not in loaded:
        raise InvalidInputError(
            f"{source}: no split {split!r}; it has {sorted(loaded)} (set --dataset_train_split / "
            "--dataset_test_split)"
        )
    dataset = loaded[split]
    if len(dataset) == 0:
        raise InvalidInputError(f"{source}: the {split!r} split has no rows")
    return dataset
