"""Continual instruction tuning on the default model: every method tuned on validation rows, IV repair, the forgetting monitor.

    python benchmarks/continual.py [--orders order1 order2] [--seeds 0 1 2] [--tune] [--repair]
                                   [--methods plain replay kl-anchor iv-guided iv-guided-replay]
                                   [--n-train 128] [--epochs 2] [--workers 1] [--precomputed-k K ...]
                                   [--write-readme]

Each (order, method, settings, seed) is one ``ivtrainer.continual.run_sequence`` run of the
order's five tasks (LoRA, a new adapter per task over the merged earlier ones) in
``benchmarks/.cache/continual/<order>/...``: a benchmark started again continues every run where
it stopped. ``--tune``: first each method's main knob is chosen on the first order, seed 0, from
the validation rows alone (every stage scored on the validation split; the setting with the best final
validation AP, ties to the package default), with the same budget for every method (``GRID``: at
most four settings each; plain has no knob; ``iv-guided-replay`` takes the settings chosen for
``iv-guided`` and ``replay``, no search of its own). Then every method runs with its chosen
setting on the test split of every order over ``--seeds`` (the second order tests whether the
chosen settings carry over). ``--repair``: each test run also scores IV repair
(``ContinualSettings.repair``: each task's IV captured after its stage, added back at the end, the
task given or routed; strengths chosen on validation rows) as rows of its own. Every stage logs the
forgetting monitor's KL (the stage's model against the model before it, on 16 of its training
rows); its rank correlation with the held-out abilities' drop over the stage is reported with a
run-bootstrap interval. ``--workers N`` runs N runs at once (processes; one GPU is shared).
``--report``: only read the finished runs' results (e.g. runs made on another machine) and write
the tables.
Prints and (``--write-readme``) writes the tables and three PNGs (accuracy curves, the Pareto plot
of AP against the held-out abilities' change, the monitor's scatter).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from _readme import replace_block

from ivtrainer.continual.sequence_tasks import ORDERS

CACHE = Path(__file__).resolve().parent / ".cache" / "continual"
IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
# the own-task IVs: the package's extraction with fewer prompts (per task, on 128 training pairs)
IV_SIZES = {"iv_mean_prompts": 50, "iv_cie_prompts": 10, "iv_calibration_prompts": 32}
METHODS = ["plain", "replay", "kl-anchor", "iv-guided", "iv-guided-replay"]
DEFAULTS = {"replay_fraction": 0.1, "kl_scale": 1.0, "teacher_strength": 1.0}
# each method's main knob, at most four settings each, the package default among them
GRID: dict[str, list[dict[str, float]]] = {
    "plain": [{}],
    "replay": [{"replay_fraction": f} for f in (0.05, 0.1, 0.2, 0.4)],
    "kl-anchor": [{"kl_scale": s} for s in (0.1, 0.3, 1.0, 3.0)],
    "iv-guided": [
        {"kl_scale": 0.3, "teacher_strength": 1.0},
        {"kl_scale": 1.0, "teacher_strength": 1.0},
        {"kl_scale": 3.0, "teacher_strength": 1.0},
        {"kl_scale": 1.0, "teacher_strength": 2.0},
    ],
}


def _label(setting: dict[str, float]) -> str:
    return "-".join(f"{k}{v:g}" for k, v in sorted(setting.items())) or "default"


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One run (in a worker process); with ``report``, only its finished results."""
    import torch

    from ivtrainer.continual.run_sequence import run_sequence

    torch.set_num_threads(job.pop("threads"))
    order, out = job.pop("order"), Path(job.pop("out"))
    if job.pop("report"):
        if not (out / "results.json").is_file():
            raise SystemExit(
                f"--report: {out} has no results.json (run the benchmark without --report first)"
            )
        return json.loads((out / "results.json").read_text())
    return run_sequence(ORDERS[order], out=out, progress=False, **job)


