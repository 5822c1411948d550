"""Do own-task IVs from the shipped head set steer as well as per-task exact ones, and what do they cost?

    python benchmarks/shipped_head_set.py [--tasks brackets ...] [--compare exact|n_top] [--write-docs]

For each of the continual benchmark's ten sequence tasks (none of which the head set saw) and the
six built-in tasks (which it was built from: marked), the own-task IV is extracted as
``instruction_vectors="auto"`` does (``own_task_iv`` on the task's training rows, calibrated), once
with exact CIE over every head (``heads="exact"``) and once from the head set shipped for the
default model (``benchmarks/build_head_set.py``), timed side by side in one process. Each IV is
scored zero-shot on rows it never saw (the sequence tasks' validation rows, the built-in tasks'
held-out pairs): first-token accuracy without and with the IV.

``--compare n_top``: both IVs from the shipped head set, one calibrating the head count (5, 10 or
20) with the layer and strength (what the package does), the other taking the set's top
``--n-top`` heads (``HeadSet.n_top``; 10 by default, the count the calibration chooses most
often) and calibrating the layer and strength only, timed side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from _readme import replace_block
from datasets import Dataset

from ivtrainer.continual.sequence_tasks import ORDERS, load_sequence_task
from ivtrainer.datasets.tasks import list_tasks, load_task
from ivtrainer.iv_guided.own_task_iv import own_task_iv
from ivtrainer.modeling.loading import load_default_model
from ivtrainer.steering.head_set import SHIPPED, HeadSet

RESULTS = Path(__file__).resolve().parent / "results" / "shipped_head_set.json"
RESULTS_N_TOP = RESULTS.with_name("head_set_n_top.json")
SEQUENCE = [*ORDERS["order1"], *ORDERS["order2"]]


def _rows(task: str) -> tuple[Dataset, list[dict[str, str]], bool]:
    """Training rows (as the trainer gets them), the rows to score on, whether the head set saw the task."""
    if task in SEQUENCE:
        train = load_sequence_task(task, "train")
        scored = [
            {"input": r["prompt"], "output": r["completion"].strip()}
            for r in load_sequence_task(task, "validation")
        ]
        return (
            Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train]),
            scored,
            False,
        )
    return Dataset.from_list(load_task(task, "extraction")), load_task(task, "held_out"), True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=[*SEQUENCE, *list_tasks()])
    parser.add_argument("--compare", choices=["exact", "n_top"], default="exact")
    parser.add_argument("--n-top", type=int, default=10, help="the head count of --compare n_top")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--from-json", action="store_true", help="re-render the docs table from the saved run"
    )
    args = parser.parse_args()
    results = RESULTS if args.compare == "exact" else RESULTS_N_TOP
    if args.from_json:
        rows = json.loads(results.read_text())
    else:
        model, tokenizer = load_default_model()
        head_set = HeadSet.from_pretrained(SHIPPED)
        modes = (
            (("exact", "exact"), ("head set", head_set))
            if args.compare == "exact"
            else (("grid", head_set), ("n_top", dataclasses.replace(head_set, n_top=args.n_top)))
        )
        rows = []
        for task in args.tasks:
            train, scored, seen = _rows(task)
            row: dict = {"task": task, "in_head_set": seen, "rows_scored": len(scored)}
            for name, heads in modes:
                start = time.perf_counter()
                iv = own_task_iv(model, tokenizer, train, heads=heads, name=task, progress=False)
                row[f"{name} s"] = time.perf_counter() - start
                result = iv.evaluate(model, tokenizer, scored, shots=())
                row["zero-shot"] = result.zero_shot
                row[f"{name} +IV"] = result.zero_shot_iv
                row[f"{name} heads"] = len(iv.heads)
            rows.append(row)
            print(json.dumps(row))
        results.parent.mkdir(exist_ok=True)
        results.write_text(json.dumps(rows, indent=1))
    table = render(rows) if args.compare == "exact" else render_n_top(rows, args.n_top)
    print(table)
    if args.write_docs:
        replace_block("shipped-head-set" if args.compare == "exact" else "head-set-n-top", table)


def render_n_top(rows: list[dict], n_top: int) -> str:
    lines = [
        f"| task | zero-shot | + IV, count calibrated (heads) | + IV, n_top={n_top} | extraction s, calibrated | n_top | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = f"{r['task']} (in the head set)" if r["in_head_set"] else r["task"]
        lines.append(
            f"| {name} | {r['zero-shot']:.2f} | {r['grid +IV']:.2f} ({r['grid heads']}) | {r['n_top +IV']:.2f} | "
            f"{r['grid s']:.0f} | {r['n_top s']:.0f} | {r['n_top s'] / r['grid s']:.2f}x |"
        )
    for label, group in (
        ("never saw", [r for r in rows if not r["in_head_set"]]),
        ("was built from", [r for r in rows if r["in_head_set"]]),
    ):
        if group:
            lines.append(
                f"\nTasks the head set {label} ({len(group)}): mean zero-shot + IV "
                f"{statistics.mean(r['grid +IV'] for r in group):.2f} with the count calibrated, "
                f"{statistics.mean(r['n_top +IV'] for r in group):.2f} with its top {n_top} heads; extraction time, "
                f"median ratio {statistics.median(r['n_top s'] / r['grid s'] for r in group):.2f}x."
            )
    lines.append(f"\n(`python benchmarks/shipped_head_set.py --compare n_top --n-top {n_top} --write-docs`)")
    return "\n".join(lines)


def render(rows: list[dict]) -> str:
    lines = [
        "| task | zero-shot | + IV, exact CIE | + IV, shipped head set | extraction s, exact | head set | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = f"{r['task']} (in the head set)" if r["in_head_set"] else r["task"]
        lines.append(
            f"| {name} | {r['zero-shot']:.2f} | {r['exact +IV']:.2f} | {r['head set +IV']:.2f} | "
            f"{r['exact s']:.0f} | {r['head set s']:.0f} | {r['head set s'] / r['exact s']:.2f}x |"
        )
    unseen = [r for r in rows if not r["in_head_set"]]
    if unseen:
        exact = statistics.mean(r["exact +IV"] for r in unseen)
        shipped = statistics.mean(r["head set +IV"] for r in unseen)
        ratio = statistics.median(r["head set s"] / r["exact s"] for r in rows)
        lines.append(
            f"\nTasks the head set never saw ({len(unseen)}): mean zero-shot + IV {exact:.2f} with exact CIE, "
            f"{shipped:.2f} from the shipped head set; extraction time, median ratio {ratio:.2f}x "
            "(`python benchmarks/shipped_head_set.py`)."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
