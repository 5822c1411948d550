"""The ``ivtrainer`` command: one entry point, one module per subcommand.

Each command's flags are made from dataclasses with ``transformers.HfArgumentParser`` (as trl's
scripts are): the library's configs (:class:`~ivtrainer.steering.extraction_config.ExtractionConfig`,
the continual settings, the demo plan) give the defaults, the flags several commands share are
declared once in :mod:`ivtrainer.cli.common`, and each module's ``main`` takes the parsed
dataclasses. Flags are written ``--n_heads`` or ``--n-heads``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Sequence

from ivtrainer.cli import (
    analyze,
    continual,
    demo,
    evaluate_edits,
    extract_heads,
    extract_iv,
    forget,
    info,
    lm_eval_tasks,
    train,
)
from ivtrainer.cli.common import CommandParser, config_path
from ivtrainer.errors import InvalidInputError, IVTrainerError
from ivtrainer.version import __version__

__all__ = ["main", "make_parser", "parse"]

# subcommand -> its module, in the order `ivtrainer --help` lists them
COMMANDS = {
    "train": train,
    "demo": demo,
    "continual": continual,
    "info": info,
    "lm-eval-tasks": lm_eval_tasks,
    "extract-iv": extract_iv,
    "extract-heads": extract_heads,
    "forget": forget,
    "evaluate-edits": evaluate_edits,
    "analyze": analyze,
}


def make_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``ivtrainer`` parser. ``train``'s flags depend on its trainer (``--trainer``, or its
    ``--config`` file's ``trainer:``) and import the training stack, so they are built only when
    ``argv`` runs ``train``."""
    parser = argparse.ArgumentParser(
        prog="ivtrainer",
        description="Instruction-vector-guided training and F-Learning for Hugging Face models.",
    )
    parser.add_argument("--version", action="version", version=f"ivtrainer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of input errors too")
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    command, rest = _command(argv or [])
    for module in COMMANDS.values():
        if module is train:
            train.make_parser(subparsers, rest if command == "train" else None)
        else:
            module.make_parser(subparsers)
    return parser


def _command(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The subcommand ``argv`` runs and the tokens after it."""
    at = next((i for i, token in enumerate(argv) if token in COMMANDS), None)
    return (None, []) if at is None else (argv[at], list(argv[at + 1 :]))


def _dataclasses(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> list:
    """The command's dataclasses from the parsed flags (what HfArgumentParser.parse_args_into_dataclasses
    does, for a subcommand); their own checks run here, before any work."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command: CommandParser = sub.choices[namespace.command]
    values = vars(namespace)
    out = []
    for dtype in command.dataclass_types:
        try:
            out.append(dtype(**{f.name: values[f.name] for f in dataclasses.fields(dtype) if f.init}))
        except IVTrainerError:
            raise
        except ValueError as exc:  # a config's own rule (TrainingArguments'): one line, as ours are
            raise InvalidInputError(" ".join(str(exc).split())) from None
    return out


def _with_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with the flags of the command's ``--config`` file put before its own (which win)."""
    command = next((token for token in argv if token in COMMANDS), None)
    if command is None:
        return argv
    at = argv.index(command)
    rest = argv[at + 1 :]
    path = config_path(rest)
    if path is None:
        return argv
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command_parser: CommandParser = sub.choices[command]
    return [*argv[: at + 1], *command_parser.config_args(path, rest), *rest]


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list]:
    """The command's namespace and its dataclasses, from ``argv`` and its ``--config`` file."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(tokens)
    namespace, unknown = parser.parse_known_args(_with_config(parser, tokens))
    if unknown:  # one line with the closest flag, as an unknown --config key gets
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        flags = list(sub.choices[namespace.command]._option_string_actions)
        given = next((t for t in unknown if t.startswith("-")), unknown[0])
        close = difflib.get_close_matches(given.split("=", 1)[0], flags, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (see --help)"
        raise InvalidInputError(f"unrecognized argument {given!r}{hint}")
    return namespace, _dataclasses(parser, namespace)


def main(argv: Sequence[str] | None = None) -> int:
    tokens = list(sys.argv[1:] if argv is None else argv)
    command = next((token for token in tokens if token in COMMANDS), "")
    try:
        namespace, arguments = parse(tokens)
    except IVTrainerError as exc:  # a --config file or a dataclass's own check: nothing ran yet
        if "--debug" in tokens[: tokens.index(command) if command else None]:
            raise
        print(f"ivtrainer {command}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[namespace.command].main(*arguments)
    except IVTrainerError as exc:
        # Bad input: one line naming the problem and the fix. Anything else is a bug: a traceback.
        if namespace.debug:
            raise
        print(f"ivtrainer {namespace.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ivtrainer {namespace.command}: interrupted", file=sys.stderr)
        return 130
