"""What the forgetting monitor costs: one measurement against the training steps between two.

    python benchmarks/forgetting_monitor_cost.py [--every 50] [--rows 16] [--steps 8] [--repeats 5]

The default model, LoRA r8 on q_proj and v_proj, batches of 8 rows of a built-in sequence task
(the continual benchmark's setting). Times every training step of a plain ``Trainer`` run and,
on the trained model, ``--repeats`` measurements of ``ForgettingMonitorCallback`` (a no-gradient
forward of ``--rows`` rows and the KL against the stored reference); prints the medians and the
overhead ``measurement / (every x step)``, the share of training time the monitor adds at that
interval.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainerControl, TrainingArguments


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    from ivtrainer.callbacks import ForgettingMonitorCallback
    from ivtrainer.continual.sequence_tasks import load_sequence_task
    from ivtrainer.datasets.formats import tokenize_rows
    from ivtrainer.modeling.loading import load_default_model

    model, tokenizer = load_default_model()
    rows = load_sequence_task("brackets", "train")[:128]
    data = tokenize_rows(
        Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]), tokenizer
    )
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=8, max_steps=args.steps, learning_rate=5e-4,
            report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=1000,
        )  # fmt: skip
        steps, monitor = StepTimes(), ForgettingMonitorCallback(n_rows=args.rows, every=0)
        trainer = Trainer(
            model, training, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
            callbacks=[steps, monitor],
        )  # fmt: skip
        trainer.train()
        measurements = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            monitor._measure(trainer.state, TrainerControl(), trainer.model)
            measurements.append(time.perf_counter() - start)
    step = statistics.median(steps.times[1:])  # the first step warms up
    measure = statistics.median(measurements)
    print(
        f"training step (batch 8): median {step:.3f} s over {len(steps.times) - 1} steps; one monitor measurement "
        f"({args.rows} rows): median {measure:.3f} s over {args.repeats}; overhead every {args.every} steps: "
        f"{measure / (args.every * step):.2%} (every 10 steps: {measure / (10 * step):.2%})"
    )


if __name__ == "__main__":
    main()
