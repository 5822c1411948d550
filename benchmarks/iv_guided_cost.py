"""Cost of IV-guided training on SmolLM2-135M: step time and peak memory, IV-guided / plain.

    python benchmarks/iv_guided_cost.py [--steps 8] [--rounds 3] [--json out.json]

Both runs train the same model on the same batches (8 rows x 64 tokens, answer tokens labelled)
with the same optimizer; IV-guided adds the annealed IV and the KL term, over all positions (the
default, the most expensive) and at the last prompt token only (``--positions``). Each measurement is a fresh process, plain and IV-guided alternating,
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

mode, method, steps, iv_dir, positions = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]

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
    trainer = IVGuidedTrainer(model, IVGuidedConfig(**common, kl_positions=positions), instruction_vectors=iv,
                              train_dataset=data, data_collator=collator, callbacks=[Timer()])
trainer.train()
out = {"step_s": statistics.median(times[1:]), "peak_kib": peak_kib()}
if mode == "plain":  # what one extra no-grad forward of the batch costs: the floor of the teacher pass
    batch = collator(rows[:8])
    model.eval()
    forwards = []
    with torch.no_grad():
        for _ in range(4):
            t = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            forwards.append(time.perf_counter() - t)
    out["forward_s"] = statistics.median(forwards[1:])
print(json.dumps(out))
"""


def child(mode: str, method: str, steps: int, iv_dir: str, positions: str = "all") -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, method, str(steps), iv_dir, positions],
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
    parser.add_argument(
        "--positions", nargs="+", default=["all", "last_prompt"], choices=["all", "answer", "last_prompt"]
    )
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
        modes = ["plain", *args.positions]
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in modes:
                runs[mode].append(
                    child("plain" if mode == "plain" else "iv", method, args.steps, args.iv, mode)
                )
        step = {m: statistics.median(r["step_s"] for r in runs[m]) for m in modes}
        total = {m: statistics.median(r["peak_kib"] for r in runs[m]) for m in modes}
        forward = statistics.median(r["forward_s"] for r in runs["plain"])
        results[method] = {
            "step_s": step,
            "forward_s": forward,
            "floor_ratio": (step["plain"] + forward) / step["plain"],
            "peak_total_mib": {m: v / 1024 for m, v in total.items()},
            "by_positions": {},
        }
        print(
            f"{method}: plain step {step['plain']:.2f} s; one no-grad forward {forward:.2f} s -> a teacher pass "
            f"alone makes it {results[method]['floor_ratio']:.2f}x",
            flush=True,
        )
        for positions in args.positions:
            r = {
                "step_ratio": step[positions] / step["plain"],
                "step_ratios_per_round": [
                    i["step_s"] / p["step_s"] for p, i in zip(runs["plain"], runs[positions], strict=True)
                ],
                "peak_ratio": (total[positions] - baseline) / (total["plain"] - baseline),
                "peak_total_ratio": total[positions] / total["plain"],
            }
            results[method]["by_positions"][positions] = r
            print(
                f"  KL at {positions}: step {step[positions]:.2f} s -> {r['step_ratio']:.2f}x (rounds "
                f"{', '.join(f'{x:.2f}' for x in r['step_ratios_per_round'])}); whole-process peak "
                f"{total['plain'] / 1024:.0f} vs {total[positions] / 1024:.0f} MiB -> {r['peak_total_ratio']:.2f}x; "
                f"{r['peak_ratio']:.2f}x above the loaded model",
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
        "| training | KL positions | step, plain | step, IV-guided | ratio (per round) | floor: + one no-grad forward "
        "| peak memory, IV-guided / plain |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for method, m in results.items():
        for positions, r in m["by_positions"].items():
            rounds = ", ".join(f"{x:.2f}" for x in r["step_ratios_per_round"])
            lines.append(
                f"| {'LoRA r8 (q_proj, v_proj)' if method == 'lora' else 'full fine-tuning'} | {positions} | "
                f"{m['step_s']['plain']:.2f} s | {m['step_s'][positions]:.2f} s | {r['step_ratio']:.2f}x ({rounds}) | "
                f"{m['floor_ratio']:.2f}x | {r['peak_total_ratio']:.2f}x whole process "
                f"({m['peak_total_mib']['plain']:.0f} -> {m['peak_total_mib'][positions]:.0f} MiB); "
                f"{r['peak_ratio']:.2f}x above the loaded model |"
            )
    lines.append(
        f"\n`python benchmarks/iv_guided_cost.py --rounds {args.rounds} --steps {args.steps} "
        f"--positions {' '.join(args.positions)} --write-readme`: 8 rows x 64 tokens per step (16 answer tokens "
        f"each); medians of {args.rounds} rounds, fresh processes, plain and IV-guided alternating, on 2 CPU "
        "cores. The floor is the plain step plus one no-grad forward of the same batch (timed in the plain runs)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
