"""FLearningTrainer: the three phases, the variants, resume, the Hub and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

from ivtrainer import FLearningConfig, FLearningTrainer
from ivtrainer.arithmetic import subtract_model_delta
from ivtrainer.datasets.edits import edit_dataset
from ivtrainer.testing import intercept_hub_upload, peft_subtraction, tiny_edits, tiny_model


@pytest.fixture
def data(tokenizer):
    records = tiny_edits()
    return {
        "old": edit_dataset(records, tokenizer, "old"),
        "new": edit_dataset(records, tokenizer, "new"),
        "collator": DataCollatorForSeq2Seq(tokenizer, padding=True),
    }


def _config(tmp_path, **kw) -> FLearningConfig:
    values = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        num_train_epochs=1,
        old_num_train_epochs=1,
        learning_rate=1e-3,
        old_learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
    )
    return FLearningConfig(**(values | kw))


def _base_weights(model) -> dict[str, torch.Tensor]:
    """Base weights by their plain names, with or without LoRA layers injected."""
    return {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_bad_input_fails_before_any_work(tmp_path, data):
    model = tiny_model("llama")
    config = _config(tmp_path)
    for sources, match in [
        ({}, "got none"),
        ({"old_dataset": data["old"], "old_model": model}, r"got \['old_dataset', 'old_model'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            FLearningTrainer(model, config, train_dataset=data["new"], **sources)
    with pytest.raises(ValueError, match="pass train_dataset"):
        FLearningTrainer(model, config, old_dataset=data["old"])
    with pytest.raises(TypeError, match="needs an FLearningConfig"):
        FLearningTrainer(model, TrainingArguments("o"), train_dataset=data["new"], old_dataset=data["old"])
    peft = get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="learn_method='full' but model is a PeftModel"):
        FLearningTrainer(peft, config, train_dataset=data["new"], old_dataset=data["old"])
    with pytest.raises(ValueError, match="FT->LoRA"):
        FLearningTrainer(
            model, _config(tmp_path, learn_method="lora"), train_dataset=data["new"], old_dataset=data["old"]
        )
    assert not (tmp_path / "run").exists()


def test_ft_variant_equals_the_manual_route(tmp_path, data):
    """FT -> subtract -> FT, by hand with plain Trainers, gives the same weights."""
    config = _config(tmp_path, forget_lambda=0.7)
    model = tiny_model("llama", seed=5)
    trainer = FLearningTrainer(
        model, config, train_dataset=data["new"], old_dataset=data["old"], data_collator=data["collator"]
    )
    trainer.train()

    manual = tiny_model("llama", seed=5)
    theta = _params(manual)
    Trainer(
        manual, config.old_phase_arguments(), train_dataset=data["old"], data_collator=data["collator"]
    ).train()
    old = _params(manual)
    subtract_model_delta(manual, old, 0.7, base=theta)
    learn = _config(tmp_path, output_dir=str(tmp_path / "manual"))  # same learning-phase settings
    Trainer(manual, learn, train_dataset=data["new"], data_collator=data["collator"]).train()
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p, dict(manual.named_parameters())[name], rtol=0, atol=1e-6)

    saved = json.loads((tmp_path / "run" / "_forget" / "f_learning.json").read_text())
    assert saved == {"delta": "delta", "forget_method": "full", "complete": True}
    logs = trainer.state.log_history
    assert logs[0]["forget_lambda"] == 0.7 and "loss" in logs[0]


@pytest.mark.parametrize("learn", ["lora", "full"])
def test_lora_forget_subtracts_the_trained_adapter(tmp_path, data, learn):
    """LoRA and LoRA->FT: with a zero learning rate in the learning phase the result is exactly
    theta - lambda * delta_LoRA, the adapter saved under _forget/delta."""
    config = _config(tmp_path, forget_method="lora", learn_method=learn, forget_lambda=2.0, learning_rate=0.0)
    model = tiny_model("llama", seed=6)
    theta = _params(model)
    trainer = FLearningTrainer(
        model, config, train_dataset=data["new"], old_dataset=data["old"], data_collator=data["collator"]
    )
    trainer.train()
    delta_dir = tmp_path / "run" / "_forget" / "delta"
    assert (delta_dir / "adapter_config.json").is_file()

    expected = peft_subtraction(PeftModel.from_pretrained(tiny_model("llama", seed=6), delta_dir), 2.0)
    result = trainer.model.get_base_model() if learn == "lora" else trainer.model
    if learn == "lora":
        assert list(trainer.model.peft_config) == ["default"]  # the forget adapter is gone
        assert all(p.requires_grad == ("lora_" in n) for n, p in trainer.model.named_parameters())
    else:
        assert not isinstance(trainer.model, PeftModel)
        assert all(p.requires_grad for p in trainer.model.parameters())
    changed = 0
    mine = _base_weights(result)
    for name, p in expected.named_parameters():
        torch.testing.assert_close(mine[name], p, rtol=0, atol=1e-6)
        changed += not torch.equal(p, theta[name])
    assert changed > 0


def test_given_old_model_and_old_adapter_skip_the_old_phase(tmp_path, data):
    base = tiny_model("llama", seed=7)
    old = tiny_model("llama", seed=8)
    config = _config(tmp_path, forget_lambda=0.5, learning_rate=0.0)
    trainer = FLearningTrainer(
        base, config, train_dataset=data["new"], old_model=old, data_collator=data["collator"]
    )
    expected = {
        n: p - 0.5 * (dict(old.named_parameters())[n] - p)
        for n, p in _params(tiny_model("llama", seed=7)).items()
    }
    trainer.train()
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-6)
    assert not (tmp_path / "run" / "_forget").exists()

    folder = tmp_path / "adapter"
    peft = get_peft_model(
        tiny_model("llama", seed=7), LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM")
    )
    peft.save_pretrained(folder)
    config = _config(tmp_path, forget_lambda=1.0, learning_rate=0.0, learn_method="lora")
    trainer = FLearningTrainer(
        tiny_model("llama", seed=7),
        config,
        train_dataset=data["new"],
        old_adapter=folder,
        data_collator=data["collator"],
    )
    trainer.train()
    expected = peft_subtraction(peft, 1.0)
    mine = _base_weights(trainer.model.get_base_model())
    for name, p in expected.named_parameters():
        torch.testing.assert_close(mine[name], p, rtol=0, atol=1e-6)


class _Stop(TrainerCallback):
    """Raise once the given phase's training reaches ``step`` (simulates a crash)."""

    def __init__(self, phase_dir: str, step: int):
        self.phase_dir, self.step = phase_dir, step

    def on_step_end(self, args, state, control, **kwargs):
        if args.output_dir.endswith(self.phase_dir) and state.global_step == self.step:
            self.step = -1  # once: a resumed run goes on
            raise KeyboardInterrupt


