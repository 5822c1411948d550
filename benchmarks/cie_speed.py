"""Speed and agreement of the CIE methods on a real model.

    python benchmarks/cie_speed.py [--model default] [--reference-prompts 3] [--write-readme]

1. exact vs the plain reference loop (one full forward per head per prompt), on shuffled-label
   10-shot prompts of the antonym task: per-prompt time of each, the median ratio, and the
   largest absolute CIE difference (fp32).
2. AtP vs exact, per built-in task, on the same 25 prompts that extraction uses: per-prompt time,
   speed-up, and how many of exact's top-10 heads AtP's top-10 recovers.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from _readme import replace_block

from ivtrainer.datasets.tasks import list_tasks, load_task
from ivtrainer.modeling.architectures import get_layout
from ivtrainer.modeling.loading import load_model
from ivtrainer.steering.icl import PromptBuilder
from ivtrainer.steering.mediation import cie_atp, cie_exact, cie_reference, mean_head_activations


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _total(score, model, layout, prompts, mean) -> torch.Tensor:
    return sum(score(model, layout, p, mean) for p in prompts)


def prompts_for(tokenizer, task: str, seed: int = 0):
    """The prompts extract_instruction_vector(seed=0) builds with its defaults."""
    builder = PromptBuilder(tokenizer)
    rng = random.Random(seed)
    data = load_task(task)
    clean = builder.sample(data, 100, 10, rng)
    return clean, builder.sample(data, 25, 10, rng, shuffle_labels=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--reference-prompts", type=int, default=3)
    parser.add_argument("--tasks", nargs="*", default=list_tasks())
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    model.eval()
    layout = get_layout(model)
    lines = [
        f"Model: {layout.n_layers} x {layout.n_heads} heads; `python benchmarks/cie_speed.py --write-readme`.",
        "",
    ]

    clean, corrupted = prompts_for(tokenizer, "antonym")
    mean = mean_head_activations(model, layout, clean)
    cie_exact(model, layout, corrupted[0], mean)  # warm-up
    ratios, diffs, t_ref, t_exact = [], [], [], []
    for prompt in corrupted[: args.reference_prompts]:
        ref, tr = _timed(cie_reference, model, layout, prompt, mean)
        ex, te = _timed(cie_exact, model, layout, prompt, mean)
        ratios.append(tr / te)
        diffs.append((ex - ref).abs().max().item())
        t_ref.append(tr)
        t_exact.append(te)
        print(
            f"prompt of {len(prompt.input_ids)} tokens: reference {tr:.1f} s, exact {te:.2f} s, x{tr / te:.0f}, max |diff| {diffs[-1]:.1e}",
            flush=True,
        )
    lines += [
        "| CIE of all heads, one 10-shot prompt | time per prompt (median) |",
        "| --- | --- |",
        f"| reference loop ({layout.n_layers * layout.n_heads} full forwards) | {statistics.median(t_ref):.1f} s |",
        f'| `method="exact"` (shared prefix, one tree-masked step) | {statistics.median(t_exact):.2f} s |',
        "",
        f"exact is **{statistics.median(ratios):.0f}x** faster (median of {len(ratios)} prompts; "
        f"range {min(ratios):.0f}-{max(ratios):.0f}x), max |CIE difference| {max(diffs):.1e} (fp32).",
        "",
        "| task | exact s/prompt | AtP s/prompt | AtP speed-up | exact's top-10 heads in AtP's top-10 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for task in args.tasks:
        clean, corrupted = prompts_for(tokenizer, task)
        mean = mean_head_activations(model, layout, clean)
        exact, te = _timed(_total, cie_exact, model, layout, corrupted, mean)
        atp, ta = _timed(_total, cie_atp, model, layout, corrupted, mean)
        top_exact = set(torch.topk(exact.flatten(), 10).indices.tolist())
        top_atp = set(torch.topk(atp.flatten(), 10).indices.tolist())
        n = len(corrupted)
        row = f"| {task} | {te / n:.2f} | {ta / n:.2f} | {te / ta:.1f}x | {len(top_exact & top_atp)}/10 |"
        print(row, flush=True)
        lines.append(row)
    text = "\n".join(lines)
    print(text)
    if args.write_readme:
        replace_block("cie-speed", text)


if __name__ == "__main__":
    main()
