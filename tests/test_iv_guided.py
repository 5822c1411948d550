"""IV-guided training: schedules, the KL term, the callbacks on a plain Trainer, IVGuidedTrainer."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from ivtrainer.callbacks import IVInterventionCallback, IVKLCallback
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from ivtrainer import IVGuidedConfig, IVGuidedTrainer, extract_instruction_vector
from ivtrainer.datasets.edits import edit_dataset
from ivtrainer.iv_guided.iv_guided_trainer import iv_guided_callbacks
from ivtrainer.iv_guided.kl_loss import kl_positions, kl_term, token_kl
from ivtrainer.iv_guided.schedules import Schedule
from ivtrainer.steering.instruction_vector import IncompatibleVectorError
from ivtrainer.testing import intercept_hub_upload, tiny_edits, tiny_model

SMALL = {"n_heads": 3, "n_shots": 2, "n_mean_prompts": 6, "n_cie_prompts": 2, "progress": False}


@pytest.fixture(scope="module")
def iv(tokenizer):
    return extract_instruction_vector(tiny_model("llama"), tokenizer, "antonym", **SMALL)


@pytest.fixture(scope="module")
def data(tokenizer):
    return edit_dataset(tiny_edits(8), tokenizer, "new")


def _config(tmp_path, **kw) -> IVGuidedConfig:
    values = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    return IVGuidedConfig(**(values | kw))


# -- schedules ------------------------------------------------------------------------------------


def test_schedules():
    total = 100
    assert [Schedule("linear", 1, 0, 0.5)(s, total) for s in (0, 25, 50, 99)] == [1.0, 0.5, 0.0, 0.0]
    assert Schedule("cosine", 1, 0, 1)(50, total) == pytest.approx(0.5)
    assert Schedule("cosine", 2, 1, 1)(0, total) == 2.0
    assert [Schedule("step", 1, 0.2, 0.3)(s, total) for s in (0, 29, 30)] == [1.0, 1.0, 0.2]
    assert Schedule("constant", 0.7, 0.0)(99, total) == 0.7
    exp = [Schedule("exponential", 1, 0, 1)(s, total) for s in range(0, 101, 10)]
    assert exp[0] == pytest.approx(1.0) and exp[-1] == 0.0 and all(a > b for a, b in itertools.pairwise(exp))
    assert exp[1] < 0.65  # fast early decay
    assert Schedule("linear", 1, 0, 0.0)(0, total) == 0.0  # an empty window: `end` from the start
    for kwargs in ({"fraction": 1.5}, {"fraction": -0.1}, {"start": math.nan}, {"kind": "warmup"}):
        with pytest.raises(ValueError):
            Schedule(**kwargs)


# -- the KL term ----------------------------------------------------------------------------------


def test_token_kl_matches_torch():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    ref_reverse = F.kl_div(F.log_softmax(t / 2, -1), F.softmax(s / 2, -1), reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(s, t, "reverse", 2.0), ref_reverse)
    ref_forward = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(s, t, "forward"), ref_forward)
    torch.testing.assert_close(token_kl(s, t, "jsd"), token_kl(t, s, "jsd"))
    assert token_kl(s, s, "reverse").abs().max() < 1e-6
    assert (token_kl(s, t, "jsd") <= math.log(2) + 1e-6).all()


def test_kl_positions_and_normalisation():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 4]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert kl_positions("last_prompt", labels).nonzero().tolist() == [[0, 1], [1, 0]]
    assert kl_positions("answer", labels).nonzero().tolist() == [
        [0, 1],
        [0, 2],
        [1, 0],
        [1, 1],
        [1, 2],
        [1, 3],
    ]
    assert kl_positions("all", labels, attention).sum() == 9
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = kl_positions("answer", labels)
    per = token_kl(s[mask], t[mask])
    torch.testing.assert_close(kl_term(s, t, mask, num_items_in_batch=12), per.sum() / 12)
    torch.testing.assert_close(kl_term(s, t, mask), per.mean())
    assert kl_term(s, t, torch.zeros_like(mask)) is None
    assert kl_term(s, t, mask, threshold=1e9) == 0
    s.requires_grad_()
    (kl_term(s, t, mask, threshold=1e9) + s.sum()).backward()  # below the threshold: no gradient
    assert (s.grad == 1).all()


@pytest.mark.parametrize("direction", ["reverse", "forward", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("selection", ["all", "some"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_fused_kl_gradient_equals_autograd(direction, dtype, selection, overwrite, monkeypatch):
    """kl_term's closed-form, chunked gradient = autograd through token_kl (chunks of 3 positions)."""
    monkeypatch.setattr("ivtrainer.iv_guided.kl_loss._CHUNK_ELEMENTS", {"cpu": 3 * 50})
    torch.manual_seed(0)
    s = (torch.randn(3, 7, 50) * 3).to(dtype).requires_grad_()
    t = (torch.randn(3, 7, 50) * 3).to(dtype)
    mask = torch.ones(3, 7, dtype=torch.bool) if selection == "all" else torch.rand(3, 7) > 0.5
    value = kl_term(
        s,
        t.clone(),
        mask,
        direction=direction,
        temperature=2.0,
        num_items_in_batch=11,
        overwrite_teacher=overwrite,
    )
    (1.7 * value).backward()
    fused = s.grad
    s.grad = None
    reference = token_kl(s[mask], t[mask], direction, 2.0).sum() / 11
    (1.7 * reference).backward()
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(value.float(), reference.float(), **tol)
    torch.testing.assert_close(fused, s.grad, **tol)
    assert fused.dtype == dtype and not fused[~mask].any()


