"""Do own-task IVs from the shipped head set steer as well as per-task exact ones, and what do they cost?

    python benchmarks/shipped_head_set.py [--tasks brackets ...] [--write-docs]

For each of the continual benchmark's ten sequence tasks (none of which the head set saw) and the
six built-in tasks (which it was built from: marked), the own-task IV is extracted as
``instruction_vectors="auto"`` does (``own_task_iv`` on the task's training rows, calibrated), once
with exact CIE over every head (``heads="exact"``) and once from the head set shipped for the
default model (``benchmarks/build_head_set.py``), timed side by side in one process. Each IV is
scored zero-shot on rows it never saw (the sequence tasks' validation rows, the built-in tasks'
held-out pairs): first-token accuracy without and with the IV.
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument(
        "--from-json", action="store_true", help="re-render the docs table from the saved run"
    )
    args = parser.parse_args()
    if args.from_json:
        rows = json.loads(RESULTS.read_text())
    else:
        model, tokenizer = load_default_model()
        head_set = HeadSet.from_pretrained(SHIPPED)
        rows = []
        for task in args.tasks:
            train, scored, seen = _rows(task)
            row: dict = {"task": task, "in_head_set": seen, "rows_scored": len(scored)}
            for name, heads in (("exact", "exact"), ("head set", head_set)):
                start = time.perf_counter()
                iv = own_task_iv(model, tokenizer, train, heads=heads, name=task, progress=False)
                row[f"{name} s"] = time.perf_counter() - start
                result = iv.evaluate(model, tokenizer, scored, shots=())
                row["zero-shot"] = result.zero_shot
                row[f"{name} +IV"] = result.zero_shot_iv
            rows.append(row)
            print(json.dumps(row))
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(rows, indent=1))
    table = render(rows)
    print(table)
    if args.write_docs:
        replace_block("shipped-head-set", table)


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
