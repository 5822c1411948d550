"""Knowledge update on SmolLM2-135M: plain fine-tuning vs F-Learning (Ni et al., 2024).

    python benchmarks/knowledge_update.py [--seeds 0 1 2] [--json out.json] [--write-readme]

Data: the built-in counterfactual set for the default model (facts it completes correctly, each
given a wrong new target), split by relation into a validation third and a test two thirds.
Locality is measured against the unedited model's predictions.

Variants, all with the same learning phase (3 epochs, batch 8; lr 5e-5 full / 1e-3 LoRA, rank 8):
plain FT, plain LoRA, and F-Learning FT, LoRA, LoRA->FT, whose old phase fine-tunes on the same
records' *old* targets (3 epochs; lr 5e-5 full / 1e-3 LoRA) before subtracting lambda times the
delta. Lambda is chosen per variant on the validation split: the largest Reliability + Generality
whose Locality is within 1 point of the plain baseline's (if none is, the best Locality). Then
each variant runs on the test split, once per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

from ivtrainer import FLearningConfig, FLearningTrainer, load_default_model
from ivtrainer.datasets.edits import build_counterfacts, edit_dataset, split_edits
from ivtrainer.evaluation.edit_metrics import evaluate_edits, locality_reference

LR = {"full": 5e-5, "lora": 1e-3}
# name -> (forget_method or None for plain, learn_method, plain baseline it is compared with)
VARIANTS = {
    "FT": (None, "full", None),
    "LoRA": (None, "lora", None),
    "F-Learning FT": ("full", "full", "FT"),
    "F-Learning LoRA": ("lora", "lora", "LoRA"),
    "F-Learning LoRA->FT": ("lora", "full", "FT"),
}
METRICS = ("reliability", "generality", "locality")


def common_args(out: str, learn: str, seed: int, epochs: float) -> dict:
    return dict(
        output_dir=out,
        learning_rate=LR[learn],
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        seed=seed,
        use_cpu=True,
    )


def run(variant: str, records, lam: float, seed: int, epochs: float, work: Path, old_delta=None):
    """Train one variant on ``records``; returns (model, tokenizer, delta source for reuse)."""
    forget, learn, _ = VARIANTS[variant]
    set_seed(seed)  # LoRA initialisation included: the same numbers on every run
    model, tok = load_default_model()
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    new = edit_dataset(records, tok, "new")
    out = tempfile.mkdtemp(dir=work)
    if forget is None:
        if learn == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
        args = TrainingArguments(**common_args(out, learn, seed, epochs))
        Trainer(model, args, train_dataset=new, data_collator=collator).train()
        return model, tok, None
    config = FLearningConfig(
        **common_args(out, learn, seed, epochs),
        forget_method=forget,
        learn_method=learn,
        forget_lambda=lam,
        old_num_train_epochs=3,
        old_learning_rate=LR[forget],
    )
    source = {"old_dataset": edit_dataset(records, tok, "old")}
    if old_delta is not None:
        source = {"old_adapter" if forget == "lora" else "old_model": old_delta}
    trainer = FLearningTrainer(model, config, train_dataset=new, data_collator=collator, **source)
    trainer.train()
    return trainer.model, tok, old_delta or trainer.forget_dir / "delta"


def score(model, tok, records, base) -> dict[str, float]:
    return {k: 100 * v for k, v in evaluate_edits(model, tok, records, base_predictions=base).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    start = time.perf_counter()

    model, tok = load_default_model()
    records = build_counterfacts(model, tok)
    validation, test = split_edits(records)
    base_val = locality_reference(model, tok, validation)
    base_test = locality_reference(model, tok, test)
    print(f"{len(records)} edits the default model knows: {len(validation)} validation, {len(test)} test")
    del model

    results: dict = {"n_validation": len(validation), "n_test": len(test), "validation": {}, "test": {}}
    chosen: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # 1. lambda on the validation split
        for variant in args.variants:
            if VARIANTS[variant][0] is None:
                chosen[variant] = None
                m, t, _ = run(variant, validation, 0.0, 0, args.epochs, work)
                results["validation"][variant] = {"plain": score(m, t, validation, base_val)}
                print(f"[val] {variant}: {results['validation'][variant]['plain']}", flush=True)
        for variant in args.variants:
            forget, _, baseline = VARIANTS[variant]
            if forget is None:
                continue
            if baseline not in results["validation"]:
                m, t, _ = run(baseline, validation, 0.0, 0, args.epochs, work)
                results["validation"][baseline] = {"plain": score(m, t, validation, base_val)}
            per_lambda, delta = {}, None
            for lam in args.lambdas:
                m, t, delta = run(variant, validation, lam, 0, args.epochs, work, old_delta=delta)
                per_lambda[lam] = score(m, t, validation, base_val)
                print(f"[val] {variant} lambda={lam}: {per_lambda[lam]}", flush=True)
            results["validation"][variant] = {str(k): v for k, v in per_lambda.items()}
            floor = results["validation"][baseline]["plain"]["locality"] - 1.0
            ok = [lam for lam, s in per_lambda.items() if s["locality"] >= floor]
            chosen[variant] = (
                max(ok, key=lambda lam: per_lambda[lam]["reliability"] + per_lambda[lam]["generality"])
                if ok
                else max(per_lambda, key=lambda lam: per_lambda[lam]["locality"])
            )
            print(f"[val] {variant}: lambda = {chosen[variant]}", flush=True)
        # 2. the test split, each seed
        for variant in args.variants:
            runs = []
            for seed in args.seeds:
                m, t, _ = run(variant, test, chosen[variant] or 0.0, seed, args.epochs, work)
                runs.append(score(m, t, test, base_test))
                print(f"[test] {variant} seed {seed}: {runs[-1]}", flush=True)
            results["test"][variant] = {
                "lambda": chosen[variant],
                "runs": runs,
                **{k: statistics.mean(r[k] for r in runs) for k in METRICS},
            }
    results["minutes"] = (time.perf_counter() - start) / 60
    table = format_table(results, args.seeds)
    print(table)
    print(f"({results['minutes']:.0f} min wall time)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.write_readme:
        sys.path.insert(0, str(Path(__file__).parent))
        from _readme import replace_block

        replace_block("knowledge-update", table)


def format_table(results: dict, seeds: list[int]) -> str:
    lines = [
        "| variant | lambda (validation) | Reliability | Generality | Locality |\n|---|---:|---:|---:|---:|"
    ]
    for variant, r in results["test"].items():
        lam = "-" if r["lambda"] is None else f"{r['lambda']:g}"
        cells = []
        for k in METRICS:
            if len(r["runs"]) > 1:
                values = [run[k] for run in r["runs"]]
                cells.append(f"{r[k]:.1f} ({min(values):.1f}-{max(values):.1f})")
            else:
                cells.append(f"{r[k]:.1f}")
        lines.append(f"| {variant} | {lam} | " + " | ".join(cells) + " |")
    seeds_note = (
        f"mean of seeds {', '.join(map(str, seeds))} (range)" if len(seeds) > 1 else f"seed {seeds[0]}"
    )
    lines.append(
        f"\n{results['n_test']} test edits ({results['n_validation']} more for choosing lambda); {seeds_note}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
