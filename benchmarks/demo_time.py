"""Wall time of `ivtrainer demo` and `ivtrainer demo --quick` on this machine, against the estimate.

    python benchmarks/demo_time.py [--rounds 3] [--write-readme]

Each round runs both commands as fresh processes (full, then quick), the way a user does: the
time is the whole command, from process start (imports included) to exit. The default model is
already converted into the ivtrainer cache (the first run ever adds its one-off conversion,
about 15 s). Reports medians over rounds, the per-stage times from the runs' results.json, and the
demo's own up-front estimate (made after loading) next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = {"full": 600.0, "quick": 120.0}  # seconds: the 10 minutes and "about 2 minutes"


def run_once(mode: str, out: Path) -> dict:
    command = [str(Path(sys.executable).parent / "ivtrainer"), "demo", "--out", str(out)]
    command += ["--quick"] if mode == "quick" else []
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    return {
        "wall": wall,
        "seconds": results["seconds"],
        "estimated": results["estimated_seconds"],
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["full", "quick"], choices=["full", "quick"])
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in args.modes:
                runs[mode].append(run_once(mode, Path(tmp) / f"{mode}-{r}"))
                print(f"round {r + 1} {mode}: {runs[mode][-1]['wall']:.0f} s", flush=True)
    table = format_table(runs, args)
    print(table)
    if args.write_readme:
        sys.path.insert(0, str(Path(__file__).parent))
        from _readme import replace_block

        replace_block("demo-time", table)
        if "full" in runs:
            replace_block("demo-output", format_output(runs["full"][0]["results"]))


def format_table(runs: dict[str, list[dict]], args) -> str:
    med = statistics.median
    lines = [
        "| command | wall time (median) | per round | target | stages (median): measured / estimated |",
        "|---|---:|---|---:|---|",
    ]
    for mode, rs in runs.items():
        walls = [r["wall"] for r in rs]
        stages = []
        for stage in rs[0]["seconds"]:
            if stage == "total":
                continue
            measured = med(r["seconds"][stage] for r in rs)
            estimated = [r["estimated"][stage] for r in rs if stage in r["estimated"]]
            stages.append(f"{stage} {measured:.0f} s" + (f" / {med(estimated):.0f} s" if estimated else ""))
        command = "ivtrainer demo" + (" --quick" if mode == "quick" else "")
        lines.append(
            f"| `{command}` | **{med(walls) / 60:.1f} min** ({med(walls):.0f} s) | "
            f"{', '.join(f'{w:.0f} s' for w in walls)} | {TARGET[mode] / 60:.0f} min | {'; '.join(stages)} |"
        )
    lines.append(
        f"\n`python benchmarks/demo_time.py --rounds {args.rounds}`: the whole command, fresh processes, "
        f"{len(next(iter(runs.values())))} rounds, SmolLM2-135M-Instruct (already converted) on "
        f"{os.cpu_count()} CPU cores."
    )
    return "\n".join(lines)


def format_output(results: dict) -> str:
    """What the first full round printed: the IV line and the two tables."""
    from ivtrainer.demo import knowledge_table, new_task_table
    from ivtrainer.demo.report import iv_lines, own_iv_line

    return "\n".join(
        [
            "```text",
            "$ ivtrainer demo",
            "...",
            "[1/3] Instruction vector of 'antonym' (causal mediation over all heads)",
            iv_lines(results["instruction_vector"]),
            "[2/3] LoRA fine-tuning on a new task (Q: cold -> A: [cold]), plain and IV-guided (the new task's own IV "
            "on the teacher)",
            own_iv_line(results["new_task"]),
            "```",
            "",
            new_task_table(results["new_task"]),
            "",
            knowledge_table(results["knowledge_update"]),
            "",
            f"Round 1 of `python benchmarks/demo_time.py --write-readme` (seed {results['plan']['seed']}, "
            f"{results['seconds']['total'] / 60:.1f} min); accuracies in %.",
        ]
    )


if __name__ == "__main__":
    main()
