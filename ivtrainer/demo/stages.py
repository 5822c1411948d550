"""The demo's three stages, each a plain function of the model, the tokenizer and the plan: the
instruction vector, plain vs KL-anchored vs IV-guided LoRA on a new task (and the stage-1 IV added
back to the plain one), plain FT vs F-Learning on edits."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ivtrainer.demo.plan import DemoPlan
from ivtrainer.utils.progress import with_progress_bar


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
    from ivtrainer.steering.extraction import extract_instruction_vector
    from ivtrainer.steering.icl import PromptBuilder, first_token_accuracy

    iv = extract_instruction_vector(
        model,
        tokenizer,
        plan.iv_task,
        n_mean_prompts=plan.n_mean_prompts,
        n_cie_prompts=plan.n_cie_prompts,
        n_calibration_prompts=plan.n_calibration_prompts,
        seed=plan.seed,
    )
    iv.save_pretrained(out / "instruction_vector")
    plot_cie(iv.cie, out / "cie_heatmap.png", heads=iv.heads, title=f"CIE, {plan.iv_task}")
    builder = PromptBuilder(tokenizer)
    zero_shot = [builder.encode([], q) for q in load_task(plan.iv_task, "held_out")[:48]]
    before = first_token_accuracy(model, zero_shot)
    with iv.apply(model):  # at the strength calibrated on extraction pairs
        steered = {f"{iv.strength:g}": first_token_accuracy(model, zero_shot)}
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


def stage_new_task(
    model, tokenizer, facts, plan: DemoPlan, out: Path, work: Path, iv: Any = None
) -> dict[str, Any]:
    """Plain LoRA, the KL anchor (the same KL terms, no IV: the control) and IV-guided LoRA
    (FvForgetting's recipe with the new task's own IV) on the new task; held-out abilities before
    and after. With ``iv`` (stage 1's), that IV is added back to the plain fine-tuned model and
    its task scored zero-shot on held-out pairs (IV repair)."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    from ivtrainer.evaluation.forgetting import evaluate_abilities, new_task_dataset, new_task_words
    from ivtrainer.iv_guided.iv_guided_config import RECIPES, IVGuidedConfig
    from ivtrainer.iv_guided.iv_guided_trainer import IVGuidedTrainer
    from ivtrainer.iv_guided.own_task_iv import own_task_iv

    train_words, test_words, _ = new_task_words()
    train_words, test_words = train_words[: plan.n_train_words], test_words[: plan.n_test_words]
    data = new_task_dataset(train_words, tokenizer)
    collator = _collator(tokenizer)

    def evaluate(m):
        return evaluate_abilities(
            m, tokenizer, facts, test_words, n_icl=plan.n_icl, fixed_demos=plan.icl_fixed_demos, progress=True,
            lm_eval_tasks=plan.lm_eval_tasks, lm_eval_limit=plan.lm_eval_limit,
        )  # fmt: skip

    scores = {"before": evaluate(model)}
    # the paper's recipe: the new task's own IV, from its training rows, on the model before training
    pairs = [{"input": w, "output": f"[{w}]"} for w in train_words]  # the task, without its prompt layout
    own = own_task_iv(
        model, tokenizer, pairs, name="new task", seed=plan.seed, progress=True,
        n_mean_prompts=plan.n_mean_prompts, n_cie_prompts=plan.n_cie_prompts, n_calibration_prompts=plan.n_calibration_prompts // 2,
    )  # fmt: skip
    own.save_pretrained(out / "new_task_iv")
    repair = None
    # the forgetting monitor is off (forgetting_monitor_every=0): the table measures forgetting itself,
    # and the demo keeps its time budget
    for name in ("plain", "kl_anchor", "iv_guided"):
        set_seed(plan.seed)
        student = get_peft_model(_fresh(model), _lora_config())
        if name == "plain":
            args = _training_args(TrainingArguments, work / name, plan)
            trainer = Trainer(student, args, train_dataset=data, data_collator=collator)
        elif name == "kl_anchor":  # the control: FvForgetting's KL terms towards the model before, no IV
            args = _training_args(
                IVGuidedConfig, work / name, plan, forgetting_monitor_every=0, **RECIPES["kl-anchor"]
            )
            trainer = IVGuidedTrainer(student, args, train_dataset=data, data_collator=collator)
        else:  # the plan's recipe (default FvForgetting's), the task's own IV on the teacher
            args = _training_args(
                IVGuidedConfig, work / name, plan, forgetting_monitor_every=0, **RECIPES[plan.recipe]
            )
            trainer = IVGuidedTrainer(
                student, args, instruction_vectors=[own], train_dataset=data, data_collator=collator
            )
        with_progress_bar(trainer, f"LoRA, {name.replace('_', '-')}").train()
        student.save_pretrained(out / "adapters" / f"new_task_{name}")
        scores[name] = evaluate(student)
        if name == "plain" and iv is not None:
            repair = _repair_line(student, tokenizer, iv, plan)
        del trainer, student
    calibration = own.metrics.get("calibration", {})
    return {
        "n_train_words": len(train_words),
        "n_test_words": len(test_words),
        "own_iv": {
            "edit_layer": own.edit_layer,
            "strength": own.strength,
            "n_heads": len(own.heads),
            "zero_shot_accuracy": calibration.get("base_accuracy"),
            "zero_shot_accuracy_with_iv": calibration.get("accuracy"),
            "n_prompts": calibration.get("n_prompts"),
        },
        "scores": scores,
        "facts": list(facts),
        **({"repair": repair} if repair is not None else {}),
    }


def _repair_line(model, tokenizer, iv, plan: DemoPlan) -> dict[str, Any]:
    """Stage 1's IV added back to a fine-tuned model: its task, zero-shot, on the held-out pairs
    stage 1 scored (IV repair at inference)."""
    from ivtrainer.datasets.tasks import load_task
    from ivtrainer.steering.icl import PromptBuilder, first_token_accuracy

    builder = PromptBuilder(tokenizer)
    prompts = [builder.encode([], q) for q in load_task(plan.iv_task, "held_out")[:48]]
    without = first_token_accuracy(model, prompts)
    with iv.apply(model):
        with_iv = first_token_accuracy(model, prompts)
    return {"task": plan.iv_task, "without_iv": without, "with_iv": with_iv, "n_prompts": len(prompts)}


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
    with_progress_bar(
        Trainer(forget, args, train_dataset=old, data_collator=collator), "old facts, LoRA"
    ).train()
    old_adapter = out / "adapters" / "old_knowledge"
    forget.save_pretrained(old_adapter)
    del forget

    set_seed(plan.seed)
    student = _fresh(model)
    args = _training_args(TrainingArguments, work / "ft", plan, **common)
    with_progress_bar(
        Trainer(student, args, train_dataset=new, data_collator=collator), "new facts, FT"
    ).train()
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
    with_progress_bar(trainer, "new facts, F-Learning").train()
    scores["f_learning"] = score(trainer.model)
    return {
        "n_edits": len(edits),
        "forget_lambda": plan.forget_lambda,
        "scores": scores,
        "edits": list(edits),
    }
