"""What LMEvalCallback costs on the default model: seconds per evaluation and the share of a
demo-sized LoRA run.

    python benchmarks/lm_eval_cost.py [--rounds 2] [--tasks ivtrainer_abilities] [--limit 50] [--write-readme]

The run is the demo's new-task stage, plain LoRA (r8 on q_proj, v_proj): 256 training words,
2 epochs at batch 8 (64 steps). Each round trains it twice in this process, without the callback
and with ``LMEvalCallback(tasks, limit=limit, every="epoch")`` (before training and after each
epoch: 3 evaluations); the order alternates between rounds. Reports the median seconds of one
evaluation (from ``lm_eval.json``), the training run's seconds without the callback, and the share
of the whole run's time the evaluations took.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _readme import replace_block
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

from ivtrainer import load_default_model
from ivtrainer.callbacks import LMEvalCallback
from ivtrainer.evaluation.forgetting import new_task_dataset, new_task_words


def run(with_callback: bool, args) -> dict:
    set_seed(0)
    model, tok = load_default_model()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
    out = Path(tempfile.mkdtemp())
    training = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=5e-4,
        report_to="none", save_strategy="no", logging_steps=64, disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    words, _, _ = new_task_words()
    trainer = Trainer(
        model, training, train_dataset=new_task_dataset(words[:256], tok),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True), processing_class=tok,
    )  # fmt: skip
    if with_callback:
        trainer.add_callback(LMEvalCallback(args.tasks, limit=args.limit, every="epoch", trainer=trainer))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    evaluations = json.loads((out / "lm_eval.json").read_text())["evaluations"] if with_callback else []
    return {"seconds": seconds, "evaluations": [e["seconds"] for e in evaluations]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tasks", default="ivtrainer_abilities")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    LMEvalCallback(args.tasks)  # task names checked (and lm-eval's task index built) before timing
    plain, guided = [], []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for flag in order:
            (guided if flag else plain).append(run(flag, args))
            print(f"round {r}, callback {flag}: {json.dumps((guided if flag else plain)[-1])}", flush=True)
    per_eval = statistics.median(s for g in guided for s in g["evaluations"])
    base = statistics.median(p["seconds"] for p in plain)
    total = statistics.median(g["seconds"] for g in guided)
    share = statistics.median(sum(g["evaluations"]) / g["seconds"] for g in guided)
    text = (
        f"`python benchmarks/lm_eval_cost.py --rounds {args.rounds} --tasks {args.tasks} --limit {args.limit}` "
        f"(SmolLM2-135M-Instruct, 2 CPU cores; medians over {args.rounds} rounds): one evaluation of "
        f"`{args.tasks}` with `limit={args.limit}` took **{per_eval:.1f} s**; the demo-sized LoRA run (64 steps) "
        f"took {base:.0f} s without the callback and {total:.0f} s with it (3 evaluations: at the start and "
        f"after each epoch), the evaluations **{share:.0%}** of the run's time."
    )
    print(text)
    if args.write_readme:
        replace_block("lm-eval-cost", text)


if __name__ == "__main__":
    main()
