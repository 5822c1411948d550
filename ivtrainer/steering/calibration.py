"""Calibrating an instruction vector: the edit layer, the strength and the number of heads, chosen
jointly by zero-shot first-token accuracy on extraction pairs (never on held-out pairs).

The papers' fixed choice (10 heads, layer L/3, strength 1) was tuned on 6B-7B models; on small
models it barely steers (docs/instruction-vectors.md). The search is cheap because every setting
only changes the prompt's last token: each prompt runs once (its KV cache kept), and then every
setting is one more token of a tree-masked step, as in :func:`ivtrainer.steering.mediation.cie_exact`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ivtrainer.modeling.architectures import ModelLayout
from ivtrainer.modeling.hooks import cache_argument, hooks, output_cache
from ivtrainer.steering.icl import EncodedPrompt, first_token_accuracy
from ivtrainer.steering.intervention import add_to_residual

logger = logging.getLogger(__name__)

__all__ = [
    "HEAD_COUNTS",
    "MIN_HITS",
    "MIN_PAIRS",
    "STRENGTHS",
    "Calibration",
    "ZeroShotScorer",
    "calibrate",
    "warn_unusual_strength",
]

STRENGTHS = (1.0, 2.0, 4.0, 8.0)
HEAD_COUNTS = (5, 10, 20)
#: Fewer extraction pairs than this leave too few calibration prompts for a stable choice.
MIN_PAIRS = 16
#: A choice resting on fewer correct prompts than this is reported as unreliable.
MIN_HITS = 5
#: Strengths outside this range are allowed but reported: they usually swamp the residual stream.
USUAL_STRENGTHS = (0.1, 20.0)


def warn_unusual_strength(strength: float) -> None:
    """One line when an explicitly passed strength is outside :data:`USUAL_STRENGTHS`."""
    low, high = USUAL_STRENGTHS
    if not low <= strength <= high:
        logger.warning(
            "strength %g is outside the usual range %g-%g: the vector may swamp the residual stream "
            "(calibrated strengths are 1-8)",
            strength, low, high,
        )  # fmt: skip


Setting = tuple[int, int, float]  # (n_heads, layer, strength)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The chosen setting, what it scored on the calibration prompts, and the searched grid."""

    edit_layer: int
    strength: float
    n_heads: int
    accuracy: float  # zero-shot + IV at the choice, on the calibration prompts
    base_accuracy: float  # zero-shot without the IV, same prompts
    n_prompts: int
    hits: int
    searched: list[list[float]]  # [n_heads, layer, strength, accuracy] for every setting tried

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def grid(self, n_heads: int | None = None) -> tuple[list[int], list[float], list[list[float | None]]]:
        """Layers, strengths and the accuracy table (``None`` where not searched) at ``n_heads``
        (default: the chosen number), for the layer x strength heatmap."""
        k = self.n_heads if n_heads is None else n_heads
        rows = [r for r in self.searched if int(r[0]) == k]
        layers = sorted({int(r[1]) for r in rows})
        strengths = sorted({float(r[2]) for r in rows})
        table: list[list[float | None]] = [[None] * len(strengths) for _ in layers]
        for _, layer, strength, acc in rows:
            table[layers.index(int(layer))][strengths.index(float(strength))] = acc
        return layers, strengths, table


class ZeroShotScorer:
    """First-token accuracy of prompts with ``(layer, vector)`` settings added at their last token,
    many settings per forward: each prompt's prefix is cached once, then each setting is one row
    of a tree-masked last-token step (row 0 adds nothing and is checked against a plain forward;
    a model whose attention ignores custom masks falls back to one batched forward per setting)."""

    def __init__(
        self, model: nn.Module, layout: ModelLayout, prompts: Sequence[EncodedPrompt], *, chunk: int = 64
    ):
        self.model, self.layout, self.prompts, self.chunk = model, layout, list(prompts), chunk
        self.device = next(model.parameters()).device
        self._caches: list[Any] = []
        self._tree = True
        base_right = []
        with torch.no_grad():
            for p in self.prompts:
                ids = torch.tensor([p.input_ids], device=self.device)
                out = model(ids, use_cache=True)
                base_right.append(int(out.logits[0, -1].argmax()) == p.answer_id)
                cache = output_cache(out)
                try:  # a cache that cannot be rolled back (sliding-window layers): plain forwards
                    cache.crop(-1)
                except Exception:
                    self._tree = False
                self._caches.append(cache)
        self._base_right = base_right
        self.base_hits = sum(base_right)

    @property
    def base_accuracy(self) -> float:
        return self.base_hits / len(self.prompts)

    @torch.no_grad()
    def hits(self, settings: Sequence[tuple[int, torch.Tensor]], progress: tqdm | None = None) -> list[int]:
        """How many prompts each ``(layer, vector)`` setting gets right."""
        if not settings:
            return []
        if self._tree:
            try:
                return self._tree_hits(settings, progress)
            except Exception as exc:  # any failure here means: use the plain batched path
                logger.warning(
                    "shared-prefix calibration unsupported for %s (%s); using batched forwards",
                    self.layout.model_type,
                    exc,
                )
                self._tree = False
        out = []
        for layer, vector in settings:
            with add_to_residual(self.model, [(layer, vector)]):
                out.append(round(first_token_accuracy(self.model, self.prompts) * len(self.prompts)))
            if progress is not None:
                progress.update(len(self.prompts) / len(settings))
        return out

    def _tree_hits(self, settings, progress) -> list[int]:
        counts = [0] * len(settings)
        for prompt, cache, base in zip(self.prompts, self._caches, self._base_right, strict=True):
            for start in range(0, len(settings), self.chunk):
                part = settings[start : start + self.chunk]
                right = self._step(prompt, cache, part, base)
                for i, ok in enumerate(right):
                    counts[start + i] += int(ok)
            if progress is not None:
                progress.update(1)
        return counts

    def _step(self, prompt: EncodedPrompt, cache, settings, base_right: bool) -> list[bool]:
        """Row 0 plain, row i + 1 with setting i; every row sees the cached prefix and itself."""
        n_prefix = len(prompt.input_ids) - 1
        r = len(settings) + 1
        dtype = next(self.model.parameters()).dtype
        mask = torch.full((1, 1, r, n_prefix + r), torch.finfo(dtype).min, dtype=dtype, device=self.device)
        mask[..., :n_prefix] = 0
        mask[0, 0, torch.arange(r), n_prefix + torch.arange(r)] = 0
        by_layer: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for i, (layer, vector) in enumerate(settings):
            by_layer.setdefault(layer, []).append((i + 1, vector))
        handles = [
            self.layout.layers[layer].register_forward_hook(_add_rows(rows))
            for layer, rows in by_layer.items()
        ]
        ids = torch.full((1, r), prompt.input_ids[-1], device=self.device)
        try:
            with hooks(*handles):
                logits = self.model(
                    ids,
                    **{cache_argument(self.model): cache},
                    attention_mask=mask,
                    position_ids=torch.full((1, r), n_prefix, device=self.device),
                    use_cache=True,
                ).logits[0]
        finally:
            cache.crop(-r)
        predicted = logits.argmax(-1).tolist()
        if (predicted[0] == prompt.answer_id) != base_right:
            raise RuntimeError("the unchanged tree row differs from the plain forward")
        return [p == prompt.answer_id for p in predicted[1:]]


