"""Forgetting on SmolLM2-135M: plain fine-tuning vs IV-guided, on a new task the model cannot do.

    python benchmarks/forgetting.py [--seeds 0 1 2] [--methods lora full] [--json out.json] [--plot out.png]
        [--write-readme]
    python benchmarks/forgetting.py --sweep --seeds 0 --methods lora [--write-readme]   # chooses TUNED
    python benchmarks/forgetting.py --seeds 0 1 2 --methods lora --settings 'own IV' [--write-readme]
    python benchmarks/forgetting.py ... --lm-eval-tasks ivtrainer_abilities,arc_easy [--lm-eval-limit 100]
    python benchmarks/forgetting.py --seeds 0 1 2 --methods lora --settings IV-guided 'own IV' --precomputed-k 16 64

New task: a made-up output format, ``Q: cold\\nA:`` -> `` [cold]`` (zero-shot accuracy 0), on words
of the built-in tasks: 256 training words, 100 test words. Scored as EasyEdit-style exact match:
every answer token the teacher-forced argmax.

What the model could do before (``ivtrainer.evaluation.forgetting.evaluate_abilities``, which ``ivtrainer demo``
also uses), measured before and after fine-tuning:
- in-context learning: 5-shot first-token accuracy on the held-out pairs of the six built-in tasks
  (40 prompts each), in the same ``Q:/A:`` format the new task uses;
- knowledge vs instruction following (the paper's split): the facts the model knows (the built-in
  counterfactual set's old targets), asked as plain-text completions (``The capital city of France
  is``: teacher-forced first token) and as chat instructions (``What is the capital city of France?
  Answer with one word.``: does the 16-token greedy reply contain the answer).

Forgetting = score before - score after, averaged over the held-out measures. Plain and IV-guided
runs share everything (data, steps, learning rate, seed); IV-guided adds the instruction vectors
of two built-in tasks (antonym, country_capital; extracted once on the original model, 10 heads).
``--settings 'own IV'``: the paper's recipe instead, IVGuidedConfig's defaults (FvForgetting's)
with the new task's own IV, extracted once from its training words on the original model.
``--precomputed-k K ...``: each chosen setting also with ``teacher="precomputed"`` and
``teacher_top_k=K`` (the stored teacher's quality against the live one; 0: the exact store of
hidden states).

Settings are chosen on a validation split, never on the test split: ``--sweep`` trains LoRA
(seed 0) with each of SWEEP's IVGuidedConfig settings and scores ICL prompts whose queries come
from the demonstration pool, a third of the known facts (``split_edits``) and 100 other new-task
words; TUNED is the setting with the least forgetting there whose new-task accuracy stays within
2 points of plain fine-tuning. The test run (default) uses TUNED on the held-out ICL queries, the
other two thirds of the facts and the 100 test words.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

from ivtrainer import (
    InstructionVector,
    IVGuidedConfig,
    IVGuidedTrainer,
    extract_instruction_vector,
    load_default_model,
)
from ivtrainer.datasets.edits import build_counterfacts, split_edits
from ivtrainer.evaluation.forgetting import (
    evaluate_abilities,
    held_out_mean,
    new_task_dataset,
    new_task_words,
)
from ivtrainer.evaluation.plotting import plot_scores
from ivtrainer.iv_guided.iv_guided_config import RECIPES
from ivtrainer.iv_guided.own_task_iv import own_task_iv

CACHE = Path(__file__).parent / ".cache"
IV_TASKS = ("antonym", "country_capital")
LR = {"lora": 5e-4, "full": 2e-5}
# IV-guided settings compared on the validation split (`--sweep`, LoRA, seed 0); TUNED is the one
# with the least forgetting whose new-task accuracy is within 2 points of plain fine-tuning there.
SWEEP: dict[str, dict] = {
    "defaults": {},
    "kl 0.3": {"kl_weight": 0.3},
    "kl 3": {"kl_weight": 3.0},
    "kl 3 answer": {"kl_weight": 3.0, "kl_positions": "answer"},
    "kl 3 last_prompt": {"kl_weight": 3.0, "kl_positions": "last_prompt"},
    "kl 1 forward": {"kl_direction": "forward"},
    "kl 3 -> 0 linear": {"kl_weight": 3.0, "kl_weight_end": 0.0, "kl_schedule": "linear"},
    "no teacher IV": {"teacher_iv_strength": 0.0},
    "no student IV": {"iv_strength_start": 0.0},
}
TUNED: dict = {"iv_strength_start": 0.0}  # `--sweep` result: the KL to the IV-intervened teacher alone
# The test run's IV-guided settings (`--settings`): "IV-guided" is the documented one above (the
# kl-all recipe, the IVs of two other abilities); "own IV" is the paper's recipe: IVGuidedConfig's
# defaults (FvForgetting's) with the new task's own IV, extracted from its training words.
OWN_IV = "own IV"
TEST_SETTINGS: dict[str, dict] = {"IV-guided": TUNED, OWN_IV: {}}


# `--lm-eval-tasks`: lm-evaluation-harness tasks scored next to the held-out abilities (not in the mean)
LM_EVAL: dict = {"lm_eval_tasks": (), "lm_eval_limit": None}


def evaluate(model, tok, facts, words, split: str = "test") -> dict[str, float]:
    return evaluate_abilities(model, tok, facts, words, split=split, n_icl=40, **LM_EVAL)


def instruction_vectors(model, tok) -> list[InstructionVector]:
    out = []
    for task in IV_TASKS:
        folder = CACHE / f"forgetting-iv-{task}"
        if not (folder / "instruction_vector.json").is_file():
            extract_instruction_vector(  # uncalibrated: the IVs the documented runs used
                model, tok, task, n_mean_prompts=50, n_cie_prompts=10, calibrate=False
            ).save_pretrained(folder)
        out.append(InstructionVector.from_pretrained(folder))
    return out


def own_iv(model, tok, train_words) -> InstructionVector:
    """The new task's own IV on the original model (as ``ivtrainer demo``), cached."""
    folder = CACHE / "forgetting-iv-own-task"
    if not (folder / "instruction_vector.json").is_file():
        pairs = [{"input": w, "output": f"[{w}]"} for w in train_words]  # the task, without its prompt layout
        own_task_iv(model, tok, pairs, name="new task", n_mean_prompts=50, n_cie_prompts=10).save_pretrained(
            folder
        )
    return InstructionVector.from_pretrained(folder)


