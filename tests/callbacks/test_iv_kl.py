"""IVKLCallback on a plain Trainer: refused settings, the teacher copy."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from ivtrainer import IVGuidedTrainer
from ivtrainer.callbacks import IVInterventionCallback, IVKLCallback
from ivtrainer.modeling.hooks import hooks
from ivtrainer.testing import tiny_model
from tests.utils import collator, grads_after_one_step, guided_config


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
    with pytest.raises(ValueError, match=r"does not support FSDP.*use teacher='precomputed'"):
        IVKLCallback(iv).on_init_end(fsdp, None, None, model=tiny_model("llama"))
    IVKLCallback(iv, teacher="precomputed").on_init_end(
        fsdp, None, None, model=tiny_model("llama")
    )  # accepted


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


def _close(a: dict, b: dict) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-4)


def test_several_terms_share_one_teacher_pass_and_add_up(tmp_path, iv, data):
    """CE + 3 KL(last prompt) + 0.5 KL(all) from one teacher forward has the gradient of the two
    single-term losses' sum, minus the CE counted twice."""
    kw = dict(iv_strength_start=0.0, teacher_iv_strength=2.0)
    both = grads_after_one_step(
        tmp_path / "b",
        iv,
        data,
        tiny_model("llama", seed=2),
        kl_positions=["last_prompt", "all"],
        kl_weight=[3.0, 0.5],
        **kw,
    )
    first = grads_after_one_step(
        tmp_path / "f", iv, data, tiny_model("llama", seed=2), kl_positions="last_prompt", kl_weight=3.0, **kw
    )
    second = grads_after_one_step(tmp_path / "s", iv, data, tiny_model("llama", seed=2), kl_weight=0.5, **kw)
    ce = grads_after_one_step(tmp_path / "c", iv, data, tiny_model("llama", seed=2), kl_weight=0.0, **kw)
    assert max(float((first[n] - ce[n]).abs().max()) for n in ce) > 1e-4  # each term matters
    _close(both, {n: first[n] + second[n] - ce[n] for n in ce})

    model = tiny_model("llama", seed=2)
    trainer = IVGuidedTrainer(
        model,
        guided_config(
            tmp_path / "t", max_steps=2, kl_positions=["last_prompt", "all"], kl_weight=[3.0, 0.5], **kw
        ),
        instruction_vectors=iv,
        train_dataset=data.select(range(4)),
        data_collator=collator(),
    )
    passes = []
    teacher = trainer.iv_callbacks[-1].reference
    with hooks(teacher.register_forward_hook(lambda *_: passes.append(1))):
        trainer.train()
    assert len(passes) == 2  # one teacher pass per step for both terms
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["kl_last_prompt"] > 0 and log["kl_all"] > 0
    assert (log["kl_weight_last_prompt"], log["kl_weight_all"]) == (3.0, 0.5)


def test_a_term_below_its_threshold_adds_nothing(tmp_path, iv, data):
    kw = dict(iv_strength_start=0.0, teacher_iv_strength=2.0)
    high = grads_after_one_step(
        tmp_path / "h", iv, data, tiny_model("llama", seed=2), kl_weight=5.0, kl_threshold=1e9, **kw
    )
    ce = grads_after_one_step(tmp_path / "c", iv, data, tiny_model("llama", seed=2), kl_weight=0.0, **kw)
    _close(high, ce)


@pytest.mark.parametrize("peft", [False, True])
def test_the_head_term_against_the_teacher_without_the_iv(tmp_path, iv, data, peft):
    """At the first step the student is the original model with no IV: its heads equal the
    teacher's without the IV (FvForgetting's reference, MSE 0) but not the heads of the pass with
    the IV added before them."""
    early = dataclasses.replace(iv, edit_layer=0)  # the IV changes every head of layers 1 and 2
    assert max(layer for layer, _ in early.heads) > 0

    def first_head_mse(name, reference, threshold=0.0):
        model = tiny_model("llama", seed=2)
        if peft:
            model = get_peft_model(model, LoraConfig(r=4, task_type="CAUSAL_LM"))
        config = guided_config(
            tmp_path / name, max_steps=1, iv_strength_start=0.0, teacher_iv_strength=4.0, kl_weight=0.0,
            head_mse_weight=1.0, head_mse_reference=reference, head_mse_threshold=threshold,
        )  # fmt: skip
        trainer = IVGuidedTrainer(
            model,
            config,
            instruction_vectors=early,
            train_dataset=data.select(range(4)),
            data_collator=collator(),
        )
        trainer.train()
        return next(e["head_mse"] for e in trainer.state.log_history if "head_mse" in e)

    assert first_head_mse("without", "without_iv") == pytest.approx(0.0, abs=1e-9)
    assert first_head_mse("with", "with_iv") > 1e-6
    assert first_head_mse("above", "with_iv", threshold=1e9) == 0.0  # no head above the threshold


def test_the_kl_anchor_recipe_needs_no_vector_and_the_default_does(tmp_path, data):
    from ivtrainer import IVGuidedConfig

    common = dict(per_device_train_batch_size=4, max_steps=1, report_to="none", use_cpu=True, logging_steps=1,
                  save_strategy="no", disable_tqdm=True)  # fmt: skip
    anchor = IVGuidedConfig.recipe("kl-anchor", output_dir=str(tmp_path / "a"), **common)
    trainer = IVGuidedTrainer(
        tiny_model("llama"), anchor, train_dataset=data.select(range(4)), data_collator=collator()
    )
    trainer.train()
    assert trainer.instruction_vectors == [] and "kl_all" in trainer.state.log_history[0]
    trainer.create_model_card()
    card = (tmp_path / "a" / "README.md").read_text()
    assert "None: the teacher is the model before training, unchanged (a KL anchor)" in card
    with pytest.raises(ValueError, match="no instruction vector given"):
        IVGuidedTrainer(
            tiny_model("llama"),
            IVGuidedConfig(output_dir=str(tmp_path / "d"), **common),
            train_dataset=data.select(range(4)),
            data_collator=collator(),
        )
