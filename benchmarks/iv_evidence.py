"""Does the instruction vector carry the task? Zero-shot vs zero-shot + IV vs 5-shot, held-out pairs.

    python benchmarks/iv_evidence.py [--model default] [--tasks antonym ...] [--seeds 0 1 2] [--write-readme]

For each built-in task, the IV is extracted from the task's *extraction* pairs twice, with the
package defaults (calibration: heads, layer and strength chosen on extraction pairs) and with the
papers' fixed choice (``calibrate=False``: 10 heads, layer L // 3, strength 1). Both are then
scored on the *held-out* pairs with ``InstructionVector.evaluate`` (first-token accuracy, Todd et
al.'s metric; 5-shot demonstrations from the extraction pairs). Nothing is tuned on held-out
pairs. With several ``--seeds`` the calibrated extraction is repeated per seed (other prompts,
other calibration pairs) to show how stable the choice is. A universal head set (heads ranked
by CIE averaged over all the built-in tasks' extraction pairs, ``ivtrainer.extract_head_set``) is
built once, and each task's IV is extracted again from it (mean activations only, calibrated),
timed against the per-task exact-CIE extraction. ``--write-readme`` replaces the tables in the
docs page that holds them; ``--from-json`` re-renders them from a saved run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _readme import replace_block

from ivtrainer.datasets.tasks import list_tasks, load_task
from ivtrainer.modeling.loading import load_model
from ivtrainer.steering.extraction import extract_instruction_vector
from ivtrainer.steering.head_set import extract_head_set


def run_task(model, tokenizer, task: str, seeds: list[int], head_set) -> dict:
    extraction, held_out = load_task(task, "extraction"), load_task(task, "held_out")
    out: dict = {"task": task, "n_held_out": len(held_out), "seeds": []}
    for seed in seeds:
        start = time.perf_counter()
        iv = extract_instruction_vector(model, tokenizer, task, seed=seed, progress=False)
        seconds = time.perf_counter() - start
        result = iv.evaluate(model, tokenizer, held_out, demonstrations=extraction, seed=seed, progress=False)
        calibration = iv.metrics["calibration"]
        out["seeds"].append(
            {
                "seed": seed,
                "n_heads": len(iv.heads),
                "edit_layer": iv.edit_layer,
                "strength": iv.strength,
                "calibration_accuracy": calibration["accuracy"],
                "zero_shot": result.zero_shot,
                "zero_shot_iv": result.zero_shot_iv,
                "five_shot": result.k_shot[5],
                "exact_zero_shot_iv": result.exact_zero_shot_iv,
                "exact_five_shot": result.exact_k_shot[5],
                "lift_interval": result.lift_interval,
                "p_value": result.p_value,
                "seconds": round(seconds, 1),
            }
        )
    start = time.perf_counter()
    fixed = extract_instruction_vector(model, tokenizer, task, calibrate=False, seed=seeds[0], progress=False)
    out["fixed_seconds"] = round(time.perf_counter() - start, 1)
    fixed_result = fixed.evaluate(
        model, tokenizer, held_out, demonstrations=extraction, seed=seeds[0], progress=False
    )
    out["fixed_zero_shot_iv"] = fixed_result.zero_shot_iv
    start = time.perf_counter()
    universal = extract_instruction_vector(
        model, tokenizer, task, heads=head_set, seed=seeds[0], progress=False
    )
    out["universal_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    extract_instruction_vector(
        model, tokenizer, task, heads=head_set, calibrate=False, seed=seeds[0], progress=False
    )
    out["universal_fixed_seconds"] = round(time.perf_counter() - start, 1)
    u = universal.evaluate(
        model, tokenizer, held_out, demonstrations=extraction, seed=seeds[0], progress=False
    )
    out["universal"] = {"n_heads": len(universal.heads), "edit_layer": universal.edit_layer,
                        "strength": universal.strength, "zero_shot_iv": u.zero_shot_iv}  # fmt: skip
    first = out["seeds"][0]
    out["universal_half_of_five_shot"] = u.zero_shot_iv >= 0.5 * first["five_shot"]
    out["half_of_five_shot"] = first["zero_shot_iv"] >= 0.5 * first["five_shot"]
    out["fixed_half_of_five_shot"] = fixed_result.zero_shot_iv >= 0.5 * first["five_shot"]
    out["heads"] = [list(h) for h in fixed.heads]
    return out


def table(rows: list[dict], model_name: str, seeds: list[int], head_set_seconds: float) -> str:
    lines = [
        f"Model: {model_name}. Held-out first-token accuracy, seed {seeds[0]} "
        f"(`python benchmarks/iv_evidence.py --seeds {' '.join(map(str, seeds))} --write-readme`).",
        "",
        "| task | held-out pairs | zero-shot | + IV, papers' fixed choice (10 heads, layer L/3, x1) "
        "| + IV, defaults (calibrated: heads, layer, strength) | lift 95% interval "
        "| + IV, universal heads (calibrated) | 5-shot | IV >= half of 5-shot (fixed / defaults / universal) |",
        "| --- | ---: | ---: | ---: | --- | --- | --- | ---: | --- |",
    ]
    for r in rows:
        s = r["seeds"][0]
        low, high = s["lift_interval"]
        lines.append(
            f"| {r['task']} | {r['n_held_out']} | {s['zero_shot']:.2f} | {r['fixed_zero_shot_iv']:.2f} "
            f"| **{s['zero_shot_iv']:.2f}** ({s['n_heads']} heads, layer {s['edit_layer']}, x{s['strength']:g}) "
            f"| {low:+.2f} to {high:+.2f} "
            f"| {r['universal']['zero_shot_iv']:.2f} ({r['universal']['n_heads']} heads, layer "
            f"{r['universal']['edit_layer']}, x{r['universal']['strength']:g}) | {s['five_shot']:.2f} "
            f"| {yes(r['fixed_half_of_five_shot'])} / {yes(r['half_of_five_shot'])} / "
            f"{yes(r['universal_half_of_five_shot'])} |"
        )
    hits = sum(r["half_of_five_shot"] for r in rows)
    fixed_hits = sum(r["fixed_half_of_five_shot"] for r in rows)
    universal_hits = sum(r["universal_half_of_five_shot"] for r in rows)
    lines += [
        "",
        f"Zero-shot + IV reaches half the 5-shot accuracy on {hits} of {len(rows)} tasks with the defaults, "
        f"{universal_hits} of {len(rows)} with the universal heads, {fixed_hits} of {len(rows)} with the papers' "
        "fixed choice.",
    ]
    if len(seeds) > 1:
        lines += [
            "",
            f"Stability across extraction seeds {', '.join(map(str, seeds))} (the calibrated choice and its held-out accuracy):",
            "",
            "| task | " + " | ".join(f"seed {s}" for s in seeds) + " | held-out + IV, min-max |",
            "| --- | " + " | ".join("---" for _ in seeds) + " | --- |",
        ]
        for r in rows:
            cells = [
                f"{s['n_heads']} heads, L{s['edit_layer']}, x{s['strength']:g}: {s['zero_shot_iv']:.2f}"
                for s in r["seeds"]
            ]
            accs = [s["zero_shot_iv"] for s in r["seeds"]]
            lines.append(f"| {r['task']} | " + " | ".join(cells) + f" | {min(accs):.2f}-{max(accs):.2f} |")
    calibrated = statistics.median(s["seconds"] for r in rows for s in r["seeds"])
    fixed = statistics.median(r["fixed_seconds"] for r in rows)
    universal = statistics.median(r["universal_seconds"] for r in rows)
    universal_fixed = statistics.median(r["universal_fixed_seconds"] for r in rows)
    lines += [
        "",
        f"Extraction time per task (median over tasks): {calibrated:.0f} s with calibration, {fixed:.0f} s without "
        f"({calibrated / fixed:.2f}x); with the saved universal head set {universal:.0f} s calibrated, "
        f"{universal_fixed:.0f} s without calibration ({universal_fixed / fixed:.2f}x the per-task exact-CIE "
        f"extraction). The head set itself: {head_set_seconds:.0f} s for {len(rows)} tasks, once per model.",
    ]
    return "\n".join(lines)


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tasks", nargs="*", default=list_tasks())
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument("--from-json", type=Path, help="re-render the tables from a run saved with --json")
    args = parser.parse_args()

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rows, head_set_seconds, args.seeds, args.model = (
            saved["rows"],
            saved["head_set_seconds"],
            saved["seeds"],
            saved["model"],
        )
    else:
        model, tokenizer = load_model(args.model)
        model.eval()
        start = time.perf_counter()
        head_set = extract_head_set(model, tokenizer, list_tasks(), seed=args.seeds[0], progress=False)
        head_set_seconds = time.perf_counter() - start
        rows = []
        for task in args.tasks:
            rows.append(run_task(model, tokenizer, task, args.seeds, head_set))
            print(json.dumps(rows[-1]), flush=True)
        if args.json:
            saved = {
                "model": args.model,
                "seeds": args.seeds,
                "head_set_seconds": head_set_seconds,
                "rows": rows,
            }
            args.json.write_text(json.dumps(saved, indent=2))
    text = table(
        rows, "SmolLM2-135M-Instruct" if args.model == "default" else args.model, args.seeds, head_set_seconds
    )
    print(text)
    if args.write_readme:
        replace_block("iv-evidence", text)


if __name__ == "__main__":
    main()
