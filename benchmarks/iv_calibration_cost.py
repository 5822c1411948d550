"""What calibration costs: extraction time with calibration against the extraction before it existed.

    python benchmarks/iv_calibration_cost.py [--baseline 33d4e03] [--task antonym] [--runs 3] [--write-readme]

Three extractions of the same task with the default sizes (100 mean prompts, 25 CIE prompts),
each in a fresh process, interleaved run by run so machine noise hits all three alike:

- ``baseline``: the package at ``--baseline`` (the commit before calibration; its source is
  exported with ``git archive`` into a temporary folder and imported from there),
- ``fixed``: this checkout with ``calibrate=False`` (the papers' fixed choice),
- ``calibrated``: this checkout with the defaults.

Only the extraction is timed (the model is loaded first). Prints the medians and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _readme import replace_block

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = """
import json, time, torch
from ivtrainer.modeling.loading import load_default_model
from ivtrainer.steering.extraction import extract_instruction_vector
torch.manual_seed(0)
model, tokenizer = load_default_model()
model.eval()
kwargs = {kwargs}
start = time.perf_counter()
iv = extract_instruction_vector(model, tokenizer, {task!r}, progress=False, **kwargs)
print(json.dumps({{"seconds": time.perf_counter() - start, "edit_layer": iv.edit_layer}}))
"""


def run(task: str, kwargs: dict, pythonpath: str | None) -> float:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    code = SNIPPET.format(task=task, kwargs=repr(kwargs))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="33d4e03", help="the commit before calibration")
    parser.add_argument("--task", default="antonym")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()

    times: dict[str, list[float]] = {"baseline": [], "fixed": [], "calibrated": []}
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        for i in range(args.runs):
            times["baseline"].append(run(args.task, {}, tmp))
            times["fixed"].append(run(args.task, {"calibrate": False}, None))
            times["calibrated"].append(run(args.task, {}, None))
            print(f"run {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    text = "\n".join(
        [
            f"SmolLM2-135M-Instruct, task {args.task}, default sizes, median of {args.runs} fresh processes "
            f"(`python benchmarks/iv_calibration_cost.py --runs {args.runs} --write-readme`):",
            "",
            "| extraction | seconds | vs before calibration |",
            "| --- | ---: | ---: |",
            f"| before calibration (commit {args.baseline}: layer L/3, strength 1) | {med['baseline']:.1f} | 1.00x |",
            f"| now, `calibrate=False` | {med['fixed']:.1f} | {med['fixed'] / med['baseline']:.2f}x |",
            f"| now, defaults (calibrated) | {med['calibrated']:.1f} | **{med['calibrated'] / med['baseline']:.2f}x** |",
            "",
            f"Calibration itself adds {med['calibrated'] - med['fixed']:.1f} s "
            f"({med['calibrated'] / med['fixed']:.2f}x the uncalibrated extraction of this checkout).",
        ]
    )
    print(text)
    if args.write_readme:
        replace_block("iv-calibration-cost", text)


if __name__ == "__main__":
    main()
