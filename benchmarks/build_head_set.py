"""Build the head set ivtrainer ships for the default model (package data), from the built-in tasks.

    python benchmarks/build_head_set.py [--out ivtrainer/resources/head_sets/default]

Every built-in task's exact causal indirect effects on its extraction pairs, averaged into one
ranking (``ivtrainer.extract_head_set`` with the package's defaults: 100 mean prompts, 25 CIE
prompts, 10-shot), saved with its card (tasks, settings, the model it was chosen on).
``auto_iv_heads="shipped"`` and ``continual --iv_heads shipped`` read an own-task IV's heads from
it when the model is the default model (``ivtrainer.steering.head_set.shipped_head_set``), instead
of running exact CIE over all 270 heads per task.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ivtrainer.modeling.loading import load_default_model, model_source
from ivtrainer.steering.head_set import SHIPPED, extract_head_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED)
    args = parser.parse_args()
    model, tokenizer = load_default_model()
    start = time.perf_counter()
    head_set = extract_head_set(model, tokenizer)
    print(
        f"head set over {len(head_set.tasks)} tasks in {time.perf_counter() - start:.0f} s: top 10 {head_set.top(10)}"
    )
    seconds = time.perf_counter() - start
    head_set.save_pretrained(args.out)
    add_provenance(args.out, seconds, model_source(model)["note"])
    print(f"wrote {args.out}")


def add_provenance(folder: Path, seconds: float, note: str | None) -> None:
    """The card's provenance section: what the shipped set is, how it was built, who reads it."""
    card = folder / "README.md"
    card.write_text(
        card.read_text().rstrip()
        + f"""

## Provenance

Shipped with ivtrainer as package data for the default model (`load_model("default")`:
SmolLM2-135M-Instruct{f"; {note}" if note else ""}). Built by `python benchmarks/build_head_set.py`
from the built-in tasks' extraction pairs (exact CIE, the package's default sizes) in {seconds:.0f} s
on 2 CPU cores. With `auto_iv_heads="shipped"` (`instruction_vectors="auto"`) or
`ivtrainer continual --iv_heads shipped` an own-task IV takes its heads from it when the model is
this checkpoint (by name and layout); the default is per-task exact CIE. How its IVs steer against per-task ones:
`python benchmarks/shipped_head_set.py` (docs/instruction-vectors.md).
"""
    )


if __name__ == "__main__":
    main()
