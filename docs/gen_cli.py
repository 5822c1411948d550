"""Write docs/cli.md from the ``ivtrainer`` parser itself (``python docs/gen_cli.py``); a test
checks that the page is current."""

from __future__ import annotations

import argparse
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "cli.md"


def render() -> str:
    import os

    from ivtrainer.cli import make_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the page must not depend on it
    parser = make_parser()
    parser.prog = "ivtrainer"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = [
        "# The `ivtrainer` command\n",
        "One entry point, one subcommand per job. Every command checks its input before any work and "
        "fails with one line and exit code 2 ([bad input and safety](safety.md)); `--debug` shows the "
        "traceback. Each command's flags are made from dataclasses (`transformers.HfArgumentParser`, as "
        "trl's scripts): the library's configs give their defaults (`ExtractionConfig` for extract-iv and "
        "extract-heads, the continual settings, the demo plan), so the defaults below are the library's. "
        "A flag is written with underscores or dashes (`--n_heads`, `--n-heads`); a switch that is on by "
        "default has a `--no_` form (`--no-calibrate`). Every command takes `--config FILE`, a YAML or JSON "
        "file of its flags (keys named as the flags: `n_heads: 10`, lists as lists); flags on the command "
        "line override it, and an unknown key is refused with the closest flag. This page is generated from "
        "the parser "
        "(`python docs/gen_cli.py`).\n",
        "```text\n" + parser.format_help().rstrip() + "\n```\n",
    ]
    for name, command in sub.choices.items():
        parts.append(f"## `ivtrainer {name}`\n")
        parts.append("```text\n" + command.format_help().rstrip() + "\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