def test_kl_with_teacher_logits_at_some_columns_only():
    """A teacher run with logits_to_keep=columns gives the same KL and gradient."""
    torch.manual_seed(0)
    s, t = torch.randn(3, 7, 11, requires_grad=True), torch.randn(3, 7, 11)
    labels = torch.tensor([[-100] * 4 + [1, 2, 3], [-100] * 2 + [1] * 5, [-100] * 6 + [4]])
    for which in ("answer", "last_prompt"):
        mask = kl_positions(which, labels)
        columns = mask.any(0).nonzero().squeeze(1)
        full = kl_term(s, t, mask, num_items_in_batch=9)
        (full_grad,) = torch.autograd.grad(full, s)
        part = kl_term(s, t[:, columns], mask, num_items_in_batch=9, teacher_columns=columns)
        (part_grad,) = torch.autograd.grad(part, s)
        torch.testing.assert_close(part, full)
        torch.testing.assert_close(part_grad, full_grad)
    with pytest.raises(ValueError, match="teacher_columns must include"):
        kl_term(s, t[:, :1], kl_positions("answer", labels), teacher_columns=torch.tensor([0]))


def test_fused_kl_rejects_a_second_backward():
    s = torch.randn(2, 3, 5, requires_grad=True)
    value = kl_term(s, torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.bool))
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        value.backward()


# -- training -------------------------------------------------------------------------------------


