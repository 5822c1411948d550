"""What a task's IV costs with a saved universal head set, against a per-task exact-CIE extraction.

    python benchmarks/universal_heads_cost.py [--tasks antonym ...] [--runs 2] [--head-set DIR] [--write-readme]

The head set (CIE averaged over the built-in tasks, ``ivtrainer.extract_head_set``) is loaded from
``--head-set`` or built once and cached in ``benchmarks/.cache/head_set``; building it is not
timed here (``benchmarks/iv_evidence.py`` reports it). Then, per task, in one process with the
model loaded once, interleaved run by run so machine noise hits all alike:

- ``per-task``: ``extract_instruction_vector(model, tokenizer, task, calibrate=False)``: mean
  activations over 100 prompts, then every head's CIE on 25 prompts (shared-prefix patching),
- ``head set, 100``: ``heads=head_set, n_mean_prompts=100``: mean activations only, read up to the
  deepest candidate head's layer,
- ``head set``: ``heads=head_set`` with the default mean prompts (25 with a head set),

all with the papers' fixed layer and strength (calibration adds the same search to each). Then
whether the smaller default costs steering: the calibrated head-set IV with 100 and with the
default mean prompts, each scored on the task's held-out pairs (zero-shot + IV, first token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _readme import replace_block

from ivtrainer.datasets.tasks import list_tasks, load_task
from ivtrainer.modeling.loading import load_default_model
from ivtrainer.steering.extraction import extract_instruction_vector
from ivtrainer.steering.head_set import HeadSet, extract_head_set

CACHE = Path(__file__).resolve().parent / ".cache" / "head_set"
RESULTS = CACHE.parent / "universal_heads_cost.json"


def seconds(model, tokenizer, task: str, **kwargs) -> float:
    start = time.perf_counter()
    extract_instruction_vector(model, tokenizer, task, progress=False, **kwargs)
    return time.perf_counter() - start


def measure(model, tokenizer, task: str, head_set, runs: int) -> dict:
    times: dict[str, list[float]] = {"per-task": [], "100": [], "default": []}
    for _ in range(runs):
        times["per-task"].append(seconds(model, tokenizer, task, calibrate=False))
        times["100"].append(
            seconds(model, tokenizer, task, calibrate=False, heads=head_set, n_mean_prompts=100)
        )
        times["default"].append(seconds(model, tokenizer, task, calibrate=False, heads=head_set))
    row: dict = {"task": task, **{k: statistics.median(v) for k, v in times.items()}}
    held_out, demos = load_task(task, "held_out"), load_task(task, "extraction")
    for key, n in (("acc_100", 100), ("acc_default", None)):
        iv = extract_instruction_vector(
            model, tokenizer, task, heads=head_set, n_mean_prompts=n, progress=False
        )
        result = iv.evaluate(model, tokenizer, held_out, demonstrations=demos, progress=False)
        row[key], row["five_shot"] = result.zero_shot_iv, result.k_shot[5]
    return row


def table(rows: list[dict], runs: int, deepest: dict[int, int], n_layers: int) -> str:
    ratio = statistics.median(r["default"] / r["per-task"] for r in rows)
    ratio_100 = statistics.median(r["100"] / r["per-task"] for r in rows)
    lines = [
        f"SmolLM2-135M-Instruct; times with `calibrate=False`, median of {runs} runs per task in one process; "
        f"held-out accuracy of the calibrated IV (`python benchmarks/universal_heads_cost.py --runs {runs} "
        "--write-readme`):",
        "",
        "| task | per-task exact-CIE extraction, s | head set, 100 mean prompts, s | head set, default (25), s "
        "| default / per-task | held-out + IV, 100 / 25 mean prompts | 5-shot |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['per-task']:.1f} | {r['100']:.1f} | {r['default']:.1f} | "
            f"{r['default'] / r['per-task']:.2f}x | {r['acc_100']:.2f} / {r['acc_default']:.2f} | {r['five_shot']:.2f} |"
        )
    lines += [
        "",
        f"Median ratio **{ratio:.2f}x** with the default mean prompts ({ratio_100:.2f}x with 100). The mean-activation "
        f"forwards stop at the deepest candidate head: layer {deepest[10]} of {n_layers} for the 10 heads timed "
        f"here, layer {deepest[20]} for the 20 that calibration chooses among.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list_tasks())
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--head-set", type=Path, help=f"a saved head set (default: built once into {CACHE})")
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument(
        "--from-json", type=Path, help=f"re-render a saved run's rows (written to {RESULTS.name})"
    )
    args = parser.parse_args()

    model, tokenizer = load_default_model()
    model.eval()
    if args.head_set is None and not CACHE.is_dir():
        print("building the head set over the built-in tasks (once) ...", flush=True)
        extract_head_set(model, tokenizer, progress=False).save_pretrained(CACHE)
    head_set = HeadSet.from_pretrained(args.head_set or CACHE)
    deepest = {k: max(layer for layer, _ in head_set.top(k)) for k in (10, 20)}
    if args.from_json:
        rows = json.loads(args.from_json.read_text())
    else:
        rows = []
        for task in args.tasks:
            rows.append(measure(model, tokenizer, task, head_set, args.runs))
            print(rows[-1], flush=True)
        RESULTS.write_text(json.dumps(rows, indent=1))
    text = table(rows, args.runs, deepest, head_set.n_layers)
    print(text)
    if args.write_readme:
        replace_block("universal-heads-cost", text)


if __name__ == "__main__":
    main()
