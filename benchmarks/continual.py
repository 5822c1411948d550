"""Continual instruction tuning on the default model: plain, replay, KL anchor and IV-guided, seeds.

    python benchmarks/continual.py [--order order1] [--seeds 0 1 2] [--methods plain replay kl-anchor iv-guided]
                                   [--n-train 128] [--epochs 2] [--time-seeds 1 2] [--write-readme]

Each (method, seed) is one ``ivtrainer.continual.run_sequence`` run of the order's five tasks
(LoRA, a new adapter per task over the merged earlier ones) in
``benchmarks/.cache/continual/<order>/<method>-s<seed>``: an interrupted benchmark started again
continues every run where it stopped (``--resume`` is implicit). Every method runs with its
package defaults (``IVGuidedConfig.recipe``: nothing tuned, on validation or elsewhere); the
iv-guided runs extract each task's own IV before training it, with the extraction sizes below.
Prints and (``--write-readme``) writes the table of means over seeds (ranges in brackets), a
PNG of the accuracy curves, and the time split between training, evaluation and IV extraction
(each stage keeps its own times; ``--time-seeds``: only the seeds that ran on a quiet machine).
``--precomputed-k K ...``: the iv-guided runs also with the precomputed teacher storing the top K
(0: the exact store of hidden states), as rows of their own.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _readme import replace_block

from ivtrainer.continual.run_sequence import run_sequence
from ivtrainer.continual.sequence_tasks import ORDERS

CACHE = Path(__file__).resolve().parent / ".cache" / "continual"
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img" / "continual.png"
# the own-task IVs: the package's extraction with fewer prompts (per task, on 128 training pairs)
IV_SIZES = {"iv_mean_prompts": 50, "iv_cie_prompts": 10, "iv_calibration_prompts": 32}


def summary(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]"


def table(order: str, runs: dict[str, list[dict]], args) -> str:
    tasks = next(iter(runs.values()))[0]["tasks"]
    seeds = " ".join(map(str, args.seeds))
    timed = "" if args.time_seeds == args.seeds else f" --time-seeds {' '.join(map(str, args.time_seeds))}"
    if args.precomputed_k:
        timed += f" --precomputed-k {' '.join(map(str, args.precomputed_k))}"
    lines = [
        f"SmolLM2-135M-Instruct, LoRA r8 (q, v) per task, tasks {', '.join(tasks)} ({order}), {args.n_train} training "
        f"rows per task, {args.epochs:g} epochs, seeds {seeds}; exact match on 48 test rows per task, held-out "
        "abilities with fixed demonstrations "
        f"(`python benchmarks/continual.py --order {order} --seeds {seeds}{timed} --write-readme`). Means over seeds, "
        f"[min, max]; times: mean over seeds {' '.join(map(str, args.time_seeds))}:",
        "",
        "| method | AP | BWT | FWT | held-out abilities, change | BWT / plain's | time: train / evaluate / IV, s (all / train + IV) |",
        "| --- | --- | --- | --- | --- | ---: | --- |",
    ]
    plain_bwt = statistics.fmean(r["BWT"] for r in runs["plain"]) if "plain" in runs else None
    for method, results in runs.items():
        bwt = statistics.fmean(r["BWT"] for r in results)
        ratio = f"{bwt / plain_bwt:.2f}" if plain_bwt and plain_bwt < 0 else "-"
        # runs whose every stage kept its time, of the seeds timed on a quiet machine
        timed = [r["seconds"] for r in results if r["seconds"] and r["settings"]["seed"] in args.time_seeds]
        seconds = (
            {k: statistics.fmean(t[k] for t in timed) for k in ("train", "evaluate", "iv")} if timed else None
        )
        time_cell = (
            f"{seconds['train']:.0f} / {seconds['evaluate']:.0f} / {seconds['iv']:.0f} "
            f"({(seconds['train'] + seconds['evaluate'] + seconds['iv']) / (seconds['train'] + seconds['iv']):.2f}x)"
            + (f" ({len(timed)} of {len(results)} runs)" if len(timed) < len(results) else "")
            if seconds
            else "-"
        )
        lines.append(
            f"| {method} | {summary([r['AP'] for r in results])} | {summary([r['BWT'] for r in results])} | "
            f"{summary([r['FWT'] for r in results])} | {summary([r['ability_retention'] for r in results])} | "
            f"{ratio} | {time_cell} |"
        )
    lines += ["", "Final accuracy per task (mean over seeds):", ""]
    lines += ["| method | " + " | ".join(tasks) + " |", "| --- | " + " | ".join("---:" for _ in tasks) + " |"]
    for method, results in runs.items():
        final = [statistics.fmean(r["accuracy_matrix"][-1][j] for r in results) for j in range(len(tasks))]
        lines.append(f"| {method} | " + " | ".join(f"{v:.2f}" for v in final) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    from ivtrainer.evaluation.plotting import _pyplot, _save

    plt = _pyplot()
    tasks = next(iter(runs.values()))[0]["tasks"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    stages = range(len(tasks) + 1)
    for method, results in runs.items():
        # mean accuracy over the tasks trained so far, and the held-out abilities, after each stage
        seen = [
            statistics.fmean(statistics.fmean(r["accuracy_matrix"][s][: max(s, 1)]) for r in results)
            for s in stages
        ]
        axes[0].plot(stages, seen, marker="o", label=method)
        axes[1].plot(stages, [statistics.fmean(r["abilities_mean"][s] for r in results) for s in stages],
                     marker="o", label=method)  # fmt: skip
    for ax, title in zip(
        axes, ("tasks trained so far: mean accuracy", "held-out abilities (5-shot ICL)"), strict=True
    ):
        ax.set_xticks(list(stages), ["before", *tasks], rotation=30, ha="right")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", default="order1", choices=sorted(ORDERS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=["plain", "replay", "kl-anchor", "iv-guided"])
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument(
        "--time-seeds", nargs="*", type=int, help="seeds whose times the table shows (default: all)"
    )
    parser.add_argument(
        "--precomputed-k",
        nargs="*",
        type=int,
        default=[],
        help="iv-guided also with teacher=precomputed, these k",
    )
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    args.time_seeds = args.seeds if args.time_seeds is None else args.time_seeds

    # (row label, folder name, method, teacher settings)
    variants = [(m, m, m, {}) for m in args.methods]
    if "iv-guided" in args.methods:
        variants += [
            (f"iv-guided, precomputed {f'top-{k}' if k else 'exact'}", f"iv-guided-precomputed-k{k}", "iv-guided",
             {"teacher": "precomputed", "teacher_top_k": k})
            for k in args.precomputed_k
        ]  # fmt: skip
    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seed by seed: a partial benchmark already compares every method
        for label, folder, method, teacher in variants:
            out = CACHE / args.order / f"{folder}-s{seed}"
            results = run_sequence(
                ORDERS[args.order], out=out, method=method, seed=seed, n_train=args.n_train, epochs=args.epochs,
                progress=False, **(IV_SIZES if method == "iv-guided" else {}), **teacher,
            )  # fmt: skip
            runs.setdefault(label, []).append(results)
            print(f"{label} seed {seed}: AP {results['AP']:.3f} BWT {results['BWT']:+.3f}", flush=True)
    runs = {v[0]: runs[v[0]] for v in variants}
    text = table(args.order, runs, args)
    print(text)
    (CACHE / args.order / "summary.json").write_text(json.dumps(runs, indent=1))
    if args.write_readme:
        plot(runs, DOCS_IMG)
        replace_block("continual", text + "\n\n![continual learning curves](img/continual.png)")


if __name__ == "__main__":
    main()