@pytest.mark.parametrize("crash_in", ["forget", "run"])
def test_resume_after_a_crash_in_either_phase(tmp_path, data, crash_in):
    kw = dict(save_strategy="steps", save_steps=1, num_train_epochs=2, old_num_train_epochs=2)

    def trainer(out, callbacks=()):
        config = _config(tmp_path, output_dir=str(out), forget_lambda=0.5, **kw)
        return FLearningTrainer(
            tiny_model("llama", seed=9),
            config,
            train_dataset=data["new"],
            old_dataset=data["old"],
            data_collator=data["collator"],
            callbacks=list(callbacks),
        )

    whole = trainer(tmp_path / "whole")
    whole.train()
    crashed = trainer(tmp_path / "run", [_Stop(crash_in, 3)])
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    assert (tmp_path / "run" / "_forget" / "f_learning.json").is_file() == (crash_in == "run")
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, dict(whole.model.named_parameters())[name], rtol=0, atol=1e-5)


def test_push_to_hub_sends_the_model_and_a_card_with_variant_and_lambda(tmp_path, data, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    config = _config(tmp_path, forget_method="lora", forget_lambda=0.3, hub_model_id="me/updated")
    trainer = FLearningTrainer(
        tiny_model("llama"),
        config,
        train_dataset=data["new"],
        old_dataset=data["old"],
        data_collator=data["collator"],
    )
    trainer.train()
    with intercept_hub_upload("me/updated") as sent:
        trainer.push_to_hub()
    assert sent["repo_id"] == "me/updated" and {"model.safetensors", "config.json"} <= sent["files"]
    card = sent["card"]
    for text in (
        "F-Learning",
        "arXiv:2311.08011",
        "| variant | `LoRA->FT` |",
        "| lambda | 0.3 |",
        "train_loss",
        "lora fine-tuning on the old knowledge, 1 epochs",
    ):
        assert text in card, text


def test_push_without_a_token_fails_before_any_work(tmp_path, monkeypatch):
    from ivtrainer.hub.push import HubError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    args = FLearningConfig(
        output_dir=str(tmp_path / "run"), push_to_hub=True, hub_model_id="me/updated", use_cpu=True
    )
    with pytest.raises(HubError, match="no Hugging Face token"):
        FLearningTrainer(
            tiny_model("llama"), args, train_dataset=[{"input_ids": [1]}], old_model=tiny_model("llama")
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("crash_in", "forget_method"), [("_forget", "lora"), ("run", "lora"), ("_forget", "full")]
)
def test_train_again_on_the_same_trainer_resumes_exactly(tmp_path, data, crash_in, forget_method):
    """A notebook's resume: the same trainer's train() called again after a crash. The delta is
    subtracted once, and an interrupted old phase leaves the model as it was (no 'forget' adapter
    left behind, no half-trained weights taken as the base)."""
    kw = dict(save_strategy="steps", save_steps=1, num_train_epochs=2, old_num_train_epochs=2)
    kw |= dict(forget_method=forget_method, learn_method="lora", forget_lambda=0.5)

    def trainer(out, callbacks=()):
        return FLearningTrainer(
            tiny_model("llama", seed=9),
            _config(tmp_path, output_dir=str(out), **kw),
            train_dataset=data["new"],
            old_dataset=data["old"],
            data_collator=data["collator"],
            callbacks=list(callbacks),
        )

    if forget_method == "full":  # FT->LoRA is refused with old_dataset: learn fully instead
        kw["learn_method"] = "full"
    whole = trainer(tmp_path / "whole")
    whole.train()
    same = trainer(tmp_path / "run", [_Stop(crash_in, 3)])
    with pytest.raises(KeyboardInterrupt):
        same.train()
    same.train(resume_from_checkpoint=True)
    expected = dict(whole.model.named_parameters())
    for name, p in same.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=1e-5)
    assert sum("forget_lambda" in log for log in same.state.log_history) == 1


