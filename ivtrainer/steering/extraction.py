"""Extracting an instruction vector by causal mediation (Todd et al.'s function-vector procedure):
mean head outputs on clean few-shot prompts, each head's causal indirect effect on shuffled-label
prompts, the top heads' contributions summed, then the heads, layer and strength calibrated."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ivtrainer.datasets.tasks import load_examples
from ivtrainer.errors import InvalidInputError
from ivtrainer.modeling.architectures import ModelLayout, get_layout
from ivtrainer.modeling.hooks import eval_mode
from ivtrainer.modeling.loading import model_source
from ivtrainer.steering.calibration import HEAD_COUNTS, MIN_HITS, MIN_PAIRS, warn_unusual_strength
from ivtrainer.steering.calibration import calibrate as calibrate_vector
from ivtrainer.steering.extraction_config import ExtractionConfig
from ivtrainer.steering.head_set import HeadSet
from ivtrainer.steering.icl import PromptBuilder, check_extraction_sizes, check_prompts_fit
from ivtrainer.steering.instruction_vector import InstructionVector
from ivtrainer.steering.mediation import mean_cie, mean_head_activations
from ivtrainer.utils.checks import finite_number

logger = logging.get_logger(__name__)

__all__ = ["HEAD_SET_MEAN_PROMPTS", "extract_instruction_vector", "head_contributions"]


@torch.no_grad()
def head_contributions(layout: ModelLayout, mean: torch.Tensor, heads: list[tuple[int, int]]) -> torch.Tensor:
    """``(len(heads), hidden)``: each head's mean output pushed through its output projection.

    Computed as ``proj(x) - proj(0)`` with only that head's slice of ``x`` set, so biases cancel
    and Linear, GPT-2 Conv1D and PEFT-wrapped projections are all handled alike.
    """
    out = []
    for layer, head in heads:
        proj = layout.attn_outputs[layer]
        weight = next(proj.parameters())
        x = torch.zeros(2, layout.n_heads, layout.head_dim, dtype=weight.dtype, device=weight.device)
        x[0, head] = mean[layer, head].to(x)
        y = proj(x.flatten(-2))
        out.append((y[0] - y[1]).float().cpu())
    return torch.stack(out)


def _validate(
    layout: ModelLayout,
    examples,
    n_heads,
    n_shots,
    n_mean_prompts,
    n_cie_prompts,
    method,
    edit_layer,
    strength,
    calibrate,
    batch_size=1,
):
    if method not in ("exact", "atp"):
        raise InvalidInputError(f"method must be 'exact' or 'atp', not {method!r}")
    for name, value, low in (
        ("n_shots", n_shots, 0),
        ("n_mean_prompts", n_mean_prompts, 1),
        ("n_cie_prompts", n_cie_prompts, 1),
        ("batch_size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
    check_extraction_sizes(examples, n_shots=n_shots)
    total = layout.n_layers * layout.n_heads
    if n_heads is not None and (not isinstance(n_heads, int) or not 1 <= n_heads <= total):
        raise InvalidInputError(
            f"n_heads must be between 1 and the model's {layout.n_layers} x {layout.n_heads} = {total} heads, got {n_heads!r}"
        )
    if edit_layer not in (None, "auto") and not (
        isinstance(edit_layer, int) and 0 <= edit_layer < layout.n_layers
    ):
        raise InvalidInputError(
            f"edit_layer must be None, 'auto' or a layer in [0, {layout.n_layers}), got {edit_layer!r}"
        )
    if strength is not None:
        strength = finite_number("strength", strength)
        if strength <= 0:
            raise InvalidInputError(f"strength must be > 0, got {strength}")
        warn_unusual_strength(strength)
    if (calibrate or edit_layer == "auto") and len(examples) < MIN_PAIRS:
        raise InvalidInputError(
            f"calibration needs at least {MIN_PAIRS} extraction pairs for a stable choice, got {len(examples)}; "
            "pass more pairs, or calibrate=False (--no-calibrate) for the papers' fixed layer and strength"
        )


def extract_instruction_vector(
    model: nn.Module,
    tokenizer: Any,
    examples: Any,
    config: ExtractionConfig | None = None,
    *,
    name: str | None = None,
    heads: HeadSet | str | os.PathLike | None = None,
    progress: bool | None = None,
    **settings: Any,
) -> InstructionVector:
    """Extract the instruction vector of a task (Todd et al.'s function-vector procedure).

    How (``config`` and ``settings``: an :class:`~ivtrainer.steering.extraction_config.ExtractionConfig`
    and any of its fields by name, e.g. ``n_heads=10, calibrate=False``):

    1. Mean head outputs at the last token over ``n_mean_prompts`` clean ``n_shots``-shot prompts
       (default 100, Todd et al.'s; 25 with ``heads=``, where the mean only forms the vector:
       ``benchmarks/universal_heads_cost.py`` measures the same held-out lift at a quarter the cost).
    2. Causal indirect effect of every head on ``n_cie_prompts`` shuffled-label prompts
       (``method="exact"``: shared-prefix patching, equal to the plain loop; ``"atp"``: attribution
       patching, one forward and one backward per prompt).
    3. The heads with the largest mean CIE; the vector is the sum of their outputs.
    4. ``calibrate=True`` (default): the number of heads (5, 10 or 20), the edit layer and the
       strength (1, 2, 4 or 8) chosen jointly by zero-shot accuracy on ``n_calibration_prompts``
       extraction pairs (:mod:`ivtrainer.steering.calibration`); the strength is stored in the
       vector and used by :meth:`InstructionVector.apply` and the trainers. ``calibrate=False``:
       the papers' fixed choice, 10 heads at layer ``n_layers // 3``, strength 1.

    Args:
        examples: ``{"input", "output"}`` dicts, a ``datasets.Dataset``, a JSON/JSONL path or a
            built-in task name (its extraction split).
        config: the extraction settings (default: ``ExtractionConfig()``); ``settings`` change
            single fields of it. ``n_heads``, ``edit_layer``, ``strength`` fix that part of the
            choice (not searched); ``edit_layer="auto"`` with ``calibrate=False`` searches the layer only.
        name: the task's name in the artifact (default: the built-in task's name or the file's stem).
        heads: a :class:`~ivtrainer.steering.head_set.HeadSet` (or its folder / Hub id): rank the
            heads by its mean CIE over many tasks instead of measuring this task's (step 2 skipped;
            the public FvForgetting code's universal heads; the mean activations are read only
            up to the deepest candidate head's layer).
        progress: progress bars; ``None`` shows them in a terminal only.

    All arguments are checked before any forward pass. The tokenizer needs no pad token.
    """
    c = ExtractionConfig.of(config, **settings)
    n_heads, n_shots, n_mean_prompts, n_cie_prompts = c.n_heads, c.n_shots, c.n_mean_prompts, c.n_cie_prompts
    method, calibrate, edit_layer, strength = c.method, c.calibrate, c.edit_layer, c.strength
    n_calibration_prompts, chat_template, seed, batch_size = (
        c.n_calibration_prompts,
        c.chat_template,
        c.seed,
        c.batch_size,
    )
    task = name or _task_name(examples)
    if n_mean_prompts is None:
        n_mean_prompts = 100 if heads is None else HEAD_SET_MEAN_PROMPTS
    data = load_examples(examples)
    layout = get_layout(model)
    _validate(
        layout, data, n_heads, n_shots, n_mean_prompts, n_cie_prompts, method, edit_layer, strength, calibrate,
        batch_size,
    )  # fmt: skip
    head_set = HeadSet.from_pretrained(heads) if isinstance(heads, (str, os.PathLike)) else heads
    if head_set is not None:
        head_set.check_compatible(model)
    builder = PromptBuilder(tokenizer, chat_template=chat_template)
    rng = random.Random(seed)
    clean = builder.sample(data, n_mean_prompts, n_shots, rng)
    corrupted = builder.sample(data, n_cie_prompts, n_shots, rng, shuffle_labels=True)
    check_prompts_fit(model, [*clean, *corrupted], n_shots=n_shots)
    bars = None if progress is None else not progress

    total = layout.n_layers * layout.n_heads
    if n_heads is not None:
        counts = [n_heads]
    elif head_set is not None and head_set.n_top is not None:  # the set says how many: not searched
        counts = [head_set.n_top]
    elif calibrate:
        counts = [k for k in HEAD_COUNTS if k <= total] or [total]
    else:
        counts = [min(10, total)]

    with eval_mode(model):
        layers = None
        if head_set is not None:  # only the candidate heads' layers are read, so the forward stops early
            cie = head_set.cie.clone()
            candidates = _top(torch.argsort(cie.flatten(), descending=True), max(counts), layout)
            layers = sorted({layer for layer, _ in candidates})
        with tqdm(total=len(clean), desc="mean head activations", unit="prompt", disable=bars) as bar:
            mean = mean_head_activations(
                model, layout, clean, layers=layers, batch_size=batch_size, progress=bar.update
            )
        if head_set is None:
            cie = mean_cie(model, layout, corrupted, mean, method=method, disable=bars)

        if not bool((cie > 0).any()):
            logger.warning(
                "no head has a positive causal effect on this task (max CIE %.3g): the instruction vector "
                "will not steer; check the task data, or use more prompts (n_cie_prompts)",
                float(cie.max()),
            )
        order = torch.argsort(cie.flatten(), descending=True)
        default_layer = layout.n_layers // 3
        metrics: dict[str, Any] = {}
        if calibrate or edit_layer == "auto":
            vectors = {k: head_contributions(layout, mean, _top(order, k, layout)).sum(0) for k in counts}
            queries = rng.sample(data, min(n_calibration_prompts, len(data)))
            found = calibrate_vector(
                model,
                layout,
                [builder.encode([], q) for q in queries],
                vectors,
                default_layer=default_layer,
                edit_layer=edit_layer if isinstance(edit_layer, int) else None,
                strength=strength if calibrate else (strength or 1.0),
                progress=progress,
            )
            k, edit_layer, strength = found.n_heads, found.edit_layer, found.strength
            metrics["calibration"] = found.as_dict()
            metrics["zero_shot_accuracy"] = found.base_accuracy
            metrics["zero_shot_accuracy_with_iv"] = found.accuracy
            where = f"{task!r}: " if task else ""
            if found.accuracy <= found.base_accuracy:
                logger.warning(
                    "%sthe instruction vector does not raise zero-shot accuracy on %d extraction pairs "
                    "(%.2f with it, %.2f without) at any layer or strength tried: it will not steer",
                    where, found.n_prompts, found.accuracy, found.base_accuracy,
                )  # fmt: skip
            elif found.hits < MIN_HITS:
                logger.warning(
                    "%sthe calibrated layer %d rests on %d hits in %d extraction pairs: an unstable choice; "
                    "use more extraction pairs (n_calibration_prompts) or a task the model can do few-shot",
                    where, edit_layer, found.hits, found.n_prompts,
                )  # fmt: skip
        else:
            k = counts[0]
            edit_layer = default_layer if edit_layer is None else edit_layer
            strength = 1.0 if strength is None else strength
        chosen = _top(order, k, layout)
        vector = head_contributions(layout, mean, chosen).sum(0)

    source = model_source(model)
    return InstructionVector(
        vector=vector,
        edit_layer=int(edit_layer),
        heads=chosen,
        head_scores=[float(cie[layer, head]) for layer, head in chosen],
        cie=cie,
        mean_activations=mean,
        model_name=source["name"] or layout.model_type,
        model_revision=source["revision"],
        model_type=layout.model_type,
        hidden_size=layout.hidden_size,
        n_layers=layout.n_layers,
        n_heads=layout.n_heads,
        head_dim=layout.head_dim,
        task=task,
        strength=float(strength),
        settings={
            "n_heads": k,
            "n_shots": n_shots,
            "n_mean_prompts": n_mean_prompts,
            "n_cie_prompts": n_cie_prompts,
            "method": method,
            "calibrate": calibrate,
            "edit_layer": edit_layer,
            "strength": float(strength),
            "chat_template": chat_template,
            "seed": seed,
            "n_examples": len(data),
            **({"head_set": {"tasks": head_set.tasks, "model": head_set.model_name}} if head_set else {}),
            **({"model_note": source["note"]} if source["note"] else {}),
        },
        metrics=metrics,
    )


#: Mean prompts when a head set is given (no CIE to patch with the mean: it only forms the vector).
HEAD_SET_MEAN_PROMPTS = 25


def _top(order: torch.Tensor, k: int, layout: ModelLayout) -> list[tuple[int, int]]:
    return [divmod(int(i), layout.n_heads) for i in order[:k]]


def _task_name(examples) -> str | None:
    """A built-in task's name, or a task file's stem."""
    if isinstance(examples, (str, os.PathLike)):
        path = Path(examples)
        return path.stem if path.exists() else os.fspath(examples)
    return None
