"""``ivtrainer info``: load a model and show the attention modules ivtrainer hooks."""

from __future__ import annotations

import time

from ivtrainer.cli.common import ModelArguments

DATACLASSES = (ModelArguments,)


def make_parser(subparsers):
    return subparsers.add_parser(
        "info",
        dataclass_types=DATACLASSES,
        help="load a model and show the attention modules ivtrainer hooks",
        description="Load a model (default: the embedded SmolLM2-135M-Instruct) and print its "
        "architecture, layers x heads, head_dim and the attention output projections ivtrainer hooks.",
    )


def main(model_args: ModelArguments) -> int:
    from ivtrainer.modeling.architectures import get_layout
    from ivtrainer.modeling.loading import load_model

    start = time.perf_counter()
    model, _ = load_model(model_args.model)
    seconds = time.perf_counter() - start
    layout = get_layout(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model          {model_args.model} ({model.config._name_or_path})")
    print(f"class          {type(model).__name__}, {n_params / 1e6:.1f}M parameters, {model.dtype}")
    print(layout.describe())
    print(f"load time      {seconds:.2f} s")
    return 0
