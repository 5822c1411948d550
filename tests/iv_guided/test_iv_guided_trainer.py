"""IVGuidedTrainer: gradients, equality with the callbacks, checkpoints, data formats, the Hub."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from ivtrainer import IVGuidedTrainer
from ivtrainer.callbacks import IVInterventionCallback, IVKLCallback
from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.iv_guided_trainer import iv_guided_callbacks
from ivtrainer.iv_guided.schedules import Schedule
from ivtrainer.steering.instruction_vector import IncompatibleVectorError
from ivtrainer.testing import intercept_hub_upload, tiny_model
from tests.utils import collator, grads_after_one_step, guided_config


@pytest.mark.parametrize("peft", [False, True])
@pytest.mark.parametrize("positions", ["all", "answer", "last_prompt"])
def test_gradient_accumulation_equals_one_large_batch(tmp_path, iv, data, peft, positions):
    def model():
        m = tiny_model("llama", seed=1)
        if peft:
            m = get_peft_model(m, LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM"))
        return m

    kw = dict(kl_positions=positions, kl_weight=3.0, teacher_iv_strength=2.0, head_mse_weight=0.5)
    one = grads_after_one_step(tmp_path / "a", iv, data, model(), per_device_train_batch_size=4, **kw)
    two = grads_after_one_step(
        tmp_path / "b", iv, data, model(), per_device_train_batch_size=2, gradient_accumulation_steps=2, **kw
    )
    assert any(g.abs().max() > 0 for g in one.values())
    for name, grad in one.items():
        torch.testing.assert_close(two[name], grad, rtol=1e-4, atol=1e-6)


def test_kl_changes_the_gradient_and_zero_weights_give_plain_training(tmp_path, iv, data):
    plain = grads_after_one_step(
        tmp_path / "p", iv, data, tiny_model("llama", seed=2), iv_strength_start=0.0, kl_weight=0.0
    )
    model = tiny_model("llama", seed=2)
    args = TrainingArguments(
        str(tmp_path / "t"),
        optim="sgd",
        learning_rate=1.0,
        max_steps=1,
        report_to="none",
        lr_scheduler_type="constant",
        per_device_train_batch_size=4,
        use_cpu=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(
        model,
        args,
        train_dataset=data.select(range(4)),
        data_collator=collator(),
    ).train()
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), plain[name], rtol=1e-5, atol=1e-7)
    guided = grads_after_one_step(
        tmp_path / "g", iv, data, tiny_model("llama", seed=2), kl_weight=5.0, teacher_iv_strength=4.0
    )
    assert max((guided[n] - plain[n]).abs().max() for n in plain) > 1e-4


def test_callbacks_on_a_plain_trainer_equal_ivguidedtrainer(tmp_path, iv, data):
    config = guided_config(tmp_path)
    guided = IVGuidedTrainer(
        tiny_model("llama", seed=3),
        config,
        instruction_vectors=iv,
        train_dataset=data,
        data_collator=collator(),
    )
    guided.train()
    plain_args = TrainingArguments(
        **{
            k: getattr(config, k)
            for k in (
                "output_dir",
                "per_device_train_batch_size",
                "num_train_epochs",
                "learning_rate",
                "report_to",
                "save_strategy",
                "logging_steps",
                "disable_tqdm",
                "use_cpu",
                "seed",
            )
        }
    )
    plain = Trainer(
        tiny_model("llama", seed=3),
        plain_args,
        train_dataset=data,
        data_collator=collator(),
        callbacks=iv_guided_callbacks(config, [iv]),
    )
    plain.train()
    for (name, p), q in zip(guided.model.named_parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    logs = [entry for entry in guided.state.log_history if "loss" in entry]
    assert [entry["iv_strength"] for entry in logs] == [1.0, 0.0]  # 2 steps, linear to 0 over half
    for key in ("ce", "kl", "kl_weight"):
        assert all(key in entry for entry in logs)
        assert [e[key] for e in logs] == pytest.approx(
            [e[key] for e in plain.state.log_history if "loss" in e]
        )
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 0: student + IV is the teacher + IV
    assert not any(cb._stack for cb in guided.iv_callbacks)  # hooks removed after training


def test_peft_teacher_is_the_base_without_a_copy(tmp_path, iv, data):
    model = get_peft_model(tiny_model("llama", seed=4), LoraConfig(r=4, task_type="CAUSAL_LM"))
    seen = {}

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen["reference"] = trainer.iv_callbacks[1].reference

    trainer = IVGuidedTrainer(
        model,
        guided_config(tmp_path),
        instruction_vectors=iv,
        train_dataset=data,
        callbacks=[Spy()],
        data_collator=collator(),
    )
    trainer.train()
    assert "reference" in seen and seen["reference"] is None


@pytest.mark.parametrize("restore", [False, True])  # restore_callback_states_from_checkpoint
def test_checkpoints_hold_the_vectors_and_resume_is_exact(tmp_path, iv, data, restore):
    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    def trainer(out, callbacks=()):
        config = guided_config(
            tmp_path,
            output_dir=str(out),
            per_device_train_batch_size=2,
            save_strategy="steps",
            save_steps=1,
            iv_schedule="cosine",
            iv_schedule_fraction=1.0,
            restore_callback_states_from_checkpoint=restore,
        )
        return IVGuidedTrainer(
            tiny_model("llama", seed=5),
            config,
            instruction_vectors=iv,
            train_dataset=data,
            data_collator=collator(),
            callbacks=list(callbacks),
        )

    whole = trainer(tmp_path / "whole")
    whole.train()
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "run", [Crash()]).train()
    checkpoint = tmp_path / "run" / "checkpoint-1"  # the crash came before step 2 was saved
    assert (
        checkpoint / "instruction_vectors" / "intervention" / "0" / "instruction_vector.safetensors"
    ).is_file()
    assert (checkpoint / "instruction_vectors" / "kl" / "0" / "instruction_vector.json").is_file()
    state = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert state["IVInterventionCallback"]["args"]["schedule"]["kind"] == "cosine"
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)
    strengths = [e["iv_strength"] for e in whole.state.log_history if "loss" in e]
    assert strengths == pytest.approx([Schedule("cosine", 1, 0, 1)(s, 4) for s in range(4)])


def test_prompt_completion_data(tmp_path, iv, tokenizer):
    rows = Dataset.from_list([{"prompt": f"Q: word {i}\nA:", "completion": f" w{i}"} for i in range(4)])
    trainer = IVGuidedTrainer(
        tiny_model("llama"),
        guided_config(tmp_path),
        instruction_vectors=iv,
        train_dataset=rows,
        processing_class=tokenizer,
    )
    assert set(trainer.train_dataset.column_names) == {"input_ids", "attention_mask", "labels"}
    trainer.train()
    assert "kl" in trainer.state.log_history[0]


def test_trainer_bad_input_fails_at_construction(tmp_path, iv, data, tokenizer):
    with pytest.raises(ValueError, match="no instruction vector given"):
        IVGuidedTrainer(tiny_model("llama"), guided_config(tmp_path), train_dataset=data)
    wide = tiny_model("llama", hidden_size=96, num_attention_heads=4)
    with pytest.raises(IncompatibleVectorError, match="hidden size"):
        IVGuidedTrainer(wide, guided_config(tmp_path), instruction_vectors=iv, train_dataset=data)
    no_labels = data.remove_columns("labels")
    with pytest.raises(ValueError, match="have no labels"):
        IVGuidedTrainer(
            tiny_model("llama"),
            guided_config(tmp_path),
            instruction_vectors=iv,
            train_dataset=no_labels,
            processing_class=tokenizer,
        )
    with pytest.raises(TypeError, match="needs an IVGuidedConfig"):
        IVGuidedTrainer(
            tiny_model("llama"), TrainingArguments("o"), instruction_vectors=iv, train_dataset=data
        )
    with pytest.raises(ValueError, match="weight must be a finite number"):
        IVKLCallback(iv, weight=math.nan)
    with pytest.raises(ValueError, match="no instruction vector given"):
        IVInterventionCallback()
    assert not (tmp_path / "run").exists()


def test_push_to_hub_sends_weights_vectors_and_an_honest_card(tmp_path, iv, data, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, task_type="CAUSAL_LM"))
    config = guided_config(
        tmp_path, hub_model_id="someone/iv-guided-tiny", iv_schedule="cosine", kl_weight=0.5
    )
    trainer = IVGuidedTrainer(
        model,
        config,
        instruction_vectors=iv,
        train_dataset=data,
        data_collator=collator(),
    )
    trainer.train()
    with intercept_hub_upload("someone/iv-guided-tiny") as sent:
        trainer.push_to_hub()
    create_repo = sent["create_repo"]
    assert create_repo.called and sent["repo_id"] == "someone/iv-guided-tiny"
    assert {
        "adapter_model.safetensors",
        "instruction_vectors/intervention/0/instruction_vector.safetensors",
    } <= sent["files"]
    card = sent["card"]
    for text in (
        "IV-guided training",
        "arXiv:2406.12227",
        "cosine 1 -> 0 over 50% of the steps",
        f"| {iv.edit_layer} |",
        "L{}H{}".format(*iv.heads[0]),
        "LoRA r=4",
        "kl (last logged)",
        "- ivtrainer",
    ):
        assert text in card, text
    assert "all x0.5; reverse, temperature 2" in card.split("KL terms")[1].splitlines()[0]


def test_push_without_a_token_fails_before_any_work(tmp_path, iv, data, monkeypatch):
    from unittest import mock

    from ivtrainer.hub.push import HubError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(HubError, match="no Hugging Face token"):
        IVGuidedTrainer(
            tiny_model("llama"),
            guided_config(tmp_path, push_to_hub=True),
            instruction_vectors=iv,
            train_dataset=data,
        )
    assert not (tmp_path / "run").exists()
    trainer = IVGuidedTrainer(
        tiny_model("llama"), guided_config(tmp_path), instruction_vectors=iv, train_dataset=data
    )
    with (
        mock.patch("huggingface_hub.HfApi.upload_folder") as upload,
        pytest.raises(HubError, match="no Hugging Face token"),
    ):
        trainer.push_to_hub()
    assert not upload.called and not (tmp_path / "run" / "README.md").exists()  # no card written either


def test_head_mse_works_on_peft_models(tmp_path, iv, data):
    """The LoRA teacher runs through the student's modules: the head term must still compare the
    student's heads with the teacher's (it used to compare the teacher with itself: always 0)."""

    def lora():
        m = tiny_model("llama", seed=1)
        return get_peft_model(m, LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM"))

    kw = dict(kl_weight=0.0, iv_strength_start=0.0, teacher_iv_strength=2.0)
    without = grads_after_one_step(tmp_path / "a", iv, data, lora(), head_mse_weight=0.0, **kw)
    with_mse = grads_after_one_step(tmp_path / "b", iv, data, lora(), head_mse_weight=100.0, **kw)
    assert max((with_mse[n] - without[n]).abs().max() for n in without) > 1e-4
    trainer = IVGuidedTrainer(
        lora(),
        guided_config(tmp_path / "c", max_steps=1, head_mse_weight=1.0, **kw),
        instruction_vectors=iv,
        train_dataset=data.select(range(4)),
        data_collator=collator(),
    )
    trainer.train()
    assert next(log["head_mse"] for log in trainer.state.log_history if "head_mse" in log) > 0


@pytest.mark.parametrize("peft", [False, True])
def test_evaluation_sees_the_model_without_the_student_iv(tmp_path, iv, data, peft):
    """The student's IV is a training-time intervention: Trainer.evaluate and predict, mid-run,
    measure the model itself (here unchanged: learning rate 0), as a plain Trainer would."""

    def model():
        m = tiny_model("llama", seed=3)
        return get_peft_model(m, LoraConfig(r=4, task_type="CAUSAL_LM")) if peft else m

    held_out = data.select(range(4, 8))
    kw = dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4, max_steps=1)
    plain = Trainer(
        model(),
        TrainingArguments(str(tmp_path / "plain"), report_to="none", use_cpu=True, disable_tqdm=True),
        eval_dataset=held_out,
        data_collator=collator(),
    ).evaluate()["eval_loss"]
    trainer = IVGuidedTrainer(
        model(),
        guided_config(tmp_path, learning_rate=0.0, iv_schedule="constant", iv_strength_end=1.0, **kw),
        instruction_vectors=iv,
        train_dataset=data.select(range(4)),
        eval_dataset=held_out,
        data_collator=collator(),
    )
    during = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            during.append(trainer.predict(held_out).metrics["test_loss"])

    trainer.add_callback(Probe())
    trainer.train()
    (evaluated,) = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    assert trainer.iv_callbacks[0].strength == 1.0  # the student IV was on throughout training
    assert evaluated == pytest.approx(plain, rel=1e-6) and during[0] == pytest.approx(plain, rel=1e-6)
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert log["ce"] != pytest.approx(plain, rel=1e-3)  # training forwards did take the IV


def test_a_prompt_completion_eval_dataset_is_tokenised_as_the_train_dataset(tmp_path, iv, tokenizer):
    rows = Dataset.from_list([{"prompt": f"Q: word {i}\nA:", "completion": f" w{i}"} for i in range(4)])
    trainer = IVGuidedTrainer(
        tiny_model("llama"),
        guided_config(tmp_path),
        instruction_vectors=iv,
        train_dataset=rows,
        eval_dataset={"a": rows, "b": rows.select(range(2))},
        processing_class=tokenizer,
    )
    assert trainer.eval_dataset["a"]["labels"] == trainer.train_dataset["labels"]
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_a_loss"]) and math.isfinite(metrics["eval_b_loss"])
    single = IVGuidedTrainer(
        tiny_model("llama"),
        guided_config(tmp_path / "s"),
        instruction_vectors=iv,
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tokenizer,
    )
    assert math.isfinite(single.evaluate()["eval_loss"])


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients_or_is_refused(tmp_path, iv, data, reentrant):
    """The student IV and the head term under gradient checkpointing (trl's SFTConfig turns it
    on): the same gradients as without it, or, where the head term would get none (reentrant
    checkpointing records the heads without autograd), a refusal before any step."""

    def lora():
        m = tiny_model("llama", seed=1)
        torch.manual_seed(1)  # the same random adapters each time
        return get_peft_model(m, LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM"))

    checkpointing = dict(
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    student_iv = dict(iv_strength_start=1.0, kl_weight=1.0, teacher_iv_strength=2.0)
    plain = grads_after_one_step(tmp_path / "a", iv, data, lora(), **student_iv)
    checkpointed = grads_after_one_step(tmp_path / "b", iv, data, lora(), **student_iv, **checkpointing)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-4)

    head = dict(kl_weight=0.0, iv_strength_start=0.0, teacher_iv_strength=2.0, head_mse_weight=100.0)
    plain = grads_after_one_step(tmp_path / "c", iv, data, lora(), **head)
    assert max(float(g.abs().max()) for g in plain.values()) > 1e-4
    if not reentrant:
        checkpointed = grads_after_one_step(tmp_path / "d", iv, data, lora(), **head, **checkpointing)
        for name in plain:
            torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-4)
        return
    with pytest.raises(InvalidInputError, match="use_reentrant"):  # from the config, at construction
        grads_after_one_step(tmp_path / "e", iv, data, lora(), **head, **checkpointing)
    model = lora()  # checkpointing switched on by hand: caught at the first forward
    model.gradient_checkpointing_enable({"use_reentrant": True})
    model.enable_input_require_grads()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(InvalidInputError, match="use_reentrant"):
        grads_after_one_step(tmp_path / "f", iv, data, model, **head)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_kl_is_added_in_compute_loss_so_a_custom_loss_keeps_it(tmp_path, iv, data):
    """IVGuidedTrainer adds the KL terms in compute_loss, not in a forward hook: the model's own
    forward returns its CE alone, and a compute_loss_func (or label smoothing), which makes the
    Trainer take the labels out of the batch before the forward, keeps the KL term."""

    def shifted_ce(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].flatten(0, 1).float()
        total = torch.nn.functional.cross_entropy(
            logits, labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        return total / (
            num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum()
        )

    no_student_iv = dict(iv_strength_start=0.0, iv_strength_end=0.0, teacher_iv_strength=2.0)
    runs = {}
    for name, kw in {
        "model's loss": {},
        "compute_loss_func": {"compute_loss_func": shifted_ce},
    }.items():
        trainer = IVGuidedTrainer(
            tiny_model("llama", seed=5),
            guided_config(tmp_path / name, **no_student_iv),
            instruction_vectors=iv,
            train_dataset=data,
            data_collator=collator(),
            **kw,
        )
        batch = collator()([data[i] for i in range(4)])
        trainer.model.train()
        plain = trainer.model(**batch).loss  # no hook adds anything to the forward
        assert trainer.compute_loss(trainer.model, dict(batch)) > plain
        trainer.train()
        runs[name] = trainer
    a, b = runs.values()
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    logs = [[e for e in t.state.log_history if "loss" in e] for t in (a, b)]
    assert [e["kl"] for e in logs[0]] == pytest.approx([e["kl"] for e in logs[1]])
    assert logs[0][-1]["kl"] > 0

    smoothed = IVGuidedTrainer(
        tiny_model("llama", seed=5),
        guided_config(tmp_path / "smoothed", label_smoothing_factor=0.1, **no_student_iv),
        instruction_vectors=iv,
        train_dataset=data,
        data_collator=collator(),
    )
    smoothed.train()
    assert [e for e in smoothed.state.log_history if "loss" in e][-1]["kl"] > 0


TRAINER_ORDER = [
    "model", "args", "data_collator", "train_dataset", "eval_dataset", "processing_class", "compute_loss_func",
    "compute_metrics", "callbacks", "optimizers", "optimizer_cls_and_kwargs", "preprocess_logits_for_metrics",
    "peft_config",
]  # fmt: skip


def test_the_trainers_take_trainers_arguments_in_its_order():
    """transformers.Trainer's arguments (model_init aside), in its order, then trl's peft_config:
    a positional call written for Trainer or SFTTrainer means the same here."""
    import inspect

    from trl import SFTTrainer

    from ivtrainer import FLearningTrainer, IVGuidedSFTTrainer

    def params(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    assert [p for p in params(Trainer) if p != "model_init"] == TRAINER_ORDER[:-1]
    assert params(IVGuidedTrainer) == [*TRAINER_ORDER, "instruction_vectors"]
    assert params(FLearningTrainer) == [*TRAINER_ORDER, "old_dataset", "old_adapter", "old_model"]
    sft = [p for p in params(SFTTrainer) if p != "quantization_config"]  # trl >= 1.x adds it
    assert params(IVGuidedSFTTrainer) == [*sft, "instruction_vectors"]


def test_a_model_by_name_and_peft_config_as_trl_takes_them(tmp_path, iv, tokenizer):
    """``model`` may be a folder (loaded with its tokenizer, the processing class) and
    ``peft_config`` wraps it: the same training as wrapping it yourself."""
    folder = tmp_path / "model"
    tiny_model("llama", seed=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rows = Dataset.from_list([{"prompt": f"Q: word {i}\nA:", "completion": f" w{i}"} for i in range(4)])
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    by_name = IVGuidedTrainer(
        str(folder),
        guided_config(tmp_path / "a"),
        train_dataset=rows,
        peft_config=lora,
        instruction_vectors=iv,
    )
    assert by_name.processing_class is not None and hasattr(by_name.model, "peft_config")
    by_name.train()
    from transformers import set_seed

    set_seed(0)  # guided_config's seed, as peft_config= seeds the adapter's initialisation
    wrapped = get_peft_model(tiny_model("llama", seed=4), LoraConfig(**lora.to_dict()))
    by_hand = IVGuidedTrainer(
        wrapped,
        guided_config(tmp_path / "b"),
        train_dataset=rows,
        processing_class=tokenizer,
        instruction_vectors=iv,
    )
    by_hand.train()
    for (name, p), q in zip(by_name.model.named_parameters(), by_hand.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match=r"peft_config must be a peft\.PeftConfig"):
        IVGuidedTrainer(
            tiny_model("llama"), guided_config(tmp_path), peft_config={"r": 4}, instruction_vectors=iv
        )
    with pytest.raises(ValueError, match="already a PeftModel and peft_config was given"):
        IVGuidedTrainer(wrapped, guided_config(tmp_path), peft_config=lora, instruction_vectors=iv)
