"""Does the instruction vector carry the task? Zero-shot vs zero-shot + IV vs 5-shot, held-out pairs.

    python benchmarks/iv_evidence.py [--model default] [--tasks antonym ...] [--write-readme]

For each built-in task: extract the IV from the task's *extraction* pairs with the default
settings (10-shot prompts, 100 mean prompts, 25 CIE prompts, top-10 heads, exact CIE) and
``edit_layer="auto"``; choose the strength from {1, 2, 4} by zero-shot accuracy on 64 extraction
pairs. Only then score the *held-out* pairs (first-token accuracy, Todd et al.'s metric):
zero-shot, zero-shot + IV, and 5-shot (demonstrations drawn from the extraction pairs).
Nothing is tuned on held-out pairs. ``--write-readme`` replaces the table in README.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from ivtrainer.icl import PromptBuilder, first_token_accuracy
from ivtrainer.instruction_vector import extract_instruction_vector
from ivtrainer.models import load_model
from ivtrainer.tasks import list_tasks, load_task

STRENGTHS = (1.0, 2.0, 4.0)
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- iv-evidence:begin -->", "<!-- iv-evidence:end -->"


def run_task(model, tokenizer, task: str, seed: int) -> dict:
    start = time.perf_counter()
    iv = extract_instruction_vector(model, tokenizer, task, edit_layer="auto", seed=seed, progress=False)
    extract_s = time.perf_counter() - start
    builder = PromptBuilder(tokenizer)
    extraction, held_out = load_task(task, "extraction"), load_task(task, "held_out")

    search = [builder.encode([], q) for q in random.Random(seed + 1).sample(extraction, min(64, len(extraction)))]
    by_strength = {}
    for strength in STRENGTHS:
        with iv.apply(model, strength=strength):
            by_strength[strength] = first_token_accuracy(model, search)
    strength = max(STRENGTHS, key=lambda s: (by_strength[s], -s))

    zero = [builder.encode([], q) for q in held_out]
    five = builder.sample(extraction, len(held_out), 5, random.Random(seed + 2), queries=held_out)
    acc_zero = first_token_accuracy(model, zero)
    with iv.apply(model, strength=strength):
        acc_iv = first_token_accuracy(model, zero)
    acc_five = first_token_accuracy(model, five)
    return {
        "task": task,
        "n_held_out": len(held_out),
        "zero_shot": acc_zero,
        "zero_shot_iv": acc_iv,
        "five_shot": acc_five,
        "edit_layer": iv.edit_layer,
        "strength": strength,
        "heads": iv.heads,
        "extraction_zero_shot_by_strength": by_strength,
        "extract_seconds": round(extract_s, 1),
        "half_of_five_shot": acc_iv >= 0.5 * acc_five,
    }


def table(rows: list[dict], model_name: str) -> str:
    lines = [
        f"Model: {model_name}. Held-out first-token accuracy (`python benchmarks/iv_evidence.py --write-readme`).",
        "",
        "| task | held-out pairs | zero-shot | zero-shot + IV | 5-shot | IV >= half of 5-shot | edit layer | strength |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['n_held_out']} | {r['zero_shot']:.2f} | {r['zero_shot_iv']:.2f} | {r['five_shot']:.2f} "
            f"| {'yes' if r['half_of_five_shot'] else 'no'} | {r['edit_layer']} | {r['strength']:g} |"
        )
    hits = sum(r["half_of_five_shot"] for r in rows)
    lines += ["", f"Zero-shot + IV reaches half the 5-shot accuracy on {hits} of {len(rows)} tasks."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tasks", nargs="*", default=list_tasks())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    model.eval()
    rows = []
    for task in args.tasks:
        rows.append(run_task(model, tokenizer, task, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows, "SmolLM2-135M-Instruct" if args.model == "default" else args.model)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.write_readme:
        readme = README.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
        README.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", readme))


if __name__ == "__main__":
    main()
