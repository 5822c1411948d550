"""The demo's tables, plots and files: what it prints and what it writes next to the artifacts."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


#: Stage 2's runs, as the tables name them.
NEW_TASK_RUNS = {
    "before": "before",
    "plain": "plain",
    "kl_anchor": "KL anchor, no IV",
    "iv_guided": "IV-guided",
}


def own_iv_line(result: dict[str, Any]) -> str:
    iv = result["own_iv"]
    steer = (
        f": zero-shot {_pct(iv['zero_shot_accuracy'])}% -> {_pct(iv['zero_shot_accuracy_with_iv'])}% on "
        f"{iv['n_prompts']} training prompts"
        if iv.get("zero_shot_accuracy") is not None
        else ""
    )
    return (
        f"the new task's own IV: {iv['n_heads']} heads, layer {iv['edit_layer']}, x{iv['strength']:g}{steer}"
    )


def new_task_table(result: dict[str, Any]) -> str:
    from ivtrainer.evaluation.forgetting import held_out_mean

    scores = result["scores"]
    before = held_out_mean(scores["before"])
    has_instruction = "facts/instruction" in scores["before"]
    plain_drop = before - held_out_mean(scores["plain"])
    lines = [
        "| LoRA fine-tuning | new task | 5-shot ICL (6 tasks) | facts as completions | facts as instructions "
        "| held-out mean | forgetting (points) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in NEW_TASK_RUNS.items():
        if name not in scores:  # results written before the KL-anchor row existed
            continue
        s = scores[name]
        icl = statistics.mean(v for k, v in s.items() if k.startswith("icl/"))
        drop = before - held_out_mean(s)
        forgetting = "-"
        if name != "before":
            forgetting = f"{100 * drop:.1f}"
            if name != "plain" and plain_drop > 0:
                forgetting += f" ({drop / plain_drop:.2f} x plain)"
        lines.append(
            f"| {label} | {_pct(s['new_task'])} | {_pct(icl)} | {_pct(s['facts/completion'])} | "
            f"{_pct(s.get('facts/instruction')) if has_instruction else 'n/a'} | {_pct(held_out_mean(s))} | "
            f"{forgetting} |"
        )
    return "\n".join(lines)


def lm_eval_table(result: dict[str, Any]) -> str:
    """The lm-eval scores of stage 2 (``--lm-eval-tasks``), before and after; "" without them."""
    scores = result["scores"]
    names = sorted(k for k in scores["before"] if k.startswith("lm_eval/"))
    if not names:
        return ""
    runs = [r for r in NEW_TASK_RUNS if r in scores]
    lines = [
        "| lm-eval | " + " | ".join(NEW_TASK_RUNS[r] for r in runs) + " |",
        "|---" + "|---:" * len(runs) + "|",
    ]
    for name in names:
        cells = " | ".join(_pct(scores[run].get(name)) for run in runs)
        lines.append(f"| {name.removeprefix('lm_eval/')} | {cells} |")
    return "\n".join(lines)


def knowledge_table(result: dict[str, Any]) -> str:
    scores = result["scores"]
    lines = [
        "| knowledge update | Reliability | Generality | Locality |",
        "|---|---:|---:|---:|",
    ]
    labels = {
        "before": "before (unedited)",
        "plain": "plain full fine-tuning",
        "f_learning": f"F-Learning LoRA->FT (lambda {result['forget_lambda']:g})",
    }
    for name, label in labels.items():
        s = scores[name]
        lines.append(
            f"| {label} | {_pct(s['reliability'])} | {_pct(s['generality'])} | {_pct(s.get('locality'))} |"
        )
    return "\n".join(lines)


def plot_new_task(result: dict[str, Any], path: Path, title: str) -> Path:
    from ivtrainer.evaluation.plotting import plot_scores

    labels = {k: v if k == "before" else f"LoRA, {v}" for k, v in NEW_TASK_RUNS.items()}
    return plot_scores({labels[k]: v for k, v in result["scores"].items()}, path, title=title)


def repair_line(result: dict[str, Any]) -> str:
    """Stage 1's IV added back to the plain fine-tuned model; "" when the stage ran without it."""
    r = result.get("repair")
    if r is None:
        return ""
    return (
        f"IV repair: the {r['task']} IV of stage 1 added to the plain fine-tuned model: zero-shot {r['task']} "
        f"{_pct(r['with_iv'])}% on {r['n_prompts']} held-out words (without it: {_pct(r['without_iv'])}%)"
    )


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def iv_lines(result: dict[str, Any]) -> str:
    heads = ", ".join(
        f"L{layer}H{head} {score:+.3f}"
        for (layer, head), score in zip(result["heads"][:5], result["head_scores"], strict=False)
    )
    return (
        f"top heads (layer, head: mean CIE): {heads}, ... ({len(result['heads'])} heads)\n"
        f"zero-shot {result['task']} accuracy on {result['n_zero_shot_prompts']} held-out words: "
        f"{_pct(result['zero_shot_accuracy'])}%, with the IV added at layer {result['edit_layer']}: "
        + ", ".join(f"{_pct(v)}% (x{k})" for k, v in result["zero_shot_accuracy_with_iv"].items())
    )


