"""trl's SFTTrainer with the callbacks, and IVGuidedSFTTrainer."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import HfArgumentParser

from ivtrainer import IVGuidedConfig
from ivtrainer.callbacks import IVInterventionCallback, IVKLCallback
from ivtrainer.errors import InvalidInputError
from ivtrainer.testing import tiny_model


def test_sft_trainer_takes_the_intervention_and_refuses_kl_clearly(tmp_path, iv, tokenizer):
    """The intervention callback works in trl's SFTTrainer; the KL callback too where SFTTrainer
    returns logits, and where it computes the loss from a fused LM head without them, it says why
    it cannot."""
    from trl import SFTConfig, SFTTrainer
    from trl.trainer import sft_trainer as trl_sft

    rows = Dataset.from_list([{"prompt": f"Q: word {i}\nA:", "completion": f" w{i}"} for i in range(4)])

    def trainer(callbacks):
        args = SFTConfig(
            output_dir=str(tmp_path / "sft"),
            per_device_train_batch_size=2,
            max_steps=2,
            report_to="none",
            logging_steps=1,
            use_cpu=True,
            disable_tqdm=True,
            save_strategy="no",
        )
        return SFTTrainer(
            model=tiny_model("llama"),
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    sft = trainer([IVInterventionCallback(iv)])
    sft.train()
    assert [e["iv_strength"] for e in sft.state.log_history if "loss" in e] == [1.0, 0.0]
    kl = trainer([IVKLCallback(iv)])
    # which of the two behaviours is decided by the installed trl, before the run: since trl 1.16
    # SFTTrainer computes its loss from a fused LM head (no logits), before that it returned them
    if hasattr(trl_sft, "add_fused_lm_head"):
        with pytest.raises(ValueError, match="fused LM head"):
            kl.train()
    else:
        kl.train()
        kls = [e["kl"] for e in kl.state.log_history if "loss" in e]
        assert len(kls) == 2 and all(math.isfinite(v) and v >= 0 for v in kls)


@pytest.mark.parametrize(("teacher", "top_k"), [("live", "64"), ("precomputed", "64"), ("precomputed", "0")])
def test_iv_guided_sft_trainer(tmp_path, iv, tokenizer, teacher, top_k):
    from ivtrainer import IVGuidedSFTConfig, IVGuidedSFTTrainer

    rows = Dataset.from_list([{"prompt": f"Q: word {i}\nA:", "completion": f" w{i}"} for i in range(4)])
    (args,) = HfArgumentParser(IVGuidedSFTConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path / "sft"),
            "--per_device_train_batch_size",
            "2",
            "--max_steps",
            "2",
            "--report_to",
            "none",
            "--logging_steps",
            "1",
            "--use_cpu",
            "--save_strategy",
            "no",
            "--kl_positions",
            "answer",
            "--kl_weight",
            "2.0",
            "--kl_threshold",
            "0",
            "--head_mse_weight",
            "0",
            "--iv_strength_start",
            "1",
            "--completion_only_loss",
            "true",
            "--teacher",
            teacher,
            "--teacher_top_k",
            top_k,
        ]
    )
    trainer = IVGuidedSFTTrainer(
        tiny_model("llama"), args, instruction_vectors=iv, train_dataset=rows, processing_class=tokenizer
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["iv_strength"] for e in logs] == [1.0, 0.0] and all(e["kl_weight"] == 2.0 for e in logs)
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logs[1]["kl"] > 0
    assert logs[1]["loss"] == pytest.approx(logs[1]["ce"] + 2.0 * logs[1]["kl"], rel=1e-3)
    store = trainer.iv_callbacks[-1].guidance.store
    assert (store is not None) == (teacher == "precomputed")
    assert store is None or ("hidden" in store.parts[0]) == (top_k == "0")
    with pytest.raises(TypeError, match="needs an IVGuidedSFTConfig"):
        IVGuidedSFTTrainer(
            tiny_model("llama"), IVGuidedConfig("o"), instruction_vectors=iv, train_dataset=rows
        )


def _sft_args(tmp_path, name, **kw):
    from ivtrainer import IVGuidedSFTConfig

    values = dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=4,
        max_steps=1,
        report_to="none",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        completion_only_loss=True,
        kl_positions=["last_prompt", "answer", "all"],
        kl_weight=[1.0, 1.0, 1.0],
        kl_threshold=[0.0, 0.0, 0.0],
        head_mse_weight=0.0,
    )
    return IVGuidedSFTConfig(**(values | kw))


def test_packed_batches_keep_their_sequences_apart(tmp_path, iv, tokenizer):
    """trl's packing=True flattens the rows into one sequence with position_ids and no attention
    mask: the live teacher must see the same sequences apart (no KL at step 0 when the teacher is
    the model unchanged), and a packed batch's KL terms, the student IV included, equal the
    unpacked batch's (one last prompt token per packed sequence)."""
    from ivtrainer import IVGuidedSFTTrainer

    rows = Dataset.from_list(
        [{"prompt": f"Q: word {'x ' * i}{i}\nA:", "completion": f" w{i} z"} for i in range(4)]
    )

    def first_log(packing, **kw):
        trainer = IVGuidedSFTTrainer(
            tiny_model("llama", seed=1),
            _sft_args(tmp_path, f"p{packing}{len(kw)}", packing=packing, **kw),
            instruction_vectors=iv,
            train_dataset=rows,
            processing_class=tokenizer,
        )
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("position_ids" in batch and "attention_mask" not in batch) == packing
        assert batch["input_ids"].shape[0] == (1 if packing else 4)
        trainer.train()
        return next(e for e in trainer.state.log_history if "loss" in e)

    anchor = first_log(True, teacher_iv_strength=0.0, iv_strength_start=0.0)
    for key in ("kl_last_prompt", "kl_answer", "kl_all"):
        assert anchor[key] == pytest.approx(0.0, abs=1e-6), key
    guided = dict(
        teacher_iv_strength=20.0, iv_strength_start=1.0, iv_schedule="constant", iv_strength_end=1.0
    )
    packed, unpacked = first_log(True, **guided), first_log(False, **guided)
    for key in ("ce", "kl_last_prompt", "kl_answer", "kl_all"):
        assert packed[key] == pytest.approx(unpacked[key], rel=1e-3), key
    assert min(packed["kl_last_prompt"], packed["kl_all"]) > 1e-4


