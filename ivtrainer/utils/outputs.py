"""Writing results safely: which output folders are allowed, atomic folders and files, scratch space.

One rule for every command that writes a folder (``extract-iv``, ``forget``, ``analyze``, ``demo``):

- ``--out`` may not be, contain or lie inside any input, and may not be (or contain) the home
  directory, the filesystem root or the current directory;
- an empty or missing folder is written without ``--overwrite``; a non-empty one only with
  ``--overwrite``, and only if ivtrainer wrote it (it holds :data:`MARKER`);
- the folder is written under a temporary name next to it and renamed into place, so an
  interrupted run leaves the old folder (or nothing) behind; a symlinked ``--out`` keeps its link
  (the folder it points to is replaced);
- temporary folders of runs that were killed (their process is gone) are swept on the next run.

Folders and files get the user's umask (``tempfile`` alone would make them private), so a shared
cache or output folder works for a group.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ivtrainer.errors import IVTrainerError

__all__ = [
    "MARKER",
    "OutputExistsError",
    "OutputFolderError",
    "apply_umask",
    "atomic_dir",
    "atomic_file",
    "check_output_dir",
    "check_output_file",
    "scratch_dir",
    "sweep_stale",
]

#: The file that marks a folder as written by ivtrainer (what ``--overwrite`` may replace).
MARKER = ".ivtrainer-output.json"


class OutputFolderError(IVTrainerError, ValueError):
    """An output path that must not be written: it would destroy an input or someone's files."""


class OutputExistsError(OutputFolderError, FileExistsError):
    """The output exists, and replacing it was not asked for (or is not allowed)."""


def _protected() -> list[tuple[Path, str]]:
    return [(Path.home().resolve(), "the home directory"), (Path.cwd().resolve(), "the current directory")]


def _input_paths(inputs: Iterable[str | os.PathLike | None]) -> list[tuple[Path, str]]:
    """The inputs that are local paths (Hub ids and ``"default"`` are not), resolved."""
    out = []
    for item in inputs:
        if item is None or isinstance(item, (int, float)) or not isinstance(item, (str, os.PathLike)):
            continue
        path = Path(item).expanduser()
        if path.exists():
            out.append((path.resolve(), f"the input {os.fspath(item)}"))
    return out


def _check_clear_of(resolved: Path, shown: str, inputs: Iterable, flag: str) -> None:
    if resolved == Path(resolved.anchor):
        raise OutputFolderError(f"{flag} {shown} is the filesystem root; choose a new folder")
    for path, what in _protected():
        if resolved == path or path.is_relative_to(resolved):
            raise OutputFolderError(
                f"{flag} {shown} {'is' if resolved == path else 'contains'} {what}; choose a new folder"
            )
    for path, what in _input_paths(inputs):
        if resolved == path or path.is_relative_to(resolved) or resolved.is_relative_to(path):
            relation = (
                "is" if resolved == path else "contains" if path.is_relative_to(resolved) else "lies inside"
            )
            raise OutputFolderError(f"{flag} {shown} {relation} {what}; write the result somewhere else")


def check_output_dir(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    flag: str = "--out",
    overwrite_flag: str = "--overwrite",
) -> Path:
    """The resolved folder to write, after every check; raises :class:`OutputFolderError`.

    Call it before any work: it looks only at paths. ``flag`` and ``overwrite_flag`` name the
    arguments in messages (``"out_dir"`` and ``"overwrite=True"`` from Python).
    """
    shown = os.fspath(out)
    if not shown:
        raise OutputFolderError(f"{flag} is empty; name a folder")
    resolved = Path(out).expanduser().resolve()
    if resolved.exists() and not resolved.is_dir():
        raise OutputFolderError(f"{flag} {shown} is a file; choose a folder")
    _check_clear_of(resolved, shown, inputs, flag)
    if resolved.is_dir() and any(resolved.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"{flag} {shown} exists and is not empty; choose another or pass {overwrite_flag}"
            )
        if not (resolved / MARKER).is_file():
            raise OutputExistsError(
                f"{flag} {shown} was not written by ivtrainer (no {MARKER}), so {overwrite_flag} will not replace "
                "it; choose another folder or remove it yourself"
            )
    return resolved


