"""The flags several commands share, declared once."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from transformers import HfArgumentParser

__all__ = [
    "CommandParser",
    "HubArguments",
    "ModelArguments",
    "OverwriteArguments",
    "default_of",
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
