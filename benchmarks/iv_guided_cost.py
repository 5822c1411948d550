"""Cost of IV-guided training on SmolLM2-135M: step time and peak memory, IV-guided / plain, with
the live and the precomputed teacher.

    python benchmarks/iv_guided_cost.py [--steps 6] [--rounds 3] [--teachers live precomputed] [--json out.json]

All runs train the same model on the same batches (8 rows x 64 tokens, the last 16 labelled) with
the same optimizer. IV-guided runs use ``IVGuidedConfig``'s defaults (FvForgetting's recipe: KL at
the last prompt token x20 and at every token x0.1, the head term against the teacher without the
IV), ``--positions all``; or the KL at the last prompt token alone (``last_prompt``). Each
measurement is a fresh process (and a fresh output folder: no stored teacher is reused), the
modes alternating, ``--rounds`` times; step time is the median over the timed steps (after one
warm-up step); peak memory the VmHWM of one more process per mode, run with glibc's mmap
threshold fixed at 64 KiB (freed memory leaves the process at once: the peak of live memory; the
timed processes keep glibc's defaults), the precompute pass the time from
``on_train_begin`` to the first step, also counted in plain no-grad forwards of a batch. LoRA
(rank 8 on q_proj, v_proj: PEFT's default for Llama) and full fine-tuning. ``--disk`` also states the
stored teacher's bytes per example for each position choice and k (``0``: the exact store of
hidden states, whose LM head is stored once, apart).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, statistics, sys, tempfile, time, torch
from transformers import Trainer, TrainerCallback, TrainingArguments, DataCollatorForSeq2Seq
from datasets import Dataset
from ivtrainer import IVGuidedConfig, IVGuidedTrainer, InstructionVector, load_default_model

mode, method, steps, iv_dir, positions, top_k = sys.argv[1:7]
steps, top_k = int(steps), int(top_k)

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
times, begin = [], {}

class Timer(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        begin["t"] = time.perf_counter()
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()
        begin.setdefault("first_step", self.t)
    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.t)

common = dict(output_dir=tempfile.mkdtemp(prefix="ivtrainer-cost-"), per_device_train_batch_size=8,
              max_steps=steps + 1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
              logging_steps=1000, learning_rate=1e-4)
collator = DataCollatorForSeq2Seq(tok, padding=True)
if mode == "plain":
    trainer = Trainer(model, TrainingArguments(**common), train_dataset=data, data_collator=collator, callbacks=[Timer()])
else:
    iv = InstructionVector.from_pretrained(iv_dir)
    kl = {} if positions == "all" else {"kl_positions": [positions], "kl_weight": [20.0], "kl_threshold": [0.1]}
    config = IVGuidedConfig(**common, **kl, teacher=mode, teacher_top_k=top_k)
    trainer = IVGuidedTrainer(model, config, instruction_vectors=iv, train_dataset=data, data_collator=collator,
                              callbacks=[Timer()])
trainer.train()
out = {"step_s": statistics.median(times[1:]), "peak_kib": peak_kib(),
       "begin_s": begin["first_step"] - begin["t"], "rows": len(rows)}
if mode == "precomputed":
    callback = trainer.iv_callbacks[-1]
    store = callback.guidance.store
    # the LM head (teacher_top_k=0) is stored once, whatever the number of rows
    out["head_bytes"] = sum(f.stat().st_size for f in store.folder.glob("head_*.npy"))
    out["bytes_per_row"] = (store.n_bytes - out["head_bytes"]) / len(store.keys)
if mode in ("live", "precomputed"):  # the live teacher's passes for one batch (what the store replaces)
    from ivtrainer.steering.intervention import last_prompt_positions
    callback, batch = trainer.iv_callbacks[-1], collator(rows[:8])
    passes = []
    for _ in range(3):
        t = time.perf_counter()
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        callback.guidance.live.run(model, inputs, last_prompt_positions(batch["labels"]))
        passes.append(time.perf_counter() - t)
    out["teacher_pass_s"] = statistics.median(passes)
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


# glibc's mmap threshold fixed: a freed tensor's memory goes back to the OS at once, so VmHWM is the
# peak of live memory, not of glibc's caching (its adaptive threshold keeps freed chunks); it slows
# allocation, so only the memory runs use it
_PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def child(
    mode: str,
    method: str,
    steps: int,
    iv_dir: str,
    positions: str = "all",
    top_k: int = 64,
    *,
    peak: bool = False,
) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, method, str(steps), iv_dir, positions, str(top_k)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **(_PEAK_ENV if peak else {})},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument(
        "--teachers", nargs="+", default=["live", "precomputed"], choices=["live", "precomputed"]
    )
    parser.add_argument(
        "--positions", nargs="+", default=["all", "last_prompt"], choices=["all", "answer", "last_prompt"]
    )
    parser.add_argument(
        "--top-k", type=int, nargs="+", default=[64], help="teacher_top_k of the precomputed runs (0: exact)"
    )
    parser.add_argument(
        "--disk", type=int, nargs="*", default=[], help="also state the bytes per example for these k"
    )
    parser.add_argument("--iv", default="benchmarks/.cache/iv-antonym", help="an IV folder (made if missing)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument(
        "--from-json",
        type=Path,
        help="render an earlier run's --json (its modes among these flags'), measure nothing",
    )
    parser.add_argument(
        "--readme-block",
        default="iv-cost",
        choices=["iv-cost", "iv-cost-exact"],
        help="the docs block --write-readme replaces",
    )
    args = parser.parse_args()
    if args.from_json:
        write(json.loads(args.from_json.read_text()), args)
        return
    if not (Path(args.iv) / "instruction_vector.json").is_file():
        from ivtrainer import extract_instruction_vector, load_default_model

        model, tok = load_default_model()  # a cheap extraction: the cost does not depend on the heads
        extract_instruction_vector(model, tok, "antonym", n_mean_prompts=20, n_cie_prompts=4).save_pretrained(
            args.iv
        )
    baseline = child("baseline", "-", 0, args.iv, peak=True)["peak_kib"]
    results: dict = {"methods": {}, "disk": {}}
    for method in args.methods:
        modes = [("plain", "-", 0)]
        for p in args.positions:
            modes += [(t, p, k) for t in args.teachers for k in (args.top_k if t == "precomputed" else [0])]
        runs: dict[tuple[str, str, int], list[dict]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for teacher, positions, k in modes:
                runs[teacher, positions, k].append(child(teacher, method, args.steps, args.iv, positions, k))
        plain = runs["plain", "-", 0]
        step_plain = statistics.median(r["step_s"] for r in plain)
        peaks = {m: child(*m[:1], method, 2, args.iv, *m[1:], peak=True)["peak_kib"] for m in modes}
        peak_plain = peaks["plain", "-", 0]
        forward = statistics.median(r["forward_s"] for r in plain)
        steps_per_epoch = plain[0]["rows"] // 8
        out = results["methods"][method] = {
            "step_s": step_plain, "forward_s": forward, "peak_mib": peak_plain / 1024,
            "steps_per_epoch": steps_per_epoch, "modes": {},
        }  # fmt: skip
        print(f"{method}: plain step {step_plain:.2f} s, one no-grad forward {forward:.2f} s", flush=True)
        for teacher, positions, k in modes[1:]:
            rs = runs[teacher, positions, k]
            step = statistics.median(r["step_s"] for r in rs)
            peak = peaks[teacher, positions, k]
            begin = statistics.median(r["begin_s"] for r in rs) - statistics.median(
                r["begin_s"] for r in plain
            )
            r = {
                "step_s": step,
                "step_ratio": step / step_plain,
                "step_ratios_per_round": [i["step_s"] / p["step_s"] for p, i in zip(plain, rs, strict=True)],
                "peak_mib": peak / 1024,
                "peak_ratio": peak / peak_plain,
                "peak_ratio_above_model": (peak - baseline) / (peak_plain - baseline),
                "precompute_s": max(begin, 0.0) if teacher == "precomputed" else 0.0,
            }
            teacher_pass = statistics.median(r["teacher_pass_s"] for r in rs)
            r["teacher_pass_s"] = teacher_pass
            r["precompute_over_epoch_of_forwards"] = r["precompute_s"] / (steps_per_epoch * forward)
            r["precompute_over_epoch_of_teacher"] = r["precompute_s"] / (steps_per_epoch * teacher_pass)
            r["total_ratio"] = {
                e: (r["precompute_s"] + e * steps_per_epoch * step) / (e * steps_per_epoch * step_plain)
                for e in (1, 3, 10)
            }
            if "bytes_per_row" in rs[0]:
                r["bytes_per_row"], r["head_bytes"] = rs[0]["bytes_per_row"], rs[0]["head_bytes"]
            out["modes"][f"{teacher}:{positions}:{k}"] = r
            print(
                f"  {_teacher_name(teacher, k)} teacher, KL at {positions}: step {step:.2f} s -> {r['step_ratio']:.2f}x (rounds "
                f"{', '.join(f'{x:.2f}' for x in r['step_ratios_per_round'])}); peak {r['peak_ratio']:.3f}x; "
                f"precompute {r['precompute_s']:.1f} s ({r['precompute_over_epoch_of_teacher']:.2f}x an epoch of the "
                f"live teacher's passes, {r['precompute_over_epoch_of_forwards']:.2f}x of plain forwards); total 1/3/10 epochs {', '.join(f'{v:.2f}x' for v in r['total_ratio'].values())}",
                flush=True,
            )
    for positions in args.positions if args.disk else []:
        for k in args.disk:
            stored = child("precomputed", "lora", 1, args.iv, positions, k)
            results["disk"][f"{positions}:{k}"] = stored["bytes_per_row"]
            results["head_bytes"] = max(results.get("head_bytes", 0), stored["head_bytes"])
            print(
                f"  stored teacher, {positions}, k={k}: {results['disk'][f'{positions}:{k}']:.0f} bytes per example"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    write(results, args)


def write(results: dict, args) -> None:
    table = format_table(results, args)
    print(table)
    if args.write_readme:
        sys.path.insert(0, str(Path(__file__).parent))
        from _readme import replace_block

        replace_block(args.readme_block, table)


def _teacher_name(teacher: str, k: int) -> str:
    if teacher != "precomputed":
        return teacher
    return f"precomputed, top-{k}" if k else "precomputed, exact (hidden states)"


def format_table(results: dict, args) -> str:
    names = {"lora": "LoRA r8 (q_proj, v_proj)", "full": "full fine-tuning"}
    kl = {
        "all": "last prompt x20 + all x0.1 (default)",
        "last_prompt": "last prompt x20",
        "answer": "answer x20",
    }
    lines = [
        "| training | KL | teacher | step | / plain (per round) | peak memory / plain | precompute pass "
        "| whole run / plain: 1, 3, 10 epochs |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for method, m in results["methods"].items():
        if method not in args.methods:
            continue
        lines.append(
            f"| {names[method]} | - | none (plain) | {m['step_s']:.2f} s | 1 | 1 ({m['peak_mib']:.0f} MiB) | - | 1 |"
        )
        for mode, r in m["modes"].items():
            teacher, positions, k = mode.split(":")
            if teacher not in args.teachers or positions not in args.positions or (
                teacher == "precomputed" and int(k) not in args.top_k
            ):  # fmt: skip
                continue
            rounds = ", ".join(f"{x:.2f}" for x in r["step_ratios_per_round"])
            pre = (
                f"{r['precompute_s']:.1f} s ({r['precompute_over_epoch_of_teacher']:.2f}x an epoch of the live "
                f"teacher's passes; {r['precompute_over_epoch_of_forwards']:.2f}x of plain forwards)"
                if teacher == "precomputed"
                else "-"
            )
            teacher_name = _teacher_name(teacher, int(k))
            lines.append(
                f"| {names[method]} | {kl[positions]} | {teacher_name} | {r['step_s']:.2f} s | "
                f"**{r['step_ratio']:.2f}x** ({rounds}) | {r['peak_ratio']:.3f}x ({r['peak_mib']:.0f} MiB) | {pre} | "
                + ", ".join(f"{v:.2f}x" for v in r["total_ratio"].values())
                + " |"
            )
    lines.append(
        f"\n`python benchmarks/iv_guided_cost.py --rounds {args.rounds} --steps {args.steps} --positions "
        f"{' '.join(args.positions)}"
        + (f" --teachers {' '.join(args.teachers)}" if args.teachers != ["live", "precomputed"] else "")
        + f" --top-k {' '.join(map(str, args.top_k))}"
        + (f" --disk {' '.join(map(str, args.disk))}" if args.disk else "")
        + (f" --readme-block {args.readme_block}" if args.readme_block != "iv-cost" else "")
        + " --write-readme`: 8 rows x 64 tokens per step (16 answer tokens each); medians of "
        f"{args.rounds} rounds, fresh processes, the modes alternating, on 2 CPU cores; an epoch is "
        f"{next(iter(results['methods'].values()))['steps_per_epoch']} steps. The whole-run ratios add the "
        "precompute pass to the measured steps. Peak memory is the whole process's."
    )
    if results["disk"]:
        lines += ["", "| stored teacher, bytes per example (64 tokens, 16 answer tokens) | " + " | ".join(
            f"k={k}" if k else "exact (hidden states)" for k in args.disk) + " |", "|---|" + "---:|" * len(args.disk)]  # fmt: skip
        for positions in args.positions:
            lines.append(
                f"| KL at {kl[positions]} | "
                + " | ".join(f"{results['disk'][f'{positions}:{k}'] / 1024:.1f} KiB" for k in args.disk)
                + " |"
            )
        if 0 in args.disk and results.get("head_bytes"):
            lines.append(
                f"\nThe exact store also holds the LM head once per run: {results['head_bytes'] / 2**20:.1f} MiB "
                "(vocabulary x hidden size, in the model's dtype)."
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
