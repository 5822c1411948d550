"""Build the head set ivtrainer ships for the default model (package data), from the built-in tasks.

    python benchmarks/build_head_set.py [--out ivtrainer/resources/head_sets/default]

Every built-in task's exact causal indirect effects on its extraction pairs, averaged into one
ranking (``ivtrainer.extract_head_set`` with the package's defaults: 100 mean prompts, 25 CIE
prompts, 10-shot), saved with its card (tasks, settings, the model it was chosen on).
``instruction_vectors="auto"`` and the continual runner read an own-task IV's heads from it when
the model is the default model (``ivtrainer.steering.head_set.shipped_head_set``), instead of
running exact CIE over all 270 heads per task. Its ``n_top`` (how many top heads an IV sums, so
that calibration searches the layer and strength only) is the head count the calibration picks
most often for the built-in tasks' IVs from the set.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import time
from pathlib import Path

from ivtrainer.modeling.loading import load_default_model, model_source
from ivtrainer.steering.calibration import HEAD_COUNTS
from ivtrainer.steering.extraction import extract_instruction_vector
from ivtrainer.steering.head_set import SHIPPED, HeadSet, extract_head_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED)
    parser.add_argument(
        "--n-top-only", action="store_true", help="keep the set in --out, choose only its n_top again"
    )
    args = parser.parse_args()
    model, tokenizer = load_default_model()
    start = time.perf_counter()
    if args.n_top_only:
        head_set = HeadSet.from_pretrained(args.out)
        provenance = (args.out / "README.md").read_text().split("\n## Provenance\n", 1)[1]
        seconds = float(re.search(r"in (\d+) s", provenance)[1])  # type: ignore[index]  # the build's
    else:
        head_set = extract_head_set(model, tokenizer)
        seconds = time.perf_counter() - start
    print(f"head set over {len(head_set.tasks)} tasks in {seconds:.0f} s: top 10 {head_set.top(10)}")
    head_set = dataclasses.replace(head_set, n_top=choose_n_top(head_set, model, tokenizer))
    head_set.save_pretrained(args.out)
    add_provenance(args.out, seconds, model_source(model)["note"])
    print(f"wrote {args.out}")


def choose_n_top(head_set: HeadSet, model, tokenizer) -> int:
    """The head count the calibration picks most often for the set's own tasks' IVs (ties: the
    middle of ``HEAD_COUNTS``, then the fewer heads), chosen on their extraction pairs."""
    free = dataclasses.replace(head_set, n_top=None)
    picks = []
    for task in head_set.tasks:
        iv = extract_instruction_vector(model, tokenizer, task, heads=free, progress=False)
        calibration = iv.metrics["calibration"]
        picks.append(calibration["n_heads"])
        print(f"{task}: {calibration['n_heads']} heads, layer {iv.edit_layer}, strength {iv.strength}, "
              f"calibration accuracy {calibration['accuracy']}")  # fmt: skip
    votes = collections.Counter(picks)
    middle = HEAD_COUNTS[len(HEAD_COUNTS) // 2]
    n_top = max(votes, key=lambda k: (votes[k], -abs(k - middle), -k))
    print(f"n_top = {n_top} (picks {dict(votes)})")
    return n_top


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
on 2 CPU cores; its `n_top` is the head count the calibration chose most often for those tasks'
IVs (`--n-top-only` chooses it again for the set in place). `instruction_vectors="auto"` and `ivtrainer continual` take an own-task IV's heads
from it when the model is this checkpoint (by name and layout); `auto_iv_heads="exact"`
(`--iv_heads exact`) asks for per-task exact CIE instead. How its IVs steer against per-task ones:
`python benchmarks/shipped_head_set.py` (docs/instruction-vectors.md).
"""
    )


if __name__ == "__main__":
    main()
