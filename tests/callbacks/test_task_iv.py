"""TaskIVCallback: the IV of the task just trained, captured on the trained model."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from ivtrainer.callbacks import TaskIVCallback
from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.own_task_iv import own_task_iv
from ivtrainer.steering.instruction_vector import InstructionVector
from ivtrainer.testing import tiny_model
from tests.utils import SMALL, collator

EXTRACTION = {k: v for k, v in SMALL.items() if k != "progress"} | {"progress": False}


def _args(tmp_path, **kw):
    values = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3, learning_rate=5e-2,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    return TrainingArguments(**(values | kw))


def test_the_iv_is_captured_on_the_trained_model_and_saved(tmp_path, data, tokenizer):
    """After training: <output_dir>/task_iv holds the IV of the training rows extracted on the
    trained model (equal to extracting it by hand then), not the model before training."""
    model = tiny_model("llama")
    before = own_task_iv(tiny_model("llama"), tokenizer, data, name="edits", **EXTRACTION)
    callback = TaskIVCallback("edits", **EXTRACTION)
    trainer = Trainer(
        model, _args(tmp_path), train_dataset=data, data_collator=collator(), processing_class=tokenizer,
        callbacks=[callback],
    )  # fmt: skip
    trainer.train()
    saved = InstructionVector.from_pretrained(tmp_path / "run" / "task_iv")
    after = own_task_iv(model, tokenizer, data, name="edits", **EXTRACTION)
    assert saved.task == "edits" and callback.instruction_vector is not None
    torch.testing.assert_close(saved.vector, after.vector)
    assert not torch.allclose(saved.vector, before.vector)  # trained: not the model it began as


def test_text_rows_given_and_bad_input_refused_before_training(tmp_path, data, tokenizer):
    rows = Dataset.from_list([{"prompt": f"Q: w{i}\nA:", "completion": f" x{i}"} for i in range(8)])
    trainer = Trainer(
        tiny_model("llama"), _args(tmp_path), train_dataset=data, data_collator=collator(),
        processing_class=tokenizer, callbacks=[TaskIVCallback("words", dataset=rows, **EXTRACTION)],
    )  # fmt: skip
    trainer.train()
    assert InstructionVector.from_pretrained(tmp_path / "run" / "task_iv").task == "words"
    with pytest.raises(InvalidInputError, match="task's name"):
        TaskIVCallback("")
    empty = Dataset.from_list([{"prompt": "", "completion": " x"}] * 4)
    trainer = Trainer(
        tiny_model("llama"), _args(tmp_path / "b"), train_dataset=data, data_collator=collator(),
        processing_class=tokenizer, callbacks=[TaskIVCallback("none", dataset=empty)],
    )  # fmt: skip
    with pytest.raises(InvalidInputError, match="0 usable"):
        trainer.train()
    assert not (tmp_path / "b" / "run" / "task_iv").exists()
    trainer = Trainer(
        tiny_model("llama"), _args(tmp_path / "c"), train_dataset=data, data_collator=collator(),
        callbacks=[TaskIVCallback("edits")],
    )  # fmt: skip
    with pytest.raises(InvalidInputError, match="needs the tokenizer"):
        trainer.train()
