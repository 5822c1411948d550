"""The flags several commands share, declared once."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser

from ivtrainer.errors import InvalidInputError

__all__ = [
    "CommandParser",
    "HubArguments",
    "ModelArguments",
    "OverwriteArguments",
    "default_of",
    "read_config",
    "split_list",
]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the help already says it, there is none, or
    the flag is a switch (``--no_calibrate``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help = action.help or ""
        if "(default" in help or action.default is None or action.nargs == 0:
            return help
        return super()._get_help_string(action)


class CommandParser(HfArgumentParser):
    """A subcommand's parser: flags from dataclasses (HfArgumentParser), defaults shown in ``--help``."""

    def __init__(self, dataclass_types: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(dataclass_types, **kwargs)
        self.add_argument(
            "--config",
            metavar="FILE",
            help="a YAML or JSON file of this command's flags, named as below (n_heads: 10); flags on the "
            "command line override it",
        )

    def error(self, message: str) -> NoReturn:
        """A bad flag or value is one line (``ivtrainer CMD: error: ...``, exit 2), as every other
        input error, not argparse's usage block."""
        raise InvalidInputError(f"{message} (see --help)")

    def config_args(self, path: str, given: Sequence[str]) -> list[str]:
        """The flags a ``--config`` file holds, as command-line tokens (so that argparse converts and
        checks them as it does flags), leaving out those ``given`` on the command line (they win).
        An unknown key is refused with the closest flag, before any work."""
        values = read_config(path)
        actions: dict[str, argparse.Action] = {}
        for action in self._actions:  # a switch's --no_ form comes after its flag: the flag wins
            if action.dest not in ("help", "config") and action.option_strings:
                actions.setdefault(action.dest, action)
        on_command_line = {
            self._option_string_actions[token.split("=", 1)[0]].dest
            for token in given
            if token.startswith("--") and token.split("=", 1)[0] in self._option_string_actions
        }
        tokens: list[str] = []
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in actions:
                close = difflib.get_close_matches(dest, list(actions), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; the keys are {sorted(actions)}"
                raise InvalidInputError(f"{path}: unknown key {key!r}{hint}")
            if dest in on_command_line or value is None:
                continue
            if isinstance(value, dict):
                raise InvalidInputError(f"{path}: {key!r} is a mapping; give a value or a list")
            option = f"--{dest}"
            if isinstance(value, bool):
                tokens += [option, str(value).lower()]
            elif isinstance(value, list):
                tokens += [option, *(str(v) for v in value)]
            else:
                tokens += [option, str(value)]
        return tokens


def config_path(tokens: Sequence[str]) -> str | None:
    """The ``--config FILE`` among a command's tokens (``--config FILE`` or ``--config=FILE``)."""
    for i, token in enumerate(tokens):
        if token == "--config" and i + 1 < len(tokens):
            return tokens[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def read_config(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if file.is_dir():
        raise InvalidInputError(f"--config {path} is a folder: give the YAML or JSON file in it")
    if not file.is_file():
        raise InvalidInputError(f"--config {path}: no such file")
    try:
        text = file.read_text()
        values = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise InvalidInputError(
            f"--config {path}: not a readable YAML or JSON file ({type(exc).__name__})"
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InvalidInputError(
            f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}"
        )
    return values


@dataclasses.dataclass
class ModelArguments:
    model: str = dataclasses.field(
        default="default",
        metadata={
            "help": "'default' (the embedded SmolLM2-135M-Instruct), a Hub id, a local folder or a .gguf file"
        },
    )


@dataclasses.dataclass
class OverwriteArguments:
    overwrite: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "replace an output that an earlier ivtrainer run wrote (a non-empty --out folder, a --json "
            "file); never other files or folders"
        },
    )


@dataclasses.dataclass
class HubArguments:
    push_to_hub: str | None = dataclasses.field(
        default=None, metadata={"help": "also upload the result to this Hub repo", "metavar": "REPO"}
    )


def split_list(value: str | None) -> list[str]:
    """A comma-separated flag's items, blanks dropped."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def default_of(function: Callable, name: str) -> Any:
    """The default of ``function``'s parameter ``name``: a flag's default read from the library,
    not typed again."""
    return inspect.signature(function).parameters[name].default
