"""ForgettingMonitorCallback: the KL from the model before training, on a fixed sample of its rows."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from ivtrainer.callbacks import ForgettingMonitorCallback, IVInterventionCallback
from ivtrainer.callbacks.forgetting_monitor import REFERENCE, answer_log_probs
from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.kl_loss import token_kl
from ivtrainer.testing import tiny_model
from tests.utils import collator, guided_config


def _args(tmp_path, **kw) -> TrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    return TrainingArguments(**(values | kw))


class _Seen(TrainerCallback):
    """What a report_to integration would get: every dict passed to Trainer.log."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_the_logged_kl_is_the_kl_from_the_model_before_training(tmp_path, data):
    """Every `every` steps and at the end, through Trainer.log (report_to sees it); the last value
    equals the KL computed by hand between a copy of the model before training and the trained one,
    on the rows the callback sampled."""
    model = tiny_model("llama")
    before = copy.deepcopy(model).eval()
    seen = _Seen()
    trainer = Trainer(model, _args(tmp_path, max_steps=5), train_dataset=data, data_collator=collator())
    monitor = ForgettingMonitorCallback(n_rows=6, every=2, trainer=trainer)
    trainer.add_callback(monitor)
    trainer.add_callback(seen)
    trainer.train()
    assert [h["step"] for h in monitor.history] == [2, 4, 5]
    forward = [h["kl_forward"] for h in monitor.history]
    assert all(v > 1e-4 for v in forward) and forward[-1] > forward[0]
    assert [e["forgetting/kl_forward"] for e in seen.logs if "forgetting/kl_forward" in e] == forward
    # by hand, on the same rows: the monitor's fixed batches
    model.eval()
    now = torch.cat([answer_log_probs(model, b) for b in monitor._batches])
    ref = torch.cat([answer_log_probs(before, b) for b in monitor._batches])
    assert now.shape[0] == sum(int((b["labels"][:, 1:] != -100).sum()) for b in monitor._batches)
    assert monitor.history[-1]["kl_forward"] == pytest.approx(
        token_kl(now, ref, "forward").mean().item(), rel=1e-5
    )
    assert monitor.history[-1]["kl_reverse"] == pytest.approx(
        token_kl(now, ref, "reverse").mean().item(), rel=1e-5
    )
    assert (tmp_path / "run" / REFERENCE).is_file()


def test_an_unchanged_model_measures_zero_and_the_training_iv_is_not_measured(tmp_path, data, iv):
    """Learning rate 0 with the student IV on in training: the model itself has not moved, and the
    monitor (eval mode) sees the model, not the intervention."""
    trainer = Trainer(
        tiny_model("llama"), _args(tmp_path, learning_rate=0.0), train_dataset=data, data_collator=collator(),
        callbacks=[IVInterventionCallback(iv, {"start": 1.0, "end": 1.0})],
    )  # fmt: skip
    monitor = ForgettingMonitorCallback(n_rows=4, every=1)
    trainer.add_callback(monitor)
    trainer.train()
    assert len(monitor.history) == 3
    assert all(h["kl_forward"] == 0.0 and h["kl_reverse"] == 0.0 for h in monitor.history)
    # without a trainer the values still reach the log history
    assert [
        e["forgetting/kl_forward"] for e in trainer.state.log_history if "forgetting/kl_forward" in e
    ] == [0.0] * 3


def test_iv_guided_trainer_and_sft_trainer(tmp_path, data, iv, tokenizer):
    """The same callback on IVGuidedTrainer and on trl's SFTTrainer (its own collator's labels)."""
    from trl import SFTConfig, SFTTrainer

    from ivtrainer import IVGuidedTrainer

    def guided(**kw):
        trainer = IVGuidedTrainer(
            tiny_model("llama"), guided_config(tmp_path, max_steps=2, **kw), instruction_vectors=iv,
            train_dataset=data, data_collator=collator(),
        )  # fmt: skip
        trainer.train()
        return [e for e in trainer.state.log_history if "forgetting/kl_forward" in e]

    # on by default in ivtrainer's trainers (at the end of a run shorter than the interval)
    logged = guided()
    assert len(logged) == 1 and logged[0]["step"] == 2 and logged[0]["forgetting/kl_forward"] > 0
    logged = guided(forgetting_monitor_every=1, forgetting_monitor_rows=4)
    assert [e["step"] for e in logged] == [1, 2]
    assert guided(forgetting_monitor_every=0) == []
    rows = Dataset.from_list([{"prompt": f"Q: word {i}\nA:", "completion": f" w{i} x{i}"} for i in range(8)])
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        report_to="none", logging_steps=1, use_cpu=True, disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    sft = SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=rows, processing_class=tokenizer)
    monitor = ForgettingMonitorCallback(n_rows=8, every=1, trainer=sft)
    sft.add_callback(monitor)
    sft.train()
    assert [h["step"] for h in monitor.history] == [1, 2] and monitor.history[-1]["kl_forward"] > 0
    # only the completions are measured: SFTTrainer's completion-only labels
    reference = monitor._reference_log_probs()
    assert (
        0 < sum(r.shape[0] for r in reference) < sum(int(b["attention_mask"].sum()) for b in monitor._batches)
    )
    # read back from its file at each measurement, not held through training
    assert monitor._reference == tmp_path / "sft" / "_forgetting_monitor_reference.safetensors"


def test_a_resumed_run_measures_from_the_model_it_began_with(tmp_path, data):
    """Killed after a checkpoint and resumed: the same values as one uninterrupted run."""

    def run(max_steps, resume=None):
        model = tiny_model("llama")
        args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = Trainer(model, args, train_dataset=data, data_collator=collator())
        monitor = ForgettingMonitorCallback(n_rows=4, every=1)
        trainer.add_callback(monitor)
        if max_steps < 4:  # stop early, as a killed run would
            trainer.add_callback(_StopAt(max_steps))
        trainer.train(resume_from_checkpoint=resume)
        return monitor.history

    whole = run(4)
    run(2)
    resumed = run(4, resume=str(tmp_path / "run" / "checkpoint-2"))
    assert [h["step"] for h in resumed] == [3, 4]
    assert [h["kl_forward"] for h in resumed] == pytest.approx([h["kl_forward"] for h in whole[2:]], rel=1e-5)
    (tmp_path / "run" / REFERENCE).unlink()  # without the reference: said, and no values
    assert run(4, resume=str(tmp_path / "run" / "checkpoint-2")) == []


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.parametrize(
    ("kw", "match"), [({"n_rows": 0}, "n_rows"), ({"every": -1}, "every"), ({"every": 1.5}, "every")]
)
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(InvalidInputError, match=match):
        ForgettingMonitorCallback(**kw)


def test_rows_without_labels_are_refused_before_training(tmp_path, tokenizer):
    rows = Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]} for _ in range(4)])
    trainer = Trainer(tiny_model("llama"), _args(tmp_path), train_dataset=rows, data_collator=collator())
    trainer.add_callback(ForgettingMonitorCallback(n_rows=2))
    with pytest.raises(InvalidInputError, match="no label tokens"):
        trainer.train()
