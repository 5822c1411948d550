"""What a task's IV costs with a saved universal head set, against a per-task exact-CIE extraction.

    python benchmarks/universal_heads_cost.py [--tasks antonym ...] [--runs 3] [--head-set DIR] [--write-readme]

The head set (CIE averaged over the built-in tasks, ``ivtrainer.extract_head_set``) is loaded from
``--head-set`` or built once and cached in ``benchmarks/.cache/head_set``; building it is not
timed here (``benchmarks/iv_evidence.py`` reports it). Then, per task and run, interleaved so
machine noise hits both alike, in one process with the model loaded once:

- ``per-task``: ``extract_instruction_vector(model, tokenizer, task, calibrate=False)``: mean
  activations over 100 prompts, then every head's CIE on 25 prompts (shared-prefix patching),
- ``head set``: the same with ``heads=head_set``: mean activations only, read up to the
  deepest candidate head's layer,

both with the papers' fixed layer and strength (calibration adds the same search to both; the
calibrated times are printed too). Prints the per-task medians and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _readme import replace_block

from ivtrainer.datasets.tasks import list_tasks
from ivtrainer.modeling.loading import load_default_model
from ivtrainer.steering.head_set import HeadSet, extract_head_set
from ivtrainer.steering.instruction_vector import extract_instruction_vector

CACHE = Path(__file__).resolve().parent / ".cache" / "head_set"


def seconds(model, tokenizer, task: str, **kwargs) -> float:
    start = time.perf_counter()
    extract_instruction_vector(model, tokenizer, task, progress=False, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list_tasks())
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--head-set", type=Path, help=f"a saved head set (default: built once into {CACHE})")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()

    model, tokenizer = load_default_model()
    model.eval()
    if args.head_set is None and not CACHE.is_dir():
        print("building the head set over the built-in tasks (once) ...", flush=True)
        extract_head_set(model, tokenizer, progress=False).save_pretrained(CACHE)
    head_set = HeadSet.from_pretrained(args.head_set or CACHE)
    deepest = max(layer for layer, _ in head_set.top(20))

    rows = []
    for task in args.tasks:
        times: dict[str, list[float]] = {"per-task": [], "head set": []}
        for _ in range(args.runs):
            times["per-task"].append(seconds(model, tokenizer, task, calibrate=False))
            times["head set"].append(seconds(model, tokenizer, task, calibrate=False, heads=head_set))
        calibrated = seconds(model, tokenizer, task, heads=head_set)
        per_task, universal = (statistics.median(v) for v in times.values())
        rows.append((task, per_task, universal, calibrated))
        print(
            f"{task}: per-task {per_task:.1f} s, head set {universal:.1f} s ({universal / per_task:.2f}x)",
            flush=True,
        )

    ratio = statistics.median(u / p for _, p, u, _ in rows)
    lines = [
        f"SmolLM2-135M-Instruct, default sizes (100 mean prompts, 25 CIE prompts), `calibrate=False`, "
        f"median of {args.runs} runs per task, one process "
        f"(`python benchmarks/universal_heads_cost.py --runs {args.runs} --write-readme`):",
        "",
        "| task | per-task exact-CIE extraction, s | with the saved head set, s | ratio | with the head set, calibrated, s |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {t} | {p:.1f} | {u:.1f} | {u / p:.2f}x | {c:.1f} |" for t, p, u, c in rows),
        "",
        f"Median ratio **{ratio:.2f}x**. The head set's 20 candidate heads reach layer {deepest} of "
        f"{head_set.n_layers}: the mean-activation forwards stop there.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write_readme:
        replace_block("universal-heads-cost", text)


if __name__ == "__main__":
    main()
