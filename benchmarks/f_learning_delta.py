"""How much F-Learning's LoRA old phase changes SmolLM2-135M, at the old and the new default learning rate.

    python benchmarks/f_learning_delta.py [--edits 32] [--lrs 5e-5 1e-3]

For each ``old_learning_rate``: ``FLearningTrainer`` (LoRA->FT, lambda 1) trains the old phase on
``--edits`` built-in facts (3 epochs, batch 8, LoRA r8 as in the knowledge-update benchmark), then
subtracts it; the old targets are scored when the learning phase begins (it then runs one step,
which logs the subtraction's size), so what is measured is the subtraction alone. Printed: the logged ``forget_relative_delta`` (||lambda x delta|| / ||W|| of the changed
weights) and the teacher-forced accuracy of the *old* targets before and after the subtraction
(the knowledge F-Learning means to remove). 5e-5 was the default for both methods before; 1e-3 is
the LoRA default now.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

from transformers import DataCollatorForSeq2Seq, TrainerCallback

from ivtrainer import FLearningConfig, FLearningTrainer
from ivtrainer.datasets.edits import build_counterfacts, edit_dataset
from ivtrainer.evaluation.predictions import target_predictions
from ivtrainer.modeling.loading import load_default_model


def _old_accuracy(model, tokenizer, records) -> float:
    preds = target_predictions(
        model, tokenizer, [r["prompt"] for r in records], [r["target_old"] for r in records]
    )
    return sum(sum(p == t for p, t in zip(pred, ref, strict=True)) / len(ref) for pred, ref in preds) / len(
        preds
    )


class _CaptureForget(TrainerCallback):
    """The learning phase starts right after the subtraction: score the model there."""

    def __init__(self, score):
        self.score, self.after = score, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not args.output_dir.endswith("_forget"):
            self.after = self.score(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", type=int, default=32)
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-5, 1e-3])
    args = parser.parse_args()
    model, tokenizer = load_default_model()
    records = build_counterfacts(model, tokenizer)[: args.edits]
    before = _old_accuracy(model, tokenizer, records)
    print(f"{len(records)} built-in facts; old-target accuracy before: {100 * before:.1f}%")
    for lr in args.lrs:
        with tempfile.TemporaryDirectory() as out:
            config = FLearningConfig(
                output_dir=out,
                forget_method="lora",
                learn_method="full",
                forget_lambda=1.0,
                old_learning_rate=lr,
                old_num_train_epochs=3,
                per_device_train_batch_size=8,
                max_steps=1,
                lora_r=8,
                lora_alpha=16,
                report_to="none",
                save_strategy="no",
                logging_steps=1,
                disable_tqdm=True,
                use_cpu=True,
                seed=0,
            )
            capture = _CaptureForget(lambda m: _old_accuracy(m, tokenizer, records))
            trainer = FLearningTrainer(
                copy.deepcopy(model),
                config,
                train_dataset=edit_dataset(records, tokenizer, "new"),
                old_dataset=edit_dataset(records, tokenizer, "old"),
                data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
                callbacks=[capture],
            )
            trainer.train()
            logged = next(log for log in trainer.state.log_history if "forget_relative_delta" in log)
            print(
                f"old_learning_rate {lr:g}: relative delta {logged['forget_relative_delta']:.2e} "
                f"(||lambda*delta|| {logged['forget_delta_norm']:.3f}); old-target accuracy after the "
                f"subtraction {100 * capture.after:.1f}% (before {100 * before:.1f}%)"
            )


if __name__ == "__main__":
    main()
