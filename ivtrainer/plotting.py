"""Figures: the layers x heads causal-effect heatmap, the picture people look at first."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["plot_cie"]


def plot_cie(cie: torch.Tensor, path: str | os.PathLike, *, heads=(), title: str | None = None) -> Path:
    """Save a ``(n_layers, n_heads)`` CIE table as a PNG heatmap, chosen heads outlined."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError("plotting needs matplotlib: pip install 'ivtrainer[demo]'") from None

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
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out
