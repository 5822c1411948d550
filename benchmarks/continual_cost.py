"""What a whole continual sequence costs with IV-guided training against plain fine-tuning, on the default model.

    python benchmarks/continual_cost.py [--seeds 0 1 2] [--write-docs]

Each seed runs order1 (five tasks, LoRA, the test split) twice, one after the other in this
process: ``plain``, then ``iv-guided`` as the package runs it now (the exact precomputed teacher,
``teacher="precomputed", teacher_top_k=0``; each task's own IV from the head set shipped for the
default model, ``iv_heads="shipped"``, calibrated; the setting chosen for iv-guided on validation rows by
``benchmarks/continual.py --tune``: ``kl_scale=1, teacher_strength=2``) with the sizes of
``benchmarks/continual.py`` (128 training rows a task, 2 epochs, own-task IVs from 50 mean prompts
and 32 calibration pairs). The whole sequence is what ``run_sequence`` spends training (the
precompute passes included), extracting the own-task IVs and evaluating after every stage; the
ratio is IV-guided's over plain's of the same seed, the median over seeds. AP and BWT are set
beside the iv-guided row of ``docs/continual.md`` (per-task exact CIE, the live teacher).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from _readme import replace_block

from ivtrainer.continual.run_sequence import run_sequence
from ivtrainer.continual.sequence_tasks import ORDERS

CACHE = Path(__file__).resolve().parent / ".cache" / "continual_cost"
RESULTS = Path(__file__).resolve().parent / "results" / "continual_cost.json"
SIZES = {
    "n_train": 128,
    "epochs": 2.0,
    "iv_mean_prompts": 50,
    "iv_cie_prompts": 10,
    "iv_calibration_prompts": 32,
}
METHODS = {
    "plain": {},
    "iv-guided": {
        "kl_scale": 1.0,
        "teacher_strength": 2.0,
        "teacher": "precomputed",
        "teacher_top_k": 0,
        "iv_heads": "shipped",
    },
}
# docs/continual.md, order1, iv-guided (kl_scale1-teacher_strength2): mean [seed range] over 3 seeds
BEFORE = {"AP": (0.210, 0.204, 0.217), "BWT": (-0.521, -0.547, -0.505)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--from-json", action="store_true", help="re-render the saved run")
    args = parser.parse_args()
    if args.from_json:
        runs = json.loads(RESULTS.read_text())
    else:
        runs = []
        for seed in args.seeds:
            for method, settings in METHODS.items():
                out = CACHE / f"{method}-s{seed}"
                shutil.rmtree(out, ignore_errors=True)  # timed from the start, never resumed
                results = run_sequence(
                    ORDERS["order1"], out=out, method=method, seed=seed, progress=False, **SIZES, **settings
                )
                run = {
                    "seed": seed,
                    "method": method,
                    "AP": results["AP"],
                    "BWT": results["BWT"],
                    **results["seconds"],
                }
                runs.append(run)
                print(json.dumps(run), flush=True)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(runs, indent=1) + "\n")
    table = render(runs)
    print(table)
    if args.write_docs:
        replace_block("continual-cost", table)


def render(runs: list[dict]) -> str:
    by = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    whole = {k: v["train"] + v["iv"] + v["evaluate"] for k, v in by.items()}
    lines = [
        "| seed | plain: training + evaluation, s | IV-guided: training (precompute included) + own-task IVs + evaluation, s "
        "| whole sequence / plain | IV-guided AP | BWT |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ratios = []
    for seed in seeds:
        plain, guided = by["plain", seed], by["iv-guided", seed]
        ratio = whole["iv-guided", seed] / whole["plain", seed]
        ratios.append(ratio)
        lines.append(
            f"| {seed} | {plain['train']:.0f} + {plain['evaluate']:.0f} = {whole['plain', seed]:.0f} | "
            f"{guided['train']:.0f} + {guided['iv']:.0f} + {guided['evaluate']:.0f} = {whole['iv-guided', seed]:.0f} | "
            f"**{ratio:.2f}x** | {guided['AP']:.3f} | {guided['BWT']:.3f} |"
        )
    ap = [by["iv-guided", s]["AP"] for s in seeds]
    bwt = [by["iv-guided", s]["BWT"] for s in seeds]
    lines.append(
        f"\nMedian over {len(seeds)} seeds: **{statistics.median(ratios):.2f}x** plain's whole sequence. IV-guided AP "
        f"{statistics.mean(ap):.3f} [{min(ap):.3f}, {max(ap):.3f}], BWT {statistics.mean(bwt):.3f} [{min(bwt):.3f}, "
        f"{max(bwt):.3f}] (mean [seed range]), against {BEFORE['AP'][0]:.3f} [{BEFORE['AP'][1]:.3f}, {BEFORE['AP'][2]:.3f}] "
        f"and {BEFORE['BWT'][0]:.3f} [{BEFORE['BWT'][1]:.3f}, {BEFORE['BWT'][2]:.3f}] in the table above (per-task exact "
        "CIE, the live teacher). `python benchmarks/continual_cost.py --write-docs`, 2 CPU cores."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
