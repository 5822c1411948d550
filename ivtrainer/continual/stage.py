"""One stage of a continual run: its checks, its training (plain, replay, KL anchor or IV-guided,
LoRA or full) and what it keeps (the adapter, the task's IV, the forgetting monitor's KL)."""

from __future__ import annotations

import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ivtrainer.continual.continual_config import (
    _GUIDED,
    _OWN_IV,
    _REPLAY,
    LORA_TARGETS,
    ContinualSettings,
    _name,
)
from ivtrainer.errors import InvalidInputError
from ivtrainer.utils.progress import with_progress_bar

logger = logging.getLogger(__name__)


def _check_sizes(config: ContinualSettings, rows) -> None:
    """Enough rows for what the method does with them, before any work."""
    from ivtrainer.steering.icl import check_extraction_sizes

    for task in config.tasks:
        train = rows[task]["train"][: config.n_train]
        if config.method in _OWN_IV:  # the own-task IV: 10-shot prompts from the training rows
            check_extraction_sizes(train, n_shots=10, source=_name(task))


def _heads_used(config: ContinualSettings, model: nn.Module, heads) -> str:
    """What the own-task IVs take their heads from, for a resumed run to check: ``"exact"``
    (per-task CIE) or a digest of the head set (given, or shipped for this model)."""
    import hashlib

    from ivtrainer.iv_guided.own_task_iv import EXACT, SHIPPED_HEADS
    from ivtrainer.steering.head_set import shipped_head_set

    if config.iv_heads in (None, EXACT):
        return EXACT
    head_set = shipped_head_set(model) if config.iv_heads == SHIPPED_HEADS else heads
    if head_set is None:
        raise InvalidInputError(
            "--iv_heads shipped: ivtrainer ships a head set for the default model only; build one for this model "
            "with `ivtrainer extract-heads` and pass its folder"
        )
    digest = hashlib.blake2b(head_set.cie.numpy().tobytes(), digest_size=16)
    digest.update(repr((head_set.tasks, head_set.n_top)).encode())
    return digest.hexdigest()


def _head_set(config: ContinualSettings):
    """The saved head set for the own-task IVs (read before the model loads), or None."""
    from ivtrainer.iv_guided.own_task_iv import EXACT, SHIPPED_HEADS
    from ivtrainer.steering.head_set import HeadSet

    if config.iv_heads in (None, EXACT, SHIPPED_HEADS):  # per-task CIE, or the shipped set (own_task_iv)
        return None

    return HeadSet.from_pretrained(config.iv_heads)


def _check_model(model: nn.Module, config: ContinualSettings, heads) -> None:
    """What depends on the model, checked right after it loads, before any stage."""
    if config.lora:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in LORA_TARGETS if t not in present]
        if missing:
            raise InvalidInputError(
                f"LoRA trains {' and '.join(LORA_TARGETS)} (FvForgetting's setting), but the model "
                f"({getattr(model.config, 'model_type', '?')}) has no module named {missing[0]}: use --full, or a "
                "Llama-family model"
            )
    if heads is not None:
        heads.check_compatible(model)


def _training_args(
    cls, config: ContinualSettings, output_dir: Path, stage: int, progress: bool, **extra: Any
):
    return cls(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,  # with_progress_bar shows one bar per stage
        seed=config.seed + stage,
        data_seed=config.seed + stage,
        use_cpu=not torch.cuda.is_available(),
        **extra,
    )