class Runner:
    """Runs jobs now (``workers`` 1) or in a process pool, returning futures either way."""

    def __init__(self, workers: int) -> None:
        import multiprocessing

        self.pool = (
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            if workers > 1
            else None
        )
        import os

        self.threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0

    def submit(self, job: dict[str, Any]) -> Future:
        import torch

        job = {**job, "threads": self.threads or torch.get_num_threads()}
        if self.pool is not None:
            return self.pool.submit(_run, job)
        future: Future = Future()
        future.set_result(_run(job))
        return future


# --smoke: the whole benchmark in a minute on a tiny model (``--model`` a folder): the machinery only
SMOKE = {"n_test": 4, "n_icl": 2, "iv_mean_prompts": 12, "iv_cie_prompts": 2, "iv_calibration_prompts": 8}


def _job(args, order: str, method: str, setting: dict[str, float], seed: int, split: str) -> dict[str, Any]:
    folder = "tune" if split == "validation" else "test"
    return {
        "order": order,
        "out": str(args.cache / order / folder / f"{method}-{_label(setting)}-s{seed}"),
        "method": method,
        "model": args.model,
        "seed": seed,
        "n_train": args.n_train,
        "epochs": args.epochs,
        "eval_split": split,
        "repair": args.repair and split == "test",
        "report": args.report,
        **IV_SIZES,  # the own-task IVs (iv-guided) and the repair's
        **(SMOKE if args.smoke else {}),
        **setting,
    }


def _choose(method: str, results: list[tuple[dict[str, float], dict[str, Any]]]) -> dict[str, float]:
    """The setting with the best final validation AP; ties to the package default, then to the
    first in ``GRID`` order (whatever order the runs finished in)."""
    default = {k: v for k, v in DEFAULTS.items() if k in results[0][0]}
    best = max(r["AP"] for _, r in results)
    tied = sorted((s for s, r in results if r["AP"] == best), key=GRID[method].index)
    return next((s for s in tied if s == default), tied[0])


def run_all(args) -> tuple[dict, dict, dict]:
    """Tuning runs, chosen settings, test runs: {order: {method: [results per seed]}}."""
    runner = Runner(args.workers)
    tune_order = args.orders[0]  # settings chosen there hold for every order
    tuning: dict[str, dict[str, list]] = {tune_order: {}}
    chosen: dict[str, dict[str, dict[str, float]]] = {o: {} for o in args.orders}
    tests: dict[str, dict[str, list]] = {o: {m: [] for m in args.methods} for o in args.orders}
    pending: dict[Future, tuple] = {}

    def test_jobs(order: str, method: str) -> None:
        setting = chosen[order].get(method, {})
        for seed in args.seeds:
            pending[runner.submit(_job(args, order, method, setting, seed, "test"))] = ("test", order, method)

    def ready(order: str, method: str) -> bool:
        needs = ["iv-guided", "replay"] if method == "iv-guided-replay" else [method]
        return all(m in chosen[order] for m in needs)

    for method in args.methods:
        if args.tune and method not in ("plain", "iv-guided-replay"):
            for setting in GRID[method]:
                job = _job(args, tune_order, method, setting, 0, "validation")
                pending[runner.submit(job)] = ("tune", tune_order, method, setting)
    started: set[tuple[str, str]] = set()

    def start_ready() -> None:
        for order in args.orders:
            for method in args.methods:
                if (order, method) in started:
                    continue
                if not args.tune or method == "plain":
                    chosen[order][method] = {}
                elif method == "iv-guided-replay":
                    if not ready(order, method):
                        continue
                    chosen[order][method] = {**chosen[order]["iv-guided"], **chosen[order]["replay"]}
                elif len(tuning[tune_order].get(method, [])) < len(GRID[method]):
                    continue
                else:
                    chosen[order][method] = _choose(method, tuning[tune_order][method])
                started.add((order, method))
                test_jobs(order, method)

    start_ready()
    while pending:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for future in done:
            what = pending.pop(future)
            results = future.result()
            if what[0] == "tune":
                _, order, method, setting = what
                tuning[order].setdefault(method, []).append((setting, results))
                print(
                    f"tune {order} {method} {_label(setting)}: validation AP {results['AP']:.3f}", flush=True
                )
            else:
                _, order, method = what
                tests[order][method].append(results)
                seed = results["settings"]["seed"]
                print(
                    f"test {order} {method} seed {seed}: AP {results['AP']:.3f} BWT {results['BWT']:+.3f}",
                    flush=True,
                )
        start_ready()
    for order in tests:  # seeds in order, whatever order the runs finished in
        for method in tests[order]:
            tests[order][method].sort(key=lambda r: r["settings"]["seed"])
    return tuning, chosen, tests


