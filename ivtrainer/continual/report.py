"""A continual run's ``results.md``, its accuracy-matrix heatmap and per-task accuracy curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ivtrainer.utils.outputs import atomic_file

__all__ = ["results_markdown", "write_report"]


def results_markdown(results: dict[str, Any]) -> str:
    names, matrix = results["tasks"], results["accuracy_matrix"]
    settings = results["settings"]
    lines = [
        f"# Continual instruction tuning: {settings['method']}, {'LoRA' if settings['lora'] else 'full'}, "
        f"seed {settings['seed']}",
        "",
        f"Model `{settings['model']}`; tasks in order: {', '.join(names)}. Exact-match accuracy on each task's "
        "test rows after each stage (stage 0: before training).",
        "",
        "| stage | " + " | ".join(names) + " | held-out abilities (5-shot ICL) |",
        "| --- | " + " | ".join("---:" for _ in names) + " | ---: |",
    ]
    for stage, row in enumerate(matrix):
        label = "before" if stage == 0 else f"{stage}: {names[stage - 1]}"
        cells = " | ".join(f"{v:.2f}" for v in row)
        lines.append(f"| {label} | {cells} | {results['abilities_mean'][stage]:.2f} |")
    forgetting = ", ".join(f"{n} {f:.2f}" for n, f in zip(names, results["forgetting"], strict=False))
    seconds = results["seconds"] or {}
    lines += [
        "",
        f"**AP** {results['AP']:.3f}, **BWT** {results['BWT']:+.3f}, **FWT** {results['FWT']:+.3f}; "
        f"forgetting per task: {forgetting or '-'}; held-out abilities {results['ability_retention']:+.3f} "
        "from before to after.",
        "",
        f"Time: training {seconds['train']:.0f} s, evaluation {seconds['evaluate']:.0f} s, IV extraction "
        f"{seconds['iv']:.0f} s (all stages)."
        if seconds
        else "Time: not recorded for every stage.",
    ]
    if results.get("repair"):
        lines += _repair_markdown(names, results["repair"])
    if results.get("lm_eval"):
        lines += ["", "| lm-eval | before | after | change |", "| --- | ---: | ---: | ---: |"]
        for name, values in results["lm_eval"].items():
            lines.append(f"| {name} | {values[0]:.3f} | {values[-1]:.3f} | {values[-1] - values[0]:+.3f} |")
    return "\n".join(lines) + "\n"


def _repair_markdown(names: list[str], repair: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "IV repair on the final model: each task's IV, captured right after its stage, added to its test prompts "
        f"(the task given, or routed: nearest prompt centroid at layer {repair['router_layer']}, routing accuracy "
        f"{repair['routing_accuracy']:.2f}, {repair.get('unrouted', 0.0):.0%} taken for no known task); strengths (multiples of each IV's own) chosen on validation rows.",
        "",
        "| task | final | + IV, task given | + IV, routed | strength |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        lines.append(
            f"| {name} | {repair['without'][name]:.2f} | {repair['task_given'][name]:.2f} | "
            f"{repair['routed'][name]:.2f} | {repair['strengths'][name]:g} |"
        )
    given, routed = repair["task_given_scores"], repair["routed_scores"]
    lines += [
        "",
        f"With repair: **AP** {given['AP']:.3f} (task given), {routed['AP']:.3f} (routed); **BWT** "
        f"{given['BWT']:+.3f}, {routed['BWT']:+.3f}.",
    ]
    return lines


def write_report(out: Path, results: dict[str, Any]) -> None:
    with atomic_file(out / "results.md") as tmp:
        tmp.write_text(results_markdown(results))
    from ivtrainer.errors import MissingDependencyError
    from ivtrainer.evaluation.plotting import plot_accuracy_curves, plot_accuracy_matrix

    names, matrix = results["tasks"], results["accuracy_matrix"]
    try:
        title = f"{results['settings']['method']}: accuracy after each stage"
        plot_accuracy_matrix(matrix, names, out / "accuracy_matrix.png", title=title)
        plot_accuracy_curves(matrix, names, results["abilities_mean"], out / "accuracy_curves.png")
    except MissingDependencyError:  # no matplotlib: the tables are the report
        return