def write_results(folder: Path, results: dict[str, Any]) -> None:
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plan = results["plan"]
    sections = [
        f"# ivtrainer demo: {results['model']}\n",
        f"{'Quick run' if results['quick'] else 'Full run'}, seed {plan['seed']}; "
        f"{results['seconds']['total'] / 60:.1f} minutes. Accuracies in %.\n",
        f"## 1. Instruction vector ({plan['iv_task']})\n",
        iv_lines(results["instruction_vector"]).replace("\n", "\n\n") + "\n",
        "![CIE heatmap](cie_heatmap.png)\n",
        "## 2. Forgetting: plain vs KL-anchored vs IV-guided LoRA fine-tuning\n",
        own_iv_line(results["new_task"])
        + (
            " (IVGuidedConfig's defaults: FvForgetting's recipe; "
            if plan.get("recipe", "fvforgetting") == "fvforgetting"
            else f" (recipe {plan['recipe']!r}; "
        )
        + "the KL anchor is FvForgetting's KL terms with no IV).\n",
        new_task_table(results["new_task"]) + "\n",
        *([line + "\n"] if (line := repair_line(results["new_task"])) else []),
        f"{results['new_task']['n_train_words']} training words, {plan['epochs']:g} epoch(s), batch 8, "
        f"lr {plan['learning_rate']:g}; {results['new_task']['n_test_words']} test words; "
        f"{plan['n_icl']} 5-shot prompts per ICL task; {plan['n_facts']} known facts.\n",
        "![held-out abilities](forgetting.png)\n",
        *(
            [f"lm-eval tasks (at most {plan['lm_eval_limit'] or 'all'} documents each):\n", table + "\n"]
            if (table := lm_eval_table(results["new_task"]))
            else []
        ),
        "## 3. Knowledge update: plain FT vs F-Learning\n",
        knowledge_table(results["knowledge_update"]) + "\n",
        f"{results['knowledge_update']['n_edits']} edits, {plan['edit_epochs']:g} epochs at batch "
        f"{plan['edit_batch_size']}; old phase LoRA r8 at 1e-3, learning phase full fine-tuning at 5e-5.\n",
    ]
    (folder / "results.md").write_text("\n".join(sections))


def listing(folder: Path) -> list[str]:
    entries = []
    for item in sorted(folder.iterdir()):
        if item.name.startswith("."):  # ivtrainer's marker
            continue
        if item.is_dir():
            subs = sorted(p.name for p in item.iterdir())
            entries.append(f"{item.name}/ ({', '.join(subs)})")
        else:
            entries.append(item.name)
    return entries