def _grads_after_one_step(tmp_path, iv, data, model, **kw):
    """Parameters after one SGD step of lr 1: minus the gradient."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = _config(
        tmp_path, optim="sgd", learning_rate=1.0, max_steps=1, lr_scheduler_type="constant", **kw
    )
    trainer = IVGuidedTrainer(
        model,
        config,
        instruction_vectors=iv,
        train_dataset=data.select(range(4)),
        data_collator=_collator(),
    )
    trainer.train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if n in before}


def _collator():
    from ivtrainer.testing import tiny_tokenizer

    return DataCollatorForSeq2Seq(tiny_tokenizer(), padding=True)


@pytest.mark.parametrize("peft", [False, True])
@pytest.mark.parametrize("positions", ["all", "answer", "last_prompt"])
def test_gradient_accumulation_equals_one_large_batch(tmp_path, iv, data, peft, positions):
    def model():
        m = tiny_model("llama", seed=1)
        if peft:
            m = get_peft_model(m, LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM"))
        return m

    kw = dict(kl_positions=positions, kl_weight=3.0, teacher_iv_strength=2.0, head_mse_weight=0.5)
    one = _grads_after_one_step(tmp_path / "a", iv, data, model(), per_device_train_batch_size=4, **kw)
    two = _grads_after_one_step(
        tmp_path / "b", iv, data, model(), per_device_train_batch_size=2, gradient_accumulation_steps=2, **kw
    )
    assert any(g.abs().max() > 0 for g in one.values())
    for name, grad in one.items():
        torch.testing.assert_close(two[name], grad, rtol=1e-4, atol=1e-6)


def test_kl_changes_the_gradient_and_zero_weights_give_plain_training(tmp_path, iv, data):
    plain = _grads_after_one_step(
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
        data_collator=_collator(),
    ).train()
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), plain[name], rtol=1e-5, atol=1e-7)
    guided = _grads_after_one_step(
        tmp_path / "g", iv, data, tiny_model("llama", seed=2), kl_weight=5.0, teacher_iv_strength=4.0
    )
    assert max((guided[n] - plain[n]).abs().max() for n in plain) > 1e-4


def test_callbacks_on_a_plain_trainer_equal_ivguidedtrainer(tmp_path, iv, data):
    config = _config(tmp_path)
    guided = IVGuidedTrainer(
        tiny_model("llama", seed=3),
        config,
        instruction_vectors=iv,
        train_dataset=data,
        data_collator=_collator(),
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
        data_collator=_collator(),
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
            seen["reference"] = trainer.iv_callbacks[1]._reference

    trainer = IVGuidedTrainer(
        model,
        _config(tmp_path),
        instruction_vectors=iv,
        train_dataset=data,
        callbacks=[Spy()],
        data_collator=_collator(),
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
        config = _config(
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
            data_collator=_collator(),
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
        _config(tmp_path),
        instruction_vectors=iv,
        train_dataset=rows,
        processing_class=tokenizer,
    )
    assert set(trainer.train_dataset.column_names) == {"input_ids", "attention_mask", "labels"}
    trainer.train()
    assert "kl" in trainer.state.log_history[0]


def test_config_from_the_command_line():
    (config,) = HfArgumentParser(IVGuidedConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            "o",
            "--instruction_vectors",
            "a",
            "b",
            "--iv_schedule",
            "exponential",
            "--kl_direction",
            "jsd",
            "--kl_weight",
            "0.5",
            "--kl_weight_end",
            "0",
            "--report_to",
            "none",
        ]
    )
    assert config.instruction_vectors == ["a", "b"] and config.iv_schedule_obj().kind == "exponential"
    assert config.kl_schedule_obj() == Schedule("constant", 0.5, 0.0, 1.0)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"iv_schedule_fraction": 1.5}, "fraction must be in"),
        ({"kl_schedule_fraction": -0.5}, "fraction must be in"),
        ({"kl_weight": -1.0}, "must be >= 0"),
        ({"iv_strength_start": math.inf}, "finite"),
        ({"kl_temperature": 0.0}, "kl_temperature must be > 0"),
        ({"kl_positions": "prompt"}, "kl_positions must be one of"),
        ({"iv_schedule": "warmup"}, "schedule must be one of"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        IVGuidedConfig(output_dir="o", **kw)


def test_trainer_bad_input_fails_at_construction(tmp_path, iv, data, tokenizer):
    with pytest.raises(ValueError, match="no instruction vector given"):
        IVGuidedTrainer(tiny_model("llama"), _config(tmp_path), train_dataset=data)
    wide = tiny_model("llama", hidden_size=96, num_attention_heads=4)
    with pytest.raises(IncompatibleVectorError, match="hidden size"):
        IVGuidedTrainer(wide, _config(tmp_path), instruction_vectors=iv, train_dataset=data)
    no_labels = data.remove_columns("labels")
    with pytest.raises(ValueError, match="have no labels"):
        IVGuidedTrainer(
            tiny_model("llama"),
            _config(tmp_path),
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


def test_sft_trainer_takes_the_intervention_and_refuses_kl_clearly(tmp_path, iv, tokenizer):
    """The intervention callback works in trl's SFTTrainer; the KL callback too where SFTTrainer
    returns logits, and where it computes the loss from a fused LM head without them, it says why
    it cannot."""
    from trl import SFTConfig, SFTTrainer

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
    try:
        kl.train()
    except ValueError as exc:  # trl whose SFTTrainer computes the loss from a fused LM head (1.16)
        assert "fused LM head" in str(exc)
    else:  # trl whose SFTTrainer still returns logits (1.0): the KL is added
        kls = [e["kl"] for e in kl.state.log_history if "loss" in e]
        assert len(kls) == 2 and all(math.isfinite(v) and v >= 0 for v in kls)


def test_iv_guided_sft_trainer(tmp_path, iv, tokenizer):
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
            "--completion_only_loss",
            "true",
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
    with pytest.raises(TypeError, match="needs an IVGuidedSFTConfig"):
        IVGuidedSFTTrainer(
            tiny_model("llama"), IVGuidedConfig("o"), instruction_vectors=iv, train_dataset=rows
        )


def test_push_to_hub_sends_weights_vectors_and_an_honest_card(tmp_path, iv, data, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, task_type="CAUSAL_LM"))
    config = _config(tmp_path, hub_model_id="someone/iv-guided-tiny", iv_schedule="cosine", kl_weight=0.5)
    trainer = IVGuidedTrainer(
        model,
        config,
        instruction_vectors=iv,
        train_dataset=data,
        data_collator=_collator(),
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
    assert "0.5" in card.split("KL weight")[1].splitlines()[0]


def test_push_without_a_token_fails_before_any_work(tmp_path, iv, data, monkeypatch):
    from unittest import mock

    from ivtrainer.hub.push import HubError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(HubError, match="no Hugging Face token"):
        IVGuidedTrainer(
            tiny_model("llama"),
            _config(tmp_path, push_to_hub=True),
            instruction_vectors=iv,
            train_dataset=data,
        )
    assert not (tmp_path / "run").exists()
    trainer = IVGuidedTrainer(
        tiny_model("llama"), _config(tmp_path), instruction_vectors=iv, train_dataset=data
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
    without = _grads_after_one_step(tmp_path / "a", iv, data, lora(), head_mse_weight=0.0, **kw)
    with_mse = _grads_after_one_step(tmp_path / "b", iv, data, lora(), head_mse_weight=100.0, **kw)
    assert max((with_mse[n] - without[n]).abs().max() for n in without) > 1e-4
    trainer = IVGuidedTrainer(
        lora(),
        _config(tmp_path / "c", max_steps=1, head_mse_weight=1.0, **kw),
        instruction_vectors=iv,
        train_dataset=data.select(range(4)),
        data_collator=_collator(),
    )
    trainer.train()
    assert next(log["head_mse"] for log in trainer.state.log_history if "head_mse" in log) > 0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_vectors_and_weights_are_refused_before_training(tmp_path, iv, data, bad):
    import dataclasses

    from ivtrainer.steering.instruction_vector import InvalidVectorError

    vector = iv.vector.clone()
    vector[0] = bad
    with pytest.raises(InvalidVectorError, match="non-finite"):
        dataclasses.replace(iv, vector=vector)
    with pytest.raises(ValueError, match=r"iv_weights\[0\] must be a finite number"):
        _config(tmp_path, iv_weights=[bad])
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
            _config(tmp_path, label_smoothing_factor=0.1),
            instruction_vectors=iv,
            train_dataset=data,
            data_collator=_collator(),
        )
    with pytest.raises(ValueError, match="compute_loss_func makes the Trainer remove the labels"):
        IVGuidedTrainer(
            tiny_model("llama"),
            _config(tmp_path),
            instruction_vectors=iv,
            train_dataset=data,
            data_collator=_collator(),
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
        )
    args = TrainingArguments(
        str(tmp_path / "t"), label_smoothing_factor=0.1, max_steps=1, report_to="none", use_cpu=True
    )
    trainer = Trainer(
        tiny_model("llama"), args, train_dataset=data, data_collator=_collator(), callbacks=[IVKLCallback(iv)]
    )
    with pytest.raises(ValueError, match="label_smoothing_factor > 0"):
        trainer.train()


def test_last_prompt_fallback_in_training_is_reported(tmp_path, iv, data, caplog):
    """A training forward without labels cannot find the last prompt token: said once, not silent."""
    from transformers.utils import logging as hf_logging

    model = tiny_model("llama")
    batch = _collator()([data[i] for i in range(2)])
    hf_logging.enable_propagation()
    try:
        with iv.apply(model, positions="last_prompt"), caplog.at_level("WARNING"):
            model.train()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        hf_logging.disable_propagation()
    warnings = [r for r in caplog.records if "need the batch's labels" in r.getMessage()]
    assert len(warnings) == 1


def test_model_as_its_own_teacher_and_fsdp_are_refused(tmp_path, iv, data):
    model = tiny_model("llama")
    args = TrainingArguments(str(tmp_path / "t"), max_steps=1, report_to="none", use_cpu=True)
    for teacher in (model, get_peft_model(model, LoraConfig(r=2, task_type="CAUSAL_LM")).get_base_model()):
        with pytest.raises(ValueError, match="teacher= is the model being trained"):
            Trainer(
                model,
                args,
                train_dataset=data,
                data_collator=_collator(),
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
    Trainer(tiny_model("llama"), args, train_dataset=data, data_collator=_collator(), callbacks=[callback])
    copy = weakref.ref(callback.reference)
    assert copy() is not None
    callback.release()
    gc.collect()
    assert copy() is None