def _add_rows(rows: list[tuple[int, torch.Tensor]]):
    index = torch.tensor([r for r, _ in rows])
    stacked = torch.stack([v for _, v in rows])

    def hook(module: nn.Module, args: tuple, output):
        hidden = output[0] if isinstance(output, tuple) else output
        edited = hidden.clone()
        edited[0, index.to(hidden.device)] += stacked.to(hidden.device, hidden.dtype)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    return hook


def calibrate(
    model: nn.Module,
    layout: ModelLayout,
    prompts: Sequence[EncodedPrompt],
    vectors: dict[int, torch.Tensor],
    *,
    default_layer: int,
    edit_layer: int | None = None,
    strength: float | None = None,
    progress: bool | None = None,
) -> Calibration:
    """Choose ``(n_heads, layer, strength)`` by zero-shot accuracy on ``prompts``.

    ``vectors`` maps each candidate number of heads to its vector (top-k heads of the CIE table).
    A fixed ``edit_layer`` or ``strength`` is not searched. Coarse to fine: every ~L/10-th layer at
    strengths 2 and 4 with the middle head count, then the layers around the two best, then every
    head count x every strength at the best layer (with one head count: the layers around the two
    best at every strength, two passes); it stops early once a setting gets every prompt right. Ties go to
    the lower strength, then the layer nearer ``default_layer``, then the middle head count.
    """
    counts = sorted(vectors)
    middle = counts[len(counts) // 2]
    strengths = [float(strength)] if strength is not None else list(STRENGTHS)
    n_layers = layout.n_layers
    all_layers = [edit_layer] if edit_layer is not None else list(range(n_layers))
    stride = max(1, round(n_layers / 10))
    scorer = ZeroShotScorer(model, layout, prompts)
    n = len(prompts)
    found: dict[Setting, int] = {}

    def key(s: Setting) -> tuple:
        return (found[s], -s[2], -abs(s[1] - default_layer), -abs(s[0] - middle))

    def run(candidates: list[Setting], bar: tqdm) -> None:
        new = [c for c in dict.fromkeys(candidates) if c not in found]
        hits = scorer.hits([(layer, s * vectors[k]) for k, layer, s in new], bar)
        found.update(zip(new, hits, strict=True))

    def perfect() -> bool:
        return bool(found) and max(found.values()) == n

    coarse = all_layers if len(all_layers) == 1 else all_layers[::stride]
    scan = [s for s in strengths if s in (2.0, 4.0)] or strengths  # the layer scan's strengths
    # one head count (given, or a head set's): the layers near the best are tried at every
    # strength, and no third pass is needed (one step per prompt fewer)
    near_strengths = strengths if len(counts) == 1 and len(all_layers) > 1 else scan
    passes = 2 if len(counts) == 1 and len(all_layers) > 1 else 3
    with tqdm(
        total=passes * n,
        desc="calibration (layer x strength x heads)",
        unit="prompt",
        disable=_disabled(progress),
    ) as bar:
        run([(middle, layer, s) for layer in coarse for s in scan], bar)
        if not perfect() and len(all_layers) > 1:
            best_layers = sorted({s[1] for s in sorted(found, key=key, reverse=True)[:2]})
            near = [x for b in best_layers for x in range(b - stride + 1, b + stride) if 0 <= x < n_layers]
            run([(middle, layer, s) for layer in near for s in near_strengths], bar)
        if not perfect() and passes == 3:
            layer = max(found, key=key)[1]
            run([(k, layer, s) for k in counts for s in strengths], bar)
    best = max(found, key=key)
    return Calibration(
        edit_layer=best[1],
        strength=best[2],
        n_heads=best[0],
        accuracy=round(found[best] / n, 4),
        base_accuracy=round(scorer.base_accuracy, 4),
        n_prompts=n,
        hits=found[best],
        searched=[[k, layer, s, round(h / n, 4)] for (k, layer, s), h in sorted(found.items())],
    )


def _disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: ``None`` shows the bar only in a terminal."""
    return None if progress is None else not progress
