"""Figures: the layers x heads causal-effect heatmap, the picture people look at first."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["plot_accuracy_curves", "plot_accuracy_matrix", "plot_calibration", "plot_cie", "plot_scores"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ivtrainer.errors import MissingDependencyError

        raise MissingDependencyError("plotting needs matplotlib: pip install 'ivtrainer[demo]'") from None
    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    from ivtrainer.utils.outputs import atomic_file

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def plot_cie(cie: torch.Tensor, path: str | os.PathLike, *, heads=(), title: str | None = None) -> Path:
    """Save a ``(n_layers, n_heads)`` CIE table as a PNG heatmap, chosen heads outlined."""
    plt = _pyplot()
    cie = cie.detach().float().cpu()
    n_layers, n_heads = cie.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n_heads + 2), max(3.0, 0.22 * n_layers + 1.5)))
    limit = float(cie.abs().max()) or 1.0
    image = ax.imshow(cie.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
    for layer, head in heads:
        ax.add_patch(
            plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5)
        )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_title(title or "causal indirect effect (outlined: chosen heads)", fontsize=10)
    fig.colorbar(image, ax=ax, label="mean CIE (probability)")
    fig.tight_layout()
    return _save(fig, path)


def plot_scores(runs: dict[str, dict[str, float]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Grouped bars of :func:`~ivtrainer.evaluation.forgetting.evaluate_abilities` scores (0-1), one group per
    measure (the ICL tasks, the facts, the new task), one bar per run (``{"before": ..., ...}``)."""
    plt = _pyplot()
    first = next(iter(runs.values()))
    keys = [k for k in first if k.startswith("icl/")]
    keys += [k for k in ("facts/completion", "facts/instruction", "new_task") if k in first]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(runs)
    for i, (name, values) in enumerate(runs.items()):
        ax.bar([x + i * width for x in range(len(keys))], [100 * values[k] for k in keys], width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
    ax.set_xticklabels([k.split("/")[-1] for k in keys], rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_calibration(calibration: dict, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Save the calibration's layer x strength accuracy table (at the chosen number of heads) as a
    PNG heatmap; settings the coarse-to-fine search skipped are blank, the choice is outlined."""
    import math

    from ivtrainer.steering.calibration import Calibration

    plt = _pyplot()
    layers, strengths, table = Calibration(**calibration).grid()
    values = [[math.nan if v is None else 100 * v for v in row] for row in table]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(strengths) + 2.5), max(3.0, 0.22 * len(layers) + 1.5)))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto", origin="lower")
    row, col = layers.index(calibration["edit_layer"]), strengths.index(calibration["strength"])
    ax.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(strengths)), [f"x{s:g}" for s in strengths])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("strength")
    ax.set_ylabel("edit layer")
    default = (
        f"zero-shot accuracy on {calibration['n_prompts']} extraction pairs, {calibration['n_heads']} heads "
        f"(without the IV: {100 * calibration['base_accuracy']:.0f}%)"
    )
    ax.set_title(title or default, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_matrix(
    matrix: list[list[float]], tasks: list[str], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """A continual run's stage x task accuracy matrix (row 0: before training) as a PNG heatmap."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2, 0.6 * len(matrix) + 1.5))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), ["before", *(f"after {t}" for t in tasks)])
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="exact match")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_curves(
    matrix: list[list[float]], tasks: list[str], abilities: list[float], path: str | os.PathLike
) -> Path:
    """Each task's accuracy after each stage, and the held-out abilities' mean (dashed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    stages = range(len(matrix))
    for j, name in enumerate(tasks):
        ax.plot(stages, [row[j] for row in matrix], marker="o", label=name)
    ax.plot(stages, abilities, color="black", linestyle="--", label="held-out abilities")
    ax.set_xticks(list(stages), ["before", *tasks], rotation=30, ha="right")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