# -- tables -----------------------------------------------------------------------------------------


def summary(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]"


def rows(method: str, results: list[dict]) -> list[tuple[str, list[float], list[float], list[float]]]:
    """(label, AP, BWT, abilities change) per seed: the method, and its repair rows."""
    out = [
        (
            method,
            [r["AP"] for r in results],
            [r["BWT"] for r in results],
            [r["ability_retention"] for r in results],
        )
    ]
    if all("repair" in r for r in results):
        for key, name in (("task_given_scores", "task given"), ("routed_scores", "routed")):
            out.append((
                f"{method} + IV repair ({name})",
                [r["repair"][key]["AP"] for r in results],
                [r["repair"][key]["BWT"] for r in results],
                [r["ability_retention"] for r in results],  # the repair adds IVs to task prompts only
            ))  # fmt: skip
    return out


def order_table(order: str, tests: dict[str, list[dict]], chosen: dict, tuning: dict) -> str:
    tasks = next(iter(tests.values()))[0]["tasks"]
    lines = [
        f"**{order}** ({', '.join(tasks)}):",
        "",
        "| method | setting (chosen on validation) | AP | BWT | held-out abilities, change | routing accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, results in tests.items():
        if not results:
            continue
        routing = (
            summary([r["repair"]["routing_accuracy"] for r in results])
            if all("repair" in r for r in results)
            else "-"
        )
        for label, ap, bwt, ability in rows(method, results):
            setting = _label(chosen.get(method, {})) if label == method else ""
            lines.append(
                f"| {label} | {setting} | {summary(ap)} | {summary(bwt)} | {summary(ability)} | "
                f"{routing if 'routed' in label else ''} |"
            )
    lines += ["", "Final accuracy per task, mean over seeds (with the routed repair in brackets):", ""]
    lines += ["| method | " + " | ".join(tasks) + " |", "| --- | " + " | ".join("---:" for _ in tasks) + " |"]
    for method, results in tests.items():
        if not results:
            continue
        cells = []
        for j, task in enumerate(tasks):
            final = statistics.fmean(r["accuracy_matrix"][-1][j] for r in results)
            cell = f"{final:.2f}"
            if all("repair" in r for r in results):
                cell += f" ({statistics.fmean(r['repair']['routed'][task] for r in results):.2f})"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if tuning:
        lines += ["", "Validation AP of every setting tried (seed 0):", ""]
        for method, tried in tuning.items():
            lines.append(
                f"- {method}: "
                + ", ".join(
                    f"{_label(s)} {r['AP']:.3f}" for s, r in sorted(tried, key=lambda t: _label(t[0]))
                )
            )
    return "\n".join(lines)


# -- the forgetting monitor -------------------------------------------------------------------------


def monitor_points(tests: dict) -> list[tuple[str, float, float]]:
    """(run id, the stage's KL from the model before it, the held-out abilities' drop over the stage)."""
    points = []
    for order, methods in tests.items():
        for method, results in methods.items():
            for r in results:
                run = f"{order}/{method}/{r['settings']['seed']}"
                for s, kl in enumerate(r.get("forgetting_kl") or [], start=1):
                    if kl is not None:
                        drop = r["abilities_mean"][s - 1] - r["abilities_mean"][s]
                        points.append((run, kl["forward"], drop))
    return points


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share their mean rank
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    norm = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / norm if norm else float("nan")


def spearman_interval(points: list[tuple[str, float, float]], n: int = 2000) -> tuple[float, float, float]:
    """rho, and its 95% interval from resampling whole runs (a run's stages are not independent)."""
    runs: dict[str, list[tuple[float, float]]] = {}
    for run, x, y in points:
        runs.setdefault(run, []).append((x, y))
    ids = sorted(runs)
    rng = random.Random(0)
    rhos = []
    for _ in range(n):
        sample = [p for i in rng.choices(ids, k=len(ids)) for p in runs[i]]
        rho = spearman([p[0] for p in sample], [p[1] for p in sample])
        if not math.isnan(rho):
            rhos.append(rho)
    rhos.sort()
    rho = spearman([p[1] for p in points], [p[2] for p in points])
    if not rhos:  # no variation to rank
        return rho, float("nan"), float("nan")
    return rho, rhos[int(0.025 * len(rhos))], rhos[int(0.975 * len(rhos)) - 1]


# -- plots -----------------------------------------------------------------------------------------


def plot_curves(tests: dict, path: Path) -> None:
    from ivtrainer.evaluation.plotting import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(len(tests), 2, figsize=(11, 4 * len(tests)), squeeze=False)
    for row, (order, methods) in enumerate(tests.items()):
        tasks = next(iter(methods.values()))[0]["tasks"]
        stages = range(len(tasks) + 1)
        for method, results in methods.items():
            if not results:
                continue
            seen = [
                statistics.fmean(statistics.fmean(r["accuracy_matrix"][s][: max(s, 1)]) for r in results)
                for s in stages
            ]
            axes[row][0].plot(stages, seen, marker="o", label=method)
            axes[row][1].plot(
                stages, [statistics.fmean(r["abilities_mean"][s] for r in results) for s in stages], marker="o",
                label=method,
            )  # fmt: skip
        for ax, title in zip(
            axes[row], ("tasks trained so far: mean accuracy", "held-out abilities (5-shot ICL)"), strict=True
        ):
            ax.set_xticks(list(stages), ["before", *tasks], rotation=30, ha="right")
            ax.set_title(f"{order}: {title}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_pareto(tests: dict, path: Path) -> None:
    from ivtrainer.evaluation.plotting import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tests), figsize=(6 * len(tests) + 3, 4.5), squeeze=False)
    for ax, (order, methods) in zip(axes[0], tests.items(), strict=True):
        for i, (method, results) in enumerate(methods.items()):
            if not results:
                continue
            for label, ap, _, ability in rows(method, results):  # colour: the method; marker: the repair
                marker = "*" if "task given" in label else "^" if "routed" in label else "o"
                ax.errorbar(
                    statistics.fmean(ability), statistics.fmean(ap),
                    xerr=[[statistics.fmean(ability) - min(ability)], [max(ability) - statistics.fmean(ability)]],
                    yerr=[[statistics.fmean(ap) - min(ap)], [max(ap) - statistics.fmean(ap)]],
                    fmt=marker, markersize=8, capsize=2, label=label, color=f"C{i}", alpha=0.6 if marker == "*" else 1,
                )  # fmt: skip
        ax.set_xlabel("held-out abilities, change from before the sequence")
        ax.set_ylabel("AP (final mean accuracy over the tasks)")
        ax.set_title(f"{order}: means over seeds, [min, max]")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(0.79, 0.5))
    fig.tight_layout(rect=(0, 0, 0.79, 1))
    _save(fig, path)


