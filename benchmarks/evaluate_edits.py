"""Speed of ``evaluate_edits`` on SmolLM2-135M: length-sorted batches against batches in file order.

    python benchmarks/evaluate_edits.py [--edits 1000] [--rounds 3] [--batch-size 32]

What ``ivtrainer evaluate-edits --base default`` runs for ``--edits`` records (Reliability,
Generality and Locality: 3 scored prompts per edit, plus the unedited model's locality pass). The
records are the built-in counterfactuals, cycled up to ``--edits`` with their prompts given
ZsRE-like question lengths (a clause of 0-12 words prepended, seeded), so that lengths vary as in
the public files. Both orders run in this process, alternating, ``--rounds`` times; the medians
and their ratio are printed. The baseline is the previous implementation (batches in the order
given), kept here.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from ivtrainer.datasets.edits import build_counterfacts
from ivtrainer.evaluation.edit_metrics import evaluate_edits
from ivtrainer.modeling.loading import load_default_model

_WORDS = [
    "according",
    "to",
    "what",
    "most",
    "reference",
    "works",
    "and",
    "several",
    "old",
    "atlases",
    "say",
    "today",
]


def _records(model, tokenizer, n: int) -> list[dict[str, str]]:
    base = build_counterfacts(model, tokenizer)
    rng = random.Random(0)
    out = []
    for i in range(n):
        rec = dict(base[i % len(base)])
        clause = " ".join(_WORDS[: rng.randint(0, 12)])
        for field in ("prompt", "rephrase_prompt", "locality_prompt"):
            rec[field] = (
                f"{clause.capitalize()}, {rec[field][0].lower()}{rec[field][1:]}" if clause else rec[field]
            )
        out.append(rec)
    return out


@torch.no_grad()
def _in_file_order(model, tokenizer, prompts, targets, *, batch_size=32, desc=None):
    """The previous ``target_predictions``: batches in the order given (padding to each batch's longest)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for prompt, target in zip(prompts, targets, strict=True):
        full = tokenizer(f"{prompt} {target}")["input_ids"]
        rows.append((full, len(tokenizer(prompt)["input_ids"])))
    out = []
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(full) for full, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (full, _) in enumerate(batch):
            ids[i, : len(full)] = torch.tensor(full)
            mask[i, : len(full)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for i, (full, n) in enumerate(batch):
            out.append((logits[i, n - 1 : len(full) - 1].argmax(-1).tolist(), full[n:]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import ivtrainer.evaluation.edit_metrics as metrics

    model, tokenizer = load_default_model()
    model.eval()
    records = _records(model, tokenizer, args.edits)
    sorted_impl = metrics.target_predictions
    times: dict[str, list[float]] = {"file order": [], "sorted": []}
    scores = {}
    for _ in range(args.rounds):
        for name, impl in (("file order", _in_file_order), ("sorted", sorted_impl)):
            metrics.target_predictions = impl  # what evaluate_edits and locality_reference call
            start = time.perf_counter()
            scores[name] = evaluate_edits(
                model, tokenizer, records, base_model=model, batch_size=args.batch_size
            )
            times[name].append(time.perf_counter() - start)
    metrics.target_predictions = sorted_impl
    assert scores["file order"] == scores["sorted"], scores  # the same numbers, only faster
    print(
        f"evaluate_edits, {args.edits} edits (+ locality reference), batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    for name, values in times.items():
        print(
            f"  {name:<10} median {statistics.median(values):6.1f} s  ({', '.join(f'{v:.1f}' for v in values)})"
        )
    ratio = statistics.median(times["sorted"]) / statistics.median(times["file order"])
    print(f"  sorted / file order: {ratio:.2f}x; scores identical: {scores['sorted']}")


if __name__ == "__main__":
    main()
