"""Cost of IV-guided training on SmolLM2-135M: step time and peak memory, IV-guided / plain.

    python benchmarks/iv_guided_cost.py [--steps 8] [--rounds 3] [--json out.json]

Both runs train the same model on the same batches (8 rows x 64 tokens, answer tokens labelled)
with the same optimizer; IV-guided adds the annealed IV and the KL term over all positions (the
default, the most expensive). Each measurement is a fresh process, plain and IV-guided alternating,
``--rounds`` times; step time is the median over the timed steps (after one warm-up step) and
peak memory the process's VmHWM minus that of a process that loaded the same model and stopped.
LoRA (rank 8 on q_proj, v_proj: PEFT's default for Llama) and full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, statistics, sys, time, torch
from transformers import Trainer, TrainerCallback, TrainingArguments, DataCollatorForSeq2Seq
from datasets import Dataset
from ivtrainer import IVGuidedConfig, IVGuidedTrainer, InstructionVector, load_default_model

mode, method, steps, iv_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])

model, tok = load_default_model()
if mode == "baseline":
    print(json.dumps({"peak_kib": peak_kib()}))
    sys.exit()
if method == "lora":
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
g = torch.Generator().manual_seed(0)
rows = []
for _ in range(8 * (steps + 1)):
    ids = torch.randint(100, 40000, (64,), generator=g).tolist()
    rows.append({"input_ids": ids, "attention_mask": [1] * 64, "labels": [-100] * 48 + ids[48:]})
data = Dataset.from_list(rows)
times = []

class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.t)

common = dict(output_dir="/tmp/ivtrainer-cost", per_device_train_batch_size=8, max_steps=steps + 1, report_to="none",
              save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1000, learning_rate=1e-4)
collator = DataCollatorForSeq2Seq(tok, padding=True)
if mode == "plain":
    trainer = Trainer(model, TrainingArguments(**common), train_dataset=data, data_collator=collator, callbacks=[Timer()])
else:
    iv = InstructionVector.from_pretrained(iv_dir)
    trainer = IVGuidedTrainer(model, IVGuidedConfig(**common), instruction_vectors=iv, train_dataset=data,
                              data_collator=collator, callbacks=[Timer()])
trainer.train()
print(json.dumps({"step_s": statistics.median(times[1:]), "peak_kib": peak_kib()}))
"""


def child(mode: str, method: str, steps: int, iv_dir: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, method, str(steps), iv_dir],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument("--iv", default="benchmarks/.cache/iv-antonym", help="an IV folder (made if missing)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    if not (Path(args.iv) / "instruction_vector.json").is_file():
        from ivtrainer import extract_instruction_vector, load_default_model

        model, tok = load_default_model()  # a cheap extraction: the cost does not depend on the heads
        extract_instruction_vector(model, tok, "antonym", n_mean_prompts=20, n_cie_prompts=4).save_pretrained(
            args.iv
        )
    baseline = statistics.median(child("baseline", "-", 0, args.iv)["peak_kib"] for _ in range(args.rounds))
    results = {}
    for method in args.methods:
        runs: dict[str, list[dict]] = {"plain": [], "iv": []}
        for _ in range(args.rounds):
            for mode in ("plain", "iv"):
                runs[mode].append(child(mode, method, args.steps, args.iv))
        step = {m: statistics.median(r["step_s"] for r in runs[m]) for m in runs}
        total = {m: statistics.median(r["peak_kib"] for r in runs[m]) for m in runs}
        peak = {m: total[m] - baseline for m in runs}
        results[method] = {
            "step_s": step,
            "step_ratio": step["iv"] / step["plain"],
            "step_ratios_per_round": [
                i["step_s"] / p["step_s"] for p, i in zip(runs["plain"], runs["iv"], strict=True)
            ],
            "peak_mib_above_loaded_model": {m: v / 1024 for m, v in peak.items()},
            "peak_ratio": peak["iv"] / peak["plain"],
            "peak_total_mib": {m: v / 1024 for m, v in total.items()},
            "peak_total_ratio": total["iv"] / total["plain"],
        }
        r = results[method]
        print(
            f"{method}: step {step['plain']:.2f} s plain, {step['iv']:.2f} s IV-guided -> {r['step_ratio']:.2f}x "
            f"(rounds {', '.join(f'{x:.2f}' for x in r['step_ratios_per_round'])}); peak memory above the loaded "
            f"model {peak['plain'] / 1024:.0f} MiB plain, {peak['iv'] / 1024:.0f} MiB IV-guided -> {r['peak_ratio']:.2f}x; "
            f"whole-process peak {total['plain'] / 1024:.0f} vs {total['iv'] / 1024:.0f} MiB -> {r['peak_total_ratio']:.2f}x",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.write_readme:
        sys.path.insert(0, str(Path(__file__).parent))
        from _readme import replace_block

        replace_block("iv-cost", format_table(results, args))


def format_table(results: dict, args) -> str:
    lines = [
        "| training | step, plain | step, IV-guided | ratio (per round) | peak memory, IV-guided / plain |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, r in results.items():
        rounds = ", ".join(f"{x:.2f}" for x in r["step_ratios_per_round"])
        lines.append(
            f"| {'LoRA r8 (q_proj, v_proj)' if method == 'lora' else 'full fine-tuning'} | {r['step_s']['plain']:.2f} s | "
            f"{r['step_s']['iv']:.2f} s | {r['step_ratio']:.2f}x ({rounds}) | {r['peak_total_ratio']:.2f}x whole process "
            f"({r['peak_total_mib']['plain']:.0f} -> {r['peak_total_mib']['iv']:.0f} MiB); "
            f"{r['peak_ratio']:.2f}x above the loaded model |"
        )
    lines.append(
        f"\n`python benchmarks/iv_guided_cost.py --rounds {args.rounds} --steps {args.steps} --write-readme`: "
        f"8 rows x 64 tokens per step, KL over all positions; medians of {args.rounds} rounds, fresh processes, "
        "plain and IV-guided alternating, on 2 CPU cores."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
