"""IVKLCallback on a plain Trainer: refused settings, the teacher copy."""

from __future__ import annotations

import math

import pytest
from ivtrainer.callbacks import IVInterventionCallback, IVKLCallback
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from ivtrainer import IVGuidedTrainer
from ivtrainer.testing import tiny_model
from tests.utils import collator, guided_config


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_vectors_and_weights_are_refused_before_training(tmp_path, iv, data, bad):
    import dataclasses

    from ivtrainer.steering.instruction_vector import InvalidVectorError

    vector = iv.vector.clone()
    vector[0] = bad
    with pytest.raises(InvalidVectorError, match="non-finite"):
        dataclasses.replace(iv, vector=vector)
    with pytest.raises(ValueError, match=r"iv_weights\[0\] must be a finite number"):
        guided_config(tmp_path, iv_weights=[bad])
    with pytest.raises(ValueError, match=r"iv_weights\[0\] must be a finite number"):
        IVInterventionCallback(iv, weights=[bad])
    with pytest.raises(ValueError, match=r"iv_weights\[0\] must be a finite number"):
        IVKLCallback(iv, iv_weights=[bad])
    assert not (tmp_path / "run").exists()


def test_settings_that_hide_the_labels_are_refused(tmp_path, iv, data):
    """Label smoothing and compute_loss_func make the Trainer pop the labels before the forward:
    refused when the trainer is built (or, on a plain Trainer, when training begins)."""
    with pytest.raises(ValueError, match="label_smoothing_factor > 0 makes the Trainer remove the labels"):
        IVGuidedTrainer(
            tiny_model("llama"),
            guided_config(tmp_path, label_smoothing_factor=0.1),
            instruction_vectors=iv,
            train_dataset=data,
            data_collator=collator(),
        )
    with pytest.raises(ValueError, match="compute_loss_func makes the Trainer remove the labels"):
        IVGuidedTrainer(
            tiny_model("llama"),
            guided_config(tmp_path),
            instruction_vectors=iv,
            train_dataset=data,
            data_collator=collator(),
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
        )
    args = TrainingArguments(
        str(tmp_path / "t"), label_smoothing_factor=0.1, max_steps=1, report_to="none", use_cpu=True
    )
    trainer = Trainer(
        tiny_model("llama"), args, train_dataset=data, data_collator=collator(), callbacks=[IVKLCallback(iv)]
    )
    with pytest.raises(ValueError, match="label_smoothing_factor > 0"):
        trainer.train()


def test_model_as_its_own_teacher_and_fsdp_are_refused(tmp_path, iv, data):
    model = tiny_model("llama")
    args = TrainingArguments(str(tmp_path / "t"), max_steps=1, report_to="none", use_cpu=True)
    for teacher in (model, get_peft_model(model, LoraConfig(r=2, task_type="CAUSAL_LM")).get_base_model()):
        with pytest.raises(ValueError, match="teacher= is the model being trained"):
            Trainer(
                model,
                args,
                train_dataset=data,
                data_collator=collator(),
                callbacks=[IVKLCallback(iv, teacher=teacher)],
            )
    fsdp = TrainingArguments(str(tmp_path / "f"), max_steps=1, report_to="none", use_cpu=True)
    fsdp.fsdp = ["full_shard"]  # what --fsdp full_shard sets; its own checks need several GPUs
    with pytest.raises(ValueError, match="does not support FSDP"):
        IVKLCallback(iv).on_init_end(fsdp, None, None, model=tiny_model("llama"))


def test_release_frees_the_teacher_copy(tmp_path, iv, data):
    """Nothing else keeps the frozen copy alive (it is the model's size): release() frees it."""
    import gc
    import weakref

    callback = IVKLCallback(iv)
    args = TrainingArguments(str(tmp_path / "t"), max_steps=1, report_to="none", use_cpu=True)
    Trainer(tiny_model("llama"), args, train_dataset=data, data_collator=collator(), callbacks=[callback])
    copy = weakref.ref(callback.reference)
    assert copy() is not None
    callback.release()
    gc.collect()
    assert copy() is None