def train(method: str, guided: dict | None, seed: int, train_words, ivs, epochs: float, own=None):
    """Plain fine-tuning (``guided=None``) or IV-guided with these IVGuidedConfig settings (on the
    kl-all recipe with ``ivs``; with ``own``: the package's defaults and that IV)."""
    set_seed(seed)
    model, tok = load_default_model()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
    common = dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=8,
        num_train_epochs=epochs,
        learning_rate=LR[method],
        report_to="none",
        save_strategy="no",
        logging_steps=16,
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
    )
    data, collator = new_task_dataset(train_words, tok), DataCollatorForSeq2Seq(tok, padding=True)
    start = time.perf_counter()
    if guided is not None:
        recipe = {} if own is not None else RECIPES["kl-all"]  # kl-all: the settings its figures used
        trainer = IVGuidedTrainer(
            model,
            IVGuidedConfig(**common, **{**recipe, **guided}),
            instruction_vectors=[own] if own is not None else ivs,
            train_dataset=data,
            data_collator=collator,
        )
    else:
        trainer = Trainer(model, TrainingArguments(**common), train_dataset=data, data_collator=collator)
    trainer.train()
    return model, tok, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="compare the SWEEP settings on the validation split (chooses TUNED) instead of the test run",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["IV-guided"],
        choices=sorted(TEST_SETTINGS),
        help="the test run's IV-guided settings (README block 'forgetting' for the default, "
        "'forgetting-own-iv' otherwise)",
    )
    parser.add_argument(
        "--precomputed-k",
        type=int,
        nargs="+",
        default=[],
        help="also run each setting with the precomputed teacher storing these top-k, 0: its hidden states "
        "(exact) (README block 'forgetting-precomputed')",
    )
    parser.add_argument(
        "--readme-block",
        choices=["forgetting-precomputed", "forgetting-precomputed-exact"],
        help="the docs block --write-readme replaces (default: by run)",
    )
    parser.add_argument(
        "--lm-eval-tasks",
        help="comma-separated lm-eval tasks scored too (a table of their own; pip install 'ivtrainer[eval]')",
    )
    parser.add_argument("--lm-eval-limit", type=int, help="lm-eval: documents per task (default: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--from-json", type=Path, help="render the table (and plot) of an earlier run's --json, train nothing"
    )
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        args.sweep = results["split"] == "validation"
        args.settings = (
            [k for k in results["settings"] if ", precomputed" not in k] if not args.sweep else args.settings
        )
        args.precomputed_k = results.get("precomputed_k", [])
        args.methods = list(dict.fromkeys(name.split(" ")[0] for name in results["runs"]))  # as run
        report(results, args)
        return

    if args.lm_eval_tasks:  # checked before any work
        from ivtrainer.evaluation.lm_eval_harness import check_tasks, task_manager

        LM_EVAL.update(
            lm_eval_tasks=check_tasks(args.lm_eval_tasks, task_manager()), lm_eval_limit=args.lm_eval_limit
        )
    model, tok = load_default_model()
    facts_validation, facts_test = split_edits(build_counterfacts(model, tok))
    train_words, test_words, validation_words = new_task_words()
    split = "validation" if args.sweep else "test"
    facts, words = (facts_validation, validation_words) if args.sweep else (facts_test, test_words)
    ivs = instruction_vectors(model, tok)
    own = own_iv(model, tok, train_words) if OWN_IV in args.settings and not args.sweep else None
    if args.sweep and args.precomputed_k:
        raise SystemExit("--precomputed-k goes with the test run's --settings, not --sweep")
    before = evaluate(model, tok, facts, words, split)
    print("before:", json.dumps(before), flush=True)
    del model
    settings = SWEEP if args.sweep else {k: TEST_SETTINGS[k] for k in args.settings}
    for label, values in list(settings.items()):
        for k in args.precomputed_k:
            settings[f"{label}, precomputed {f'top-{k}' if k else 'exact'}"] = {
                **values,
                "teacher": "precomputed",
                "teacher_top_k": k,
            }
    results: dict = {
        "split": split, "before": before, "settings": settings, "precomputed_k": args.precomputed_k, "runs": {},
    }  # fmt: skip
    for method in args.methods:
        for label, guided in [("plain", None), *settings.items()]:
            name = f"{method} {label}"
            results["runs"][name] = []
            for seed in args.seeds:
                m, t, seconds = train(
                    method,
                    guided,
                    seed,
                    train_words,
                    ivs,
                    args.epochs,
                    own if label.startswith(OWN_IV) else None,
                )
                scores = evaluate(m, t, facts, words, split)
                scores["train_seconds"] = seconds
                results["runs"][name].append(scores)
                print(f"{name} seed {seed}: {json.dumps(scores)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    report(results, args)


def report(results: dict, args) -> None:
    table = format_table(results, args)
    print(table)
    if args.plot:
        plot(results, args.plot)
    if args.write_readme:
        sys.path.insert(0, str(Path(__file__).parent))
        from _readme import replace_block

        default = list(getattr(args, "settings", ["IV-guided"])) == ["IV-guided"]
        block = "forgetting-sweep" if args.sweep else "forgetting" if default else "forgetting-own-iv"
        if getattr(args, "precomputed_k", []):
            block = "forgetting-precomputed"
        replace_block(getattr(args, "readme_block", None) or block, table)


def _summary(results: dict) -> dict[str, dict[str, float]]:
    base = results["before"]
    out = {}
    for name, runs in results["runs"].items():
        mean = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        drops = [held_out_mean(base) - held_out_mean(r) for r in runs]
        out[name] = {
            **mean,
            "forgetting": statistics.mean(drops),
            "forgetting_min": min(drops),
            "forgetting_max": max(drops),
        }
    return out


def format_table(results: dict, args) -> str:
    base, summary = results["before"], _summary(results)
    icl = lambda s: statistics.mean(v for k, v in s.items() if k.startswith("icl/"))  # noqa: E731
    lines = [
        "| model | new task | 5-shot ICL (6 tasks) | facts as completions | facts as instructions | forgetting "
        "| forgetting / plain |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| SmolLM2-135M-Instruct, before | {100 * base['new_task']:.1f} | {100 * icl(base):.1f} | "
        f"{100 * base['facts/completion']:.1f} | {100 * base['facts/instruction']:.1f} | - | - |",
    ]
    for name, s in summary.items():
        plain = summary[name.split(" ")[0] + " plain"]
        ratio = s["forgetting"] / plain["forgetting"] if plain["forgetting"] > 0 else float("nan")
        lines.append(
            f"| {name} | {100 * s['new_task']:.1f} | {100 * icl(s):.1f} | {100 * s['facts/completion']:.1f} | "
            f"{100 * s['facts/instruction']:.1f} | {100 * s['forgetting']:.1f} "
            f"({100 * s['forgetting_min']:.1f} to {100 * s['forgetting_max']:.1f}) | "
            f"{'-' if s is plain else f'{ratio:.2f}'} |"
        )
    command = f"python benchmarks/forgetting.py {'--sweep ' if args.sweep else ''}--seeds {' '.join(map(str, args.seeds))}"
    command += f" --methods {' '.join(args.methods)}"
    if getattr(args, "lm_eval_tasks", None):
        command += f" --lm-eval-tasks {args.lm_eval_tasks}" + (
            f" --lm-eval-limit {args.lm_eval_limit}" if args.lm_eval_limit else ""
        )
    if not args.sweep and list(args.settings) != ["IV-guided"]:
        command += f" --settings {' '.join(repr(x) if ' ' in x else x for x in args.settings)}"
    if getattr(args, "precomputed_k", []):
        command += f" --precomputed-k {' '.join(map(str, args.precomputed_k))}"
    if getattr(args, "readme_block", None):
        command += f" --readme-block {args.readme_block}"
    lines.append(
        f"\n`{command}`: {results['split']} split; means over seeds {', '.join(map(str, args.seeds))} "
        "(forgetting: range over seeds); accuracies in %."
    )
    lm_names = sorted(k for k in base if k.startswith("lm_eval/"))
    if lm_names:  # lm-eval's scores, in a table of their own (their metrics differ by task)
        lines += [
            "",
            "| lm-eval | before | " + " | ".join(summary) + " |",
            "|---|" + "---:|" * (len(summary) + 1),
        ]
        for name in lm_names:
            cells = " | ".join(f"{100 * s[name]:.1f}" for s in summary.values())
            lines.append(f"| {name.removeprefix('lm_eval/')} | {100 * base[name]:.1f} | {cells} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    runs = {"before": results["before"], **_summary(results)}
    title = "SmolLM2-135M: held-out abilities and the new task, before and after fine-tuning"
    plot_scores(runs, path, title=title)


if __name__ == "__main__":
    main()