def _chats(n: int = 8) -> Dataset:
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"word {i}"},
                    {"role": "assistant", "content": f"w{i}"},
                ]
            }
            for i in range(n)
        ]
    )


def _first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def test_chats_train_on_their_assistant_turns_with_or_without_generation_markers(tmp_path, iv, tokenizer):
    """trl masks a template with {% generation %} markers; for one without (SmolLM2's, the tiny
    tokenizer's), IVGuidedSFTTrainer labels the turns itself. Same labels either way, and the same
    as IVGuidedTrainer's; the IV's place is the token before the answer."""
    from ivtrainer import IVGuidedConfig, IVGuidedSFTTrainer, IVGuidedTrainer
    from ivtrainer.steering.intervention import last_prompt_positions
    from ivtrainer.testing import tiny_tokenizer

    from ..datasets.test_formats import MARKED_CHATML

    marked = tiny_tokenizer()
    marked.chat_template = MARKED_CHATML
    batches = {}
    for name, tok in (("trl", marked), ("ivtrainer", tokenizer)):
        args = _sft_args(tmp_path, name, assistant_only_loss=True, completion_only_loss=None, bf16=False)
        trainer = IVGuidedSFTTrainer(
            tiny_model("llama"), args, train_dataset=_chats(), processing_class=tok, instruction_vectors=iv
        )
        assert trainer.args.assistant_only_loss  # the user's value, kept
        batches[name] = _first_batch(trainer)
    plain = IVGuidedTrainer(
        tiny_model("llama"), IVGuidedConfig(str(tmp_path / "plain"), per_device_train_batch_size=4, use_cpu=True, report_to="none"),
        train_dataset=_chats(), processing_class=tokenizer, instruction_vectors=iv,
    )  # fmt: skip
    batches["plain"] = _first_batch(plain)
    for name in ("ivtrainer", "plain"):
        for key in ("input_ids", "labels"):
            torch.testing.assert_close(batches[name][key], batches["trl"][key])
    labels, ids = batches["trl"]["labels"], batches["trl"]["input_ids"]
    for row in range(len(ids)):
        answer = [
            t for t, label in zip(ids[row].tolist(), labels[row].tolist(), strict=False) if label != -100
        ]
        assert tokenizer.decode(answer).endswith("<|im_end|>\n") and tokenizer.decode(answer).startswith("w")
    at = last_prompt_positions(labels)
    for row, col in at.nonzero().tolist():
        assert tokenizer.decode(ids[row, : col + 1]).endswith("<|im_start|>assistant\n")
    assert at.sum(-1).tolist() == [1] * len(ids)


def test_chats_labelled_throughout_leave_the_iv_no_place(tmp_path, iv, tokenizer):
    from ivtrainer import IVGuidedSFTTrainer

    args = _sft_args(tmp_path, "all", assistant_only_loss=False, completion_only_loss=None, bf16=False)
    with pytest.raises(
        InvalidInputError, match="assistant_only_loss=False\\) marks no answer, but the last_prompt KL"
    ):
        IVGuidedSFTTrainer(
            tiny_model("llama"),
            args,
            train_dataset=_chats(),
            processing_class=tokenizer,
            instruction_vectors=iv,
        )
    anchor = _sft_args(
        tmp_path,
        "all",
        assistant_only_loss=False,
        completion_only_loss=None,
        bf16=False,
        kl_positions=["all"],
        kl_weight=[1.0],
        kl_threshold=[0.0],
    )
    IVGuidedSFTTrainer(
        tiny_model("llama"),
        anchor,
        train_dataset=_chats(),
        processing_class=tokenizer,
        instruction_vectors=iv,
    )