def _train_stage(
    current: nn.Module, tokenizer, config, stage: int, rows, folder: Path, times, record, progress
) -> nn.Module:
    """Train the stage's task on ``current``; the model after it (LoRA: the adapter merged in)."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from ivtrainer.callbacks.forgetting_monitor import ForgettingMonitorCallback
    from ivtrainer.datasets.formats import PROMPT_COMPLETION, tokenize_rows
    from ivtrainer.iv_guided.iv_guided_config import IVGuidedConfig
    from ivtrainer.iv_guided.iv_guided_trainer import IVGuidedTrainer
    from ivtrainer.iv_guided.own_task_iv import own_task_iv

    task = config.tasks[stage - 1]
    train = rows[task]["train"][: config.n_train]
    if config.method in _REPLAY:
        rng = random.Random(config.seed + stage)
        for earlier in config.tasks[: stage - 1]:
            pool = rows[earlier]["train"][: config.n_train]
            train = train + rng.sample(pool, round(config.replay_fraction * len(pool)))
    pairs = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train])
    data = tokenize_rows(pairs, tokenizer, PROMPT_COMPLETION)
    vectors = []
    if config.method in _OWN_IV:  # on the model before this task, as the public code does
        start = time.perf_counter()
        iv = own_task_iv(
            current, tokenizer, pairs, name=_name(task), seed=config.seed, progress=progress,
            heads=config.iv_heads, n_mean_prompts=config.iv_mean_prompts, n_cie_prompts=config.iv_cie_prompts,
            n_calibration_prompts=config.iv_calibration_prompts,
        )  # fmt: skip
        times["iv"] += time.perf_counter() - start
        iv.save_pretrained(folder / "instruction_vector")
        vectors = [iv]
    set_seed(config.seed + stage)
    student: Any = current  # a PeftModel with LoRA
    if config.lora:  # a new adapter over the earlier ones, merged (FvForgetting's --create_new_adapter)
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
        student = get_peft_model(current, lora)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    scratch = folder / "trainer"
    if config.method not in _GUIDED:
        args = _training_args(TrainingArguments, config, scratch, stage, progress)
        trainer = Trainer(student, args, train_dataset=data, data_collator=collator)
    else:
        args = _training_args(
            IVGuidedConfig, config, scratch, stage, progress, **config.guided_values(),
            teacher=config.teacher, teacher_top_k=config.teacher_top_k,
            forgetting_monitor_every=0,  # the stage's own monitor below measures once, at its end
        )  # fmt: skip
        trainer = IVGuidedTrainer(
            student, args, instruction_vectors=vectors or None, train_dataset=data, data_collator=collator
        )
    # how far the stage moves the model on its own rows (RL's Razor's predictor of forgetting): at
    # the end of the stage only, so the training itself is untouched
    monitor = ForgettingMonitorCallback(n_rows=MONITOR_ROWS, every=0)
    trainer.add_callback(monitor)
    start = time.perf_counter()
    with_progress_bar(trainer, f"stage {stage}: {_name(task)}", disable=not progress).train()
    times["train"] += time.perf_counter() - start
    record["forgetting_kl"] = {k: monitor.history[-1][f"kl_{k}"] for k in ("forward", "reverse")}
    shutil.rmtree(scratch, ignore_errors=True)
    if config.lora:
        student.save_pretrained(folder / "adapter")
        return student.merge_and_unload()
    student.save_pretrained(folder / "model")
    return student


TASK_IV = "task_iv"


MONITOR_ROWS = 16


def _capture_task_iv(model: nn.Module, tokenizer, config: ContinualSettings, stage: int, rows, progress):
    """The IV of stage ``stage``'s task, extracted from its training rows on ``model`` (the model
    right after the stage), as the own-task IVs are (``iv_heads``, sizes)."""
    from datasets import Dataset

    from ivtrainer.iv_guided.own_task_iv import own_task_iv

    task = config.tasks[stage - 1]
    train = rows[task]["train"][: config.n_train]
    pairs = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train])
    return own_task_iv(
        model, tokenizer, pairs, name=_name(task), seed=config.seed, progress=progress, heads=config.iv_heads,
        n_mean_prompts=config.iv_mean_prompts, n_cie_prompts=config.iv_cie_prompts,
        n_calibration_prompts=config.iv_calibration_prompts,
    )  # fmt: skip