def check_output_file(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    flag: str = "--json",
) -> Path:
    """The resolved file to write: not a folder, not an input, existing only with ``overwrite``."""
    shown = os.fspath(out)
    resolved = Path(out).expanduser().resolve()
    if resolved.is_dir():
        raise OutputFolderError(f"{flag} {shown} is a folder; name a file")
    for path, what in _input_paths(inputs):
        if resolved == path or resolved.is_relative_to(path):
            raise OutputFolderError(f"{flag} {shown} would overwrite {what}; write the result somewhere else")
    if resolved.exists() and not overwrite:
        raise OutputExistsError(f"{flag} {shown} already exists; choose another file or pass --overwrite")
    return resolved


# -- permissions ---------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path, mode: int) -> None:
    """``mkdtemp``/``mkstemp`` create 0700/0600; give what a plain mkdir/open would."""
    with contextlib.suppress(OSError):
        os.chmod(path, mode & ~_umask())


def _apply_umask_tree(folder: Path) -> None:
    """Folders and files as a plain mkdir/open would make them: writers that go through
    ``mkstemp`` (some save functions do) leave 0600."""
    mask = _umask()
    for root, _dirs, files in os.walk(folder):
        with contextlib.suppress(OSError):
            os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, (0o777 if os.stat(path).st_mode & 0o100 else 0o666) & ~mask)


# -- stale temporaries -----------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def sweep_stale(folder: Path, prefix: str) -> None:
    """Delete ``folder/<prefix><pid>-*`` entries whose process is gone (left by a killed run)."""
    with contextlib.suppress(OSError):
        for item in folder.glob(f"{glob.escape(prefix)}*"):
            pid = item.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        item.unlink()


def _names(target: Path) -> tuple[str, str]:
    """The prefixes of ``target``'s temporary and moved-aside siblings (the pid follows)."""
    return f".{target.name}.tmp-", f".{target.name}.old-"


# -- atomic writes ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, marker: dict | None = None) -> Iterator[Path]:
    """A temporary folder next to ``target``, renamed onto it when the block succeeds.

    ``target`` is resolved first: a symlink keeps pointing where it did, at the new folder. An
    existing folder is moved aside, the new one renamed into place, then the old one deleted; on
    failure the temporary folder is removed and ``target`` is left as it was. With ``marker``, the
    folder gets :data:`MARKER` (these values, as JSON), so ``--overwrite`` may replace it later.
    Callers decide beforehand whether ``target`` may be replaced (:func:`check_output_dir`).
    """
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix, old_prefix = _names(target)
    sweep_stale(target.parent, tmp_prefix)
    sweep_stale(target.parent, old_prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{tmp_prefix}{os.getpid()}-", dir=target.parent))
    apply_umask(tmp, 0o777)
    try:
        yield tmp
        _apply_umask_tree(tmp)
        if marker is not None:
            from ivtrainer.version import __version__

            (tmp / MARKER).write_text(
                json.dumps({"ivtrainer_version": __version__, **marker}, indent=2) + "\n"
            )
        old = None
        if target.exists():
            old = target.with_name(f"{old_prefix}{os.getpid()}")
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``target``, renamed onto it when the block succeeds."""
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    sweep_stale(target.parent, prefix)
    fd, name = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    apply_umask(tmp, 0o666)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def scratch_dir(name: str = "ivtrainer") -> Iterator[Path]:
    """A scratch folder in the system temp directory, deleted on exit; those of killed runs are
    swept on the next call."""
    prefix = f"{name}-scratch-"
    root = Path(tempfile.gettempdir())
    sweep_stale(root, prefix)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-") as tmp:
        yield Path(tmp)