def test_subtracted_delta_is_logged_and_the_lora_old_phase_does_something(tmp_path, data):
    """The default LoRA old phase changes the weights measurably, and the log says by how much."""
    config = _config(tmp_path, forget_method="lora", old_learning_rate=None, forget_lambda=1.0)
    assert config.old_learning_rate == 1e-3
    trainer = FLearningTrainer(
        tiny_model("llama"),
        config,
        train_dataset=data["new"],
        old_dataset=data["old"],
        data_collator=data["collator"],
    )
    trainer.train()
    (log,) = [log for log in trainer.state.log_history if "forget_relative_delta" in log]
    assert log["forget_delta_norm"] > 0 and 1e-3 < log["forget_relative_delta"] < 1  # above the warning


def test_push_never_uploads_the_old_phase_or_the_token(tmp_path, data, monkeypatch):
    token = "hf_secret_token_for_the_test"
    monkeypatch.setenv("HF_TOKEN", token)
    config = _config(
        tmp_path,
        forget_method="lora",
        hub_model_id="me/updated",
        hub_token=token,
        save_strategy="steps",
        save_steps=2,
    )
    trainer = FLearningTrainer(
        tiny_model("llama"),
        config,
        train_dataset=data["new"],
        old_dataset=data["old"],
        data_collator=data["collator"],
    )
    trainer.train()
    run = tmp_path / "run"
    assert list((run / "_forget").glob("checkpoint-*/training_args.bin")), "the old phase saved checkpoints"
    with intercept_hub_upload("me/updated") as sent:
        trainer.push_to_hub()
    assert "model.safetensors" in sent["files"]
    assert not [f for f in sent["files"] if f.startswith(("_forget", "forget", "checkpoint-"))], sent["files"]
    leaked = [f for f in sent["files"] if token.encode() in (run / f).read_bytes()]
    assert not leaked, f"the Hub token is in {leaked}"
    old_args = [p for p in run.rglob("training_args.bin") if token.encode() in p.read_bytes()]
    assert not old_args, f"the Hub token is pickled in {old_args}"


def test_a_model_by_name_and_the_learning_phases_peft_config(tmp_path, data, tokenizer):
    """``model`` may be a folder (its tokenizer becomes the processing class); ``peft_config`` is
    the learning phase's adapter (learn_method='lora'), refused with learn_method='full'."""
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(
        ValueError, match="peft_config is the learning phase's adapter, but learn_method is 'full'"
    ):
        FLearningTrainer(
            str(folder),
            _config(tmp_path),
            train_dataset=data["new"],
            old_dataset=data["old"],
            peft_config=lora,
        )
    trainer = FLearningTrainer(
        str(folder),
        _config(tmp_path, forget_method="lora", learn_method="lora"),
        data["collator"],
        data["new"],
        old_dataset=data["old"],
        peft_config=lora,
    )
    assert trainer.processing_class is not None
    assert trainer.model.peft_config["default"].r == 2
    assert trainer.model.peft_config["default"].target_modules == {"q_proj"}
    trainer.train()
    assert trainer.state.global_step > 0
