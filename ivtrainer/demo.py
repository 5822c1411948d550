"""``ivtrainer demo``: the whole story on one model, offline, in minutes.

1. Extract the instruction vector (IV) of a built-in task; its top heads and CIE heatmap.
2. Fine-tune with LoRA on a new task the model cannot do, plainly and IV-guided; the new task and
   the held-out abilities (:mod:`ivtrainer.evaluation.forgetting`) before and after.
3. Update a handful of facts the model knows to counterfactual ones, plain full fine-tuning
   against F-Learning (LoRA->FT); Reliability, Generality, Locality.

Every number is measured in the run. The output folder holds the IV, the LoRA adapters, the
tables (JSON and Markdown) and the plots; it is written to a temporary folder and renamed into
place at the end, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ivtrainer.errors import IVTrainerError
from ivtrainer.modeling.hooks import eval_mode

__all__ = [
    "DemoPlan",
    "check_output_folder",
    "estimate_seconds",
    "knowledge_table",
    "new_task_table",
    "run_demo",
    "stage_instruction_vector",
    "stage_knowledge_update",
    "stage_new_task",
]

# A LoRA step is about 2 forwards of its batch on CPU, a full fine-tuning step (with AdamW over
# every weight) about 4, and IV-guided LoRA adds the teacher's forward and the KL: ~1.5x a LoRA
# step (benchmarks/iv_guided_cost.py). Used only for the estimate printed up front.
_FORWARDS_PER_STEP = {"lora": 2.2, "full": 4.0, "lora_guided": 3.4}


@dataclasses.dataclass(frozen=True)
class DemoPlan:
    """How much work each stage does. ``DemoPlan()`` is the full demo (about 5 minutes for
    SmolLM2-135M on 2 CPU cores), ``DemoPlan.quick()`` the short one (2-3 minutes)."""

    iv_task: str = "antonym"
    n_mean_prompts: int = 40  # IV: clean 10-shot prompts averaged for the heads' mean outputs
    n_cie_prompts: int = 8  # IV: corrupted prompts on which every head's causal effect is measured
    n_train_words: int = 256  # new task: training words (batch 8)
    epochs: float = 2.0
    learning_rate: float = 5e-4  # LoRA r8
    n_icl: int = 20  # held-out abilities: 5-shot prompts per built-in task
    n_facts: int = 30  # held-out abilities: known facts asked as completions and as instructions
    n_test_words: int = 50  # new task: test words
    n_edits: int = 32  # knowledge update: counterfactual edits
    edit_epochs: float = 3.0  # both phases, as benchmarks/knowledge_update.py (and the paper's old phase)
    edit_batch_size: int = 8
    forget_lambda: float = 1.0  # benchmarks/knowledge_update.py's validation choice for LoRA->FT
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> DemoPlan:
        return cls(
            **{
                "n_mean_prompts": 24,
                "n_cie_prompts": 6,
                "n_train_words": 128,
                "epochs": 1.0,
                "learning_rate": 1e-3,
                "n_icl": 8,
                "n_facts": 16,
                "n_test_words": 30,
                "n_edits": 16,
                **overrides,
            }
        )

    @property
    def train_steps(self) -> int:
        return math.ceil(self.n_train_words / 8) * math.ceil(self.epochs)

    @property
    def edit_steps(self) -> int:
        return math.ceil(self.n_edits / self.edit_batch_size) * math.ceil(self.edit_epochs)


def check_output_folder(
    out: str | os.PathLike, overwrite: bool, model: str | os.PathLike = "default"
) -> Path:
    """The folder the demo will write (:func:`ivtrainer.utils.outputs.check_output_dir`'s rules)."""
    from ivtrainer.utils.outputs import check_output_dir

    return check_output_dir(out, inputs=[model], overwrite=overwrite)


# --- the estimate ------------------------------------------------------------------------------


@torch.no_grad()
def _probe(model: nn.Module) -> tuple[float, float]:
    """(seconds per forward call, seconds per token) on this machine: two timed forwards."""
    device = next(model.parameters()).device
    times = {}
    with eval_mode(model):
        for n_tokens in (8, 512):
            ids = torch.randint(0, 100, (n_tokens // 64 or 1, min(n_tokens, 64)), device=device)
            model(input_ids=ids)  # warm-up
            _synchronize(device)
            start = time.perf_counter()
            model(input_ids=ids)
            _synchronize(device)
            times[n_tokens] = time.perf_counter() - start
    per_token = max(times[512] - times[8], 1e-9) / (512 - 8)
    return max(times[8] - 8 * per_token, 1e-6), per_token


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":  # accelerators run asynchronously: wait before reading the clock
        torch.accelerator.synchronize(device)


def estimate_seconds(
    plan: DemoPlan, per_call: float, per_token: float, n_layers: int, n_heads: int
) -> dict[str, float]:
    """Seconds per stage: the forward calls and tokens each stage runs, counted from the plan,
    times the probed costs (:func:`_probe`). ``benchmarks/demo_time.py`` prints it next to the
    measured times."""

    def cost(calls: float, tokens: float) -> float:
        return calls * per_call + tokens * per_token

    shot = 9  # tokens of one "Q: x\nA: y\n\n" demonstration
    f = _FORWARDS_PER_STEP
    evaluation = cost(  # 5-shot ICL; facts as completions; chat prefill + 16 decoding steps; new task
        6 * math.ceil(plan.n_icl / 16) + math.ceil(plan.n_facts / 16) * 18 + 2,
        6 * plan.n_icl * 6 * shot + plan.n_facts * (12 + 40) + plan.n_test_words * 10,
    )
    lora_steps = plan.train_steps * (f["lora"] + f["lora_guided"])
    edit_steps = plan.edit_steps * (f["lora"] + 2 * f["full"])
    run_overhead = 1.5  # copying the model, building a Trainer, saving
    return {
        # mean activations; CIE: the prefix, then a tree step of L*H copies (~1.5 L*H tokens' cost)
        "instruction vector": cost(
            math.ceil(plan.n_mean_prompts / 16) + 2 * plan.n_cie_prompts + 16,
            plan.n_mean_prompts * 11 * shot
            + plan.n_cie_prompts * (11 * shot + 1.5 * n_layers * n_heads)
            + 1200,  # the steering check
        )
        + 1.0,
        "new task, plain vs IV-guided": 3 * evaluation
        + cost(lora_steps, lora_steps * 8 * 12)
        + 2 * run_overhead,
        "knowledge update": cost(
            edit_steps + 8, edit_steps * plan.edit_batch_size * 14 + 6 * plan.n_edits * 14
        )
        + 3 * run_overhead,
    }


# --- the stages --------------------------------------------------------------------------------


def _spread(records: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Round-robin over relations, so any prefix mixes them."""
    groups: dict[str, list[dict[str, str]]] = {}
    for r in records:
        groups.setdefault(r["relation"], []).append(r)
    out = []
    while any(groups.values()):
        for g in groups.values():
            if g:
                out.append(g.pop(0))
    return out


def _fresh(model: nn.Module) -> nn.Module:
    """A trainable copy of the original model: every run starts from the same weights."""
    copied = copy.deepcopy(model)
    copied.requires_grad_(True)
    return copied.train()


def _training_args(cls, out: Path, plan: DemoPlan, **overrides: Any):
    values = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        num_train_epochs=plan.epochs,
        learning_rate=plan.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=plan.seed,
        data_seed=plan.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    return cls(**{**values, **overrides})


def _with_bar(trainer, desc: str):
    """Replace the Trainer's log printer by one progress bar named ``desc`` showing the loss."""
    from transformers import PrinterCallback, TrainerCallback

    class _Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=desc, unit="step", leave=False)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_Bar())
    return trainer


def _collator(tokenizer):
    """Pads batches (and the loss-free label positions); a tokenizer without a pad token (GPT-2's)
    gets its end-of-sequence token as one, as trl's SFTTrainer does."""
    from transformers import DataCollatorForSeq2Seq

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForSeq2Seq(tokenizer, padding=True)


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")


def stage_instruction_vector(model, tokenizer, plan: DemoPlan, out: Path) -> dict[str, Any]:
    """Extract the IV, save it and its heatmap, and measure whether it steers zero-shot prompts."""
    from ivtrainer.datasets.tasks import load_task
    from ivtrainer.evaluation.plotting import plot_cie
    from ivtrainer.steering.icl import PromptBuilder, first_token_accuracy
    from ivtrainer.steering.instruction_vector import extract_instruction_vector

    iv = extract_instruction_vector(
        model,
        tokenizer,
        plan.iv_task,
        n_mean_prompts=plan.n_mean_prompts,
        n_cie_prompts=plan.n_cie_prompts,
        seed=plan.seed,
    )
    iv.save_pretrained(out / "instruction_vector")
    plot_cie(iv.cie, out / "cie_heatmap.png", heads=iv.heads, title=f"CIE, {plan.iv_task}")
    builder = PromptBuilder(tokenizer)
    zero_shot = [builder.encode([], q) for q in load_task(plan.iv_task, "held_out")[:48]]
    before = first_token_accuracy(model, zero_shot)
    steered = {}
    for strength in (1.0, 2.0, 4.0):  # the papers add it at x1; steering often needs more
        with iv.apply(model, strength):
            steered[f"{strength:g}"] = first_token_accuracy(model, zero_shot)
    return {
        "task": plan.iv_task,
        "edit_layer": iv.edit_layer,
        "heads": [list(h) for h in iv.heads],
        "head_scores": iv.head_scores,
        "zero_shot_accuracy": before,
        "zero_shot_accuracy_with_iv": steered,
        "n_zero_shot_prompts": len(zero_shot),
        "iv": iv,
    }


def stage_new_task(model, tokenizer, iv, facts, plan: DemoPlan, out: Path, work: Path) -> dict[str, Any]:
    """Plain LoRA vs IV-guided LoRA on the new task; held-out abilities before and after."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from ivtrainer.evaluation.forgetting import evaluate_abilities, new_task_dataset, new_task_words
    from ivtrainer.iv_guided.iv_guided_config import IVGuidedConfig
    from ivtrainer.iv_guided.iv_guided_trainer import IVGuidedTrainer

    train_words, test_words, _ = new_task_words()
    train_words, test_words = train_words[: plan.n_train_words], test_words[: plan.n_test_words]
    data = new_task_dataset(train_words, tokenizer)
    collator = _collator(tokenizer)

    def evaluate(m):
        return evaluate_abilities(m, tokenizer, facts, test_words, n_icl=plan.n_icl, progress=True)

    scores = {"before": evaluate(model)}
    for name in ("plain", "iv_guided"):
        set_seed(plan.seed)
        student = get_peft_model(_fresh(model), _lora_config())
        if name == "plain":
            args = _training_args(TrainingArguments, work / name, plan)
            trainer = Trainer(student, args, train_dataset=data, data_collator=collator)
        else:  # the paper's recipe: IVGuidedConfig's defaults
            args = _training_args(IVGuidedConfig, work / name, plan)
            trainer = IVGuidedTrainer(
                student, args, instruction_vectors=[iv], train_dataset=data, data_collator=collator
            )
        _with_bar(trainer, f"LoRA, {name.replace('_', '-')}").train()
        student.save_pretrained(out / "adapters" / f"new_task_{name}")
        scores[name] = evaluate(student)
        del trainer, student
    return {
        "n_train_words": len(train_words),
        "n_test_words": len(test_words),
        "scores": scores,
        "facts": list(facts),
    }


def stage_knowledge_update(model, tokenizer, edits, plan: DemoPlan, out: Path, work: Path) -> dict[str, Any]:
    """Plain full fine-tuning vs F-Learning (old facts' LoRA subtracted, then full fine-tuning)."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from ivtrainer.datasets.edits import edit_dataset
    from ivtrainer.evaluation.edit_metrics import evaluate_edits, locality_reference
    from ivtrainer.f_learning.f_learning_config import FLearningConfig
    from ivtrainer.f_learning.f_learning_trainer import FLearningTrainer

    collator = _collator(tokenizer)
    old, new = edit_dataset(edits, tokenizer, "old"), edit_dataset(edits, tokenizer, "new")
    base_predictions = locality_reference(model, tokenizer, edits)
    common = dict(
        per_device_train_batch_size=plan.edit_batch_size,
        num_train_epochs=plan.edit_epochs,
        learning_rate=5e-5,
    )

    def score(m) -> dict[str, float]:
        return evaluate_edits(m, tokenizer, edits, base_predictions=base_predictions)

    scores = {"before": score(model)}
    # F-Learning's old phase, run here so its adapter lands in the output folder: LoRA on the old facts.
    set_seed(plan.seed)
    forget = get_peft_model(_fresh(model), _lora_config())
    args = _training_args(TrainingArguments, work / "old", plan, **{**common, "learning_rate": 1e-3})
    _with_bar(Trainer(forget, args, train_dataset=old, data_collator=collator), "old facts, LoRA").train()
    old_adapter = out / "adapters" / "old_knowledge"
    forget.save_pretrained(old_adapter)
    del forget

    set_seed(plan.seed)
    student = _fresh(model)
    args = _training_args(TrainingArguments, work / "ft", plan, **common)
    _with_bar(Trainer(student, args, train_dataset=new, data_collator=collator), "new facts, FT").train()
    scores["plain"] = score(student)
    del student

    set_seed(plan.seed)
    config = _training_args(
        FLearningConfig,
        work / "f_learning",
        plan,
        **common,
        forget_method="lora",
        learn_method="full",
        forget_lambda=plan.forget_lambda,
    )
    trainer = FLearningTrainer(
        _fresh(model), config, train_dataset=new, old_adapter=str(old_adapter), data_collator=collator
    )
    _with_bar(trainer, "new facts, F-Learning").train()
    scores["f_learning"] = score(trainer.model)
    return {
        "n_edits": len(edits),
        "forget_lambda": plan.forget_lambda,
        "scores": scores,
        "edits": list(edits),
    }


# --- reporting ---------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


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
    for name, label in (("before", "before"), ("plain", "plain"), ("iv_guided", "IV-guided")):
        s = scores[name]
        icl = statistics.mean(v for k, v in s.items() if k.startswith("icl/"))
        drop = before - held_out_mean(s)
        forgetting = "-"
        if name != "before":
            forgetting = f"{100 * drop:.1f}"
            if name == "iv_guided" and plain_drop > 0:
                forgetting += f" ({drop / plain_drop:.2f} x plain)"
        lines.append(
            f"| {label} | {_pct(s['new_task'])} | {_pct(icl)} | {_pct(s['facts/completion'])} | "
            f"{_pct(s.get('facts/instruction')) if has_instruction else 'n/a'} | {_pct(held_out_mean(s))} | "
            f"{forgetting} |"
        )
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

    labels = {"before": "before", "plain": "LoRA, plain", "iv_guided": "LoRA, IV-guided"}
    return plot_scores({labels[k]: v for k, v in result["scores"].items()}, path, title=title)


# --- the run -----------------------------------------------------------------------------------


@contextmanager
def _quiet() -> Iterator[None]:
    """The demo's own lines, not the Trainer's notices or libraries' deprecation warnings."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = round(time.perf_counter() - start, 1)


def run_demo(
    model_name: str = "default",
    out: str | os.PathLike = "ivtrainer-demo",
    *,
    plan: DemoPlan | None = None,
    quick: bool = False,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the three stages and write their results to ``out``; returns what ``results.json`` holds.

    ``echo`` receives the lines the command prints (the plan, the estimate, the tables).
    """
    from ivtrainer.datasets.edits import build_counterfacts
    from ivtrainer.datasets.tasks import list_tasks
    from ivtrainer.modeling.architectures import get_layout
    from ivtrainer.modeling.loading import DEFAULT_MODEL, load_model, model_source
    from ivtrainer.utils.outputs import atomic_dir, scratch_dir

    plan = plan or (DemoPlan.quick() if quick else DemoPlan())
    target = check_output_folder(out, overwrite, model_name)
    if plan.iv_task not in list_tasks():
        raise IVTrainerError(f"unknown task {plan.iv_task!r}; built-in tasks: {', '.join(list_tasks())}")
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    shown = "the default model" if model_name == DEFAULT_MODEL else model_name
    echo(f"Loading {shown} and finding the built-in facts it knows ...")
    with _quiet():
        with _timed(seconds, "loading and preparing"):
            model, tokenizer = load_model(model_name)
            if torch.cuda.is_available():  # the Trainer would move each copy there anyway
                model.to("cuda")
            layout = get_layout(model)
            try:
                known = _spread(build_counterfacts(model, tokenizer, seed=plan.seed))
            except ValueError as exc:
                raise IVTrainerError(f"{model_name}: {exc}") from None
            if len(known) < 4:
                raise IVTrainerError(
                    f"{model_name} completes only {len(known)} of the built-in facts; the demo needs at least 4"
                )
            n_edits = min(plan.n_edits, len(known) // 2)
            edits, facts = known[:n_edits], known[n_edits : n_edits + plan.n_facts]
            per_call, per_token = _probe(model)
        estimate = estimate_seconds(plan, per_call, per_token, layout.n_layers, layout.n_heads)
        name = model_source(model)["name"] or model_name
        echo(
            f"ivtrainer demo{' --quick' if quick else ''}: {name} ({layout.n_layers} layers x "
            f"{layout.n_heads} heads), {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters"
        )
        echo(
            f"{len(known)} built-in facts known to the model: {len(edits)} to edit, {len(facts)} to "
            f"watch for forgetting. Estimated time: {_minutes(sum(estimate.values()))} "
            f"({', '.join(f'{k} {_minutes(v)}' for k, v in estimate.items())})"
        )
        with scratch_dir("ivtrainer-demo") as work, atomic_dir(target, marker={"command": "demo"}) as tmp:
            echo(f"\n[1/3] Instruction vector of '{plan.iv_task}' (causal mediation over all heads)")
            with _timed(seconds, "instruction vector"):
                iv_result = stage_instruction_vector(model, tokenizer, plan, tmp)
            iv = iv_result.pop("iv")
            echo(_iv_lines(iv_result))

            echo("\n[2/3] LoRA fine-tuning on a new task (Q: cold -> A: [cold]), plain and IV-guided")
            with _timed(seconds, "new task, plain vs IV-guided"):
                new_task = stage_new_task(model, tokenizer, iv, facts, plan, tmp, work)
                plot_new_task(
                    new_task, tmp / "forgetting.png", f"{Path(str(name)).name}: before and after LoRA"
                )
            echo(new_task_table(new_task))

            echo(f"\n[3/3] Knowledge update: {len(edits)} facts changed to counterfactual ones")
            with _timed(seconds, "knowledge update"):
                knowledge = stage_knowledge_update(model, tokenizer, edits, plan, tmp, work)
            echo(knowledge_table(knowledge))

            seconds["total"] = round(time.perf_counter() - start, 1)
            results = {
                "model": str(name),
                "quick": quick,
                "plan": dataclasses.asdict(plan),
                "instruction_vector": iv_result,
                "new_task": new_task,
                "knowledge_update": knowledge,
                "seconds": seconds,
                "estimated_seconds": {k: round(v, 1) for k, v in estimate.items()},
            }
            _write_results(tmp, results)
    echo(
        f"\nDone in {_minutes(seconds['total'])} (estimated {_minutes(sum(estimate.values()))} after loading). "
        f"Everything is in {os.fspath(out)}/:"
    )
    for line in _listing(target):
        echo(f"  {line}")
    return results


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _iv_lines(result: dict[str, Any]) -> str:
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


def _write_results(folder: Path, results: dict[str, Any]) -> None:
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plan = results["plan"]
    sections = [
        f"# ivtrainer demo: {results['model']}\n",
        f"{'Quick run' if results['quick'] else 'Full run'}, seed {plan['seed']}; "
        f"{results['seconds']['total'] / 60:.1f} minutes. Accuracies in %.\n",
        f"## 1. Instruction vector ({plan['iv_task']})\n",
        _iv_lines(results["instruction_vector"]).replace("\n", "\n\n") + "\n",
        "![CIE heatmap](cie_heatmap.png)\n",
        "## 2. Forgetting: plain vs IV-guided LoRA fine-tuning\n",
        new_task_table(results["new_task"]) + "\n",
        f"{results['new_task']['n_train_words']} training words, {plan['epochs']:g} epoch(s), batch 8, "
        f"lr {plan['learning_rate']:g}; {results['new_task']['n_test_words']} test words; "
        f"{plan['n_icl']} 5-shot prompts per ICL task; {plan['n_facts']} known facts.\n",
        "![held-out abilities](forgetting.png)\n",
        "## 3. Knowledge update: plain FT vs F-Learning\n",
        knowledge_table(results["knowledge_update"]) + "\n",
        f"{results['knowledge_update']['n_edits']} edits, {plan['edit_epochs']:g} epochs at batch "
        f"{plan['edit_batch_size']}; old phase LoRA r8 at 1e-3, learning phase full fine-tuning at 5e-5.\n",
    ]
    (folder / "results.md").write_text("\n".join(sections))


def _listing(folder: Path) -> list[str]:
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
