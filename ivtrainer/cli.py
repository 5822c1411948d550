"""The ``ivtrainer`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from . import __version__
from .errors import IVTrainerError

__all__ = ["main"]


def _info(args: argparse.Namespace) -> int:
    from .architectures import get_layout
    from .models import load_model

    start = time.perf_counter()
    model, _ = load_model(args.model)
    seconds = time.perf_counter() - start
    layout = get_layout(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model          {args.model} ({model.config._name_or_path})")
    print(f"class          {type(model).__name__}, {n_params / 1e6:.1f}M parameters, {model.dtype}")
    print(layout.describe())
    print(f"load time      {seconds:.2f} s")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ivtrainer",
        description="Instruction-vector-guided training and F-Learning for Hugging Face models.",
    )
    parser.add_argument("--version", action="version", version=f"ivtrainer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="load a model and show the attention modules ivtrainer hooks",
        description="Load a model (default: the embedded SmolLM2-135M-Instruct) and print its "
        "architecture, layers x heads, head_dim and the attention output projections ivtrainer hooks.",
    )
    info.add_argument(
        "--model", default="default", help="'default', a Hub id, a local folder or a .gguf file"
    )
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except IVTrainerError as exc:
        print(f"ivtrainer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ivtrainer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
