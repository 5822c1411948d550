"""Reliability, Generality and Locality of knowledge edits (EasyEdit semantics, METHODS 2.1).

The same computation is shipped as the ``evaluate`` module ``ivtrainer/evaluation/metrics/knowledge_update``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ivtrainer.errors import InvalidInputError
from ivtrainer.evaluation.predictions import target_predictions

__all__ = ["evaluate_edits", "locality_reference", "score_tokens"]


def score_tokens(
    predictions: Sequence[Sequence[int]],
    references: Sequence[Sequence[int]],
    kinds: Sequence[str] | None = None,
) -> dict[str, float]:
    """Mean over records of the fraction of positions where prediction equals reference; one mean
    per distinct ``kinds`` entry, or ``{"score": ...}`` without kinds."""
    if len(predictions) != len(references):
        raise InvalidInputError(f"{len(predictions)} predictions but {len(references)} references")
    if kinds is not None and len(kinds) != len(predictions):
        raise InvalidInputError(f"{len(kinds)} kinds for {len(predictions)} predictions")
    sums: dict[str, list[float]] = {}
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        if len(pred) != len(ref) or not ref:
            raise InvalidInputError(
                f"record {i}: {len(pred)} predicted tokens for {len(ref)} reference tokens"
            )
        key = kinds[i] if kinds is not None else "score"
        agree = sum(int(p) == int(r) for p, r in zip(pred, ref, strict=True)) / len(ref)
        sums.setdefault(key, []).append(agree)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def locality_reference(
    model: nn.Module,
    tokenizer,
    records: Sequence[dict[str, str]],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> list[list[int]]:
    """The unedited model's teacher-forced predictions on the locality prompts: compute them once,
    before editing, and pass them to :func:`evaluate_edits` (no second model in memory)."""
    preds = target_predictions(
        model,
        tokenizer,
        [r["locality_prompt"] for r in records],
        [r["locality_ground_truth"] for r in records],
        batch_size=batch_size,
        desc="unedited model (locality)" if progress else None,
    )
    return [p for p, _ in preds]


def evaluate_edits(
    model: nn.Module,
    tokenizer,
    records: Sequence[dict[str, str]],
    *,
    base_model: nn.Module | None = None,
    base_predictions: Sequence[Sequence[int]] | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, float]:
    """Reliability and Generality of ``model`` on ``records``, and Locality against the unedited
    model (``base_model``, or its ``base_predictions`` from :func:`locality_reference`).

    Returns ``{"reliability", "generality"[, "locality"]}`` as fractions in [0, 1]; Locality is
    left out when neither base is given.
    """
    if not records:
        raise InvalidInputError("no edit records to evaluate")
    if base_model is not None and base_predictions is not None:
        raise InvalidInputError("pass base_model or base_predictions, not both")
    if base_model is not None:
        base_predictions = locality_reference(
            base_model, tokenizer, records, batch_size=batch_size, progress=progress
        )
    if base_predictions is not None and len(base_predictions) != len(records):
        raise InvalidInputError(f"{len(base_predictions)} base predictions for {len(records)} records")
    prompts, targets, kinds = [], [], []
    for rec in records:
        prompts += [rec["prompt"], rec["rephrase_prompt"]]
        targets += [rec["target_new"]] * 2
        kinds += ["reliability", "generality"]
    if base_predictions is not None:
        prompts += [r["locality_prompt"] for r in records]
        targets += [r["locality_ground_truth"] for r in records]
        kinds += ["locality"] * len(records)
    desc = "edited model" if progress else None
    preds = target_predictions(model, tokenizer, prompts, targets, batch_size=batch_size, desc=desc)
    predictions = [p for p, _ in preds]
    references = [t for _, t in preds]
    if base_predictions is not None:
        references[-len(records) :] = [list(p) for p in base_predictions]
    return score_tokens(predictions, references, kinds)
