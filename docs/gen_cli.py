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
        "line override it, and an unknown key, like an unknown flag, is refused with the closest flag. This page is generated from "
        "the parser "
        "(`python docs/gen_cli.py`).\n",
        "```text\n" + parser.format_help().rstrip() + "\n```\n",
    ]
    for name, command in sub.choices.items():
        parts.append(f"## `ivtrainer {name}`\n")
        if name == "train":  # its flags are the chosen trainer's config's: hundreds, listed by --help
            parts.append(_train_section())
            continue
        parts.append("```text\n" + command.format_help().rstrip() + "\n```\n")
    return "\n".join(parts)


def _train_section() -> str:
    from trl import ScriptArguments

    from ivtrainer.cli import train
    from ivtrainer.cli.common import CommandParser

    own = CommandParser(
        (train.TrainArguments, ScriptArguments), prog="ivtrainer train", description=train.DESCRIPTION
    )
    return (
        "The command's own flags and trl's dataset flags are below. It also takes every field of the chosen "
        "trainer's config (`IVGuidedSFTConfig`, trl's `SFTConfig`, `TrainingArguments` or `FLearningConfig`) and "
        "of trl's `ModelConfig` (`model_name_or_path`, `use_peft`, `lora_r`, ...): `ivtrainer train --trainer "
        "f-learning --help` lists them all. See [Train from the command line](train.md).\n\n"
        "```text\n" + own.format_help().rstrip() + "\n```\n"
    )


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