def plot_monitor(points: list[tuple[str, float, float]], rho: tuple[float, float, float], path: Path) -> None:
    from ivtrainer.evaluation.plotting import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    methods = sorted({p[0].split("/")[1] for p in points})
    for method in methods:
        mine = [p for p in points if p[0].split("/")[1] == method]
        ax.scatter([p[1] for p in mine], [p[2] for p in mine], label=method, s=18)
    ax.set_xscale("log")
    ax.set_xlabel("KL(before || after) on the stage's training rows (forgetting monitor)")
    ax.set_ylabel("held-out abilities' drop over the stage")
    ax.set_title(f"Spearman rho {rho[0]:.2f} [{rho[1]:.2f}, {rho[2]:.2f}], {len(points)} stages")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _hardware(args) -> str:
    """Where the runs ran: recorded in the cache by the machine that trained them."""
    path = args.cache / "hardware.txt"
    if not args.report:
        import os

        import torch

        name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        args.cache.mkdir(parents=True, exist_ok=True)
        path.write_text(f"run on {name}, {args.workers} at once")
    text = path.read_text() if path.is_file() else "hardware not recorded"
    return text[0].upper() + text[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", nargs="*", default=["order1", "order2"], choices=sorted(ORDERS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument(
        "--tune", action="store_true", help="choose each method's knob on validation rows first"
    )
    parser.add_argument("--repair", action="store_true", help="score IV repair on every test run")
    parser.add_argument("--workers", type=int, default=1, help="runs at once (processes)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the runs are kept")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: to check the machinery on a tiny --model"
    )
    parser.add_argument("--report", action="store_true", help="read finished runs only, train nothing")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    if args.write_readme and (args.smoke or args.model != "default"):
        parser.error("--write-readme writes the default model's figures: drop --smoke and --model")
    if "iv-guided-replay" in args.methods and args.tune and not {"iv-guided", "replay"} <= set(args.methods):
        parser.error("--tune with iv-guided-replay needs iv-guided and replay too (it takes their settings)")

    tuning, chosen, tests = run_all(args)
    command = (
        f"`python benchmarks/continual.py --orders {' '.join(args.orders)} --seeds {' '.join(map(str, args.seeds))}"
        + (" --tune" if args.tune else "") + (" --repair" if args.repair else "")
        + " --write-readme`"
    )  # fmt: skip
    header = (
        f"{_hardware(args)}. SmolLM2-135M-Instruct, LoRA r8 (q, v) per task, {args.n_train} training rows per task, "
        f"{args.epochs:g} epochs, seeds {' '.join(map(str, args.seeds))}; exact match on 48 test rows per task, "
        f"held-out abilities with fixed demonstrations ({command}). Means over seeds, [min, max]."
    )
    text = [header, ""]
    for order in args.orders:
        text += [order_table(order, tests[order], chosen[order], tuning.get(order, {})), ""]
    points = monitor_points(tests)
    rho = spearman_interval(points) if len(points) > 3 else None
    if rho is not None:
        text.append(
            f"Forgetting monitor: Spearman rho between a stage's KL(before || after) on 16 of its training rows "
            f"and the held-out abilities' drop over that stage: **{rho[0]:.2f}** (95% interval {rho[1]:.2f} to "
            f"{rho[2]:.2f}, resampling whole runs; {len(points)} stages of {len({p[0] for p in points})} runs)."
        )
    print("\n".join(text))
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.cache / "summary.json").write_text(
        json.dumps(
            {
                "chosen": chosen,
                "tests": tests,
                "tuning": {o: {m: [[s, r] for s, r in v] for m, v in t.items()} for o, t in tuning.items()},
            },
            indent=1,
        )
    )
    if args.write_readme:
        plot_curves(tests, IMG / "continual.png")
        plot_pareto(tests, IMG / "continual_pareto.png")
        images = "![continual learning curves](img/continual.png)\n\n![AP against held-out abilities](img/continual_pareto.png)"
        if rho is not None:
            plot_monitor(points, rho, IMG / "forgetting_monitor.png")
            images += "\n\n![forgetting monitor against the held-out drop](img/forgetting_monitor.png)"
        replace_block("continual", "\n".join(text) + "\n" + images)


if __name__ == "__main__":
    main()
