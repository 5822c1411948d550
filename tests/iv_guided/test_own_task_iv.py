"""instruction_vectors="auto": the training data's own IV, extracted before training."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from ivtrainer import IVGuidedTrainer, extract_head_set, extract_instruction_vector
from ivtrainer.datasets.prompt_completion import encode_prompt_completion
from ivtrainer.datasets.tasks import load_task
from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.own_task_iv import training_pairs
from ivtrainer.testing import tiny_model
from tests.utils import guided_config

PAIRS = load_task("antonym")[:24]


def prompt_completion_rows() -> Dataset:
    return Dataset.from_list(
        [{"prompt": f"Q: {p['input']}\nA:", "completion": f" {p['output']}"} for p in PAIRS]
    )


def test_pairs_from_text_columns_and_from_tokenised_rows(tokenizer):
    rows = [{"prompt": p["input"], "completion": " " + p["output"]} for p in PAIRS[:3]]
    rows.append({"prompt": "empty answer", "completion": " "})  # skipped
    assert training_pairs(Dataset.from_list(rows)) == PAIRS[:3]
    assert training_pairs(Dataset.from_list(PAIRS[:3])) == PAIRS[:3]
    encoded = Dataset.from_list(
        [encode_prompt_completion(tokenizer, p["input"], " " + p["output"], add_eos=True) for p in PAIRS[:3]]
    )
    assert training_pairs(encoded, tokenizer) == PAIRS[:3]
    assert len(training_pairs(Dataset.from_list(PAIRS), limit=5)) == 5


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"text": "a"}], r"cannot find prompts and answers in the columns \['text'\]"),
        ([{"input_ids": [1, 2], "labels": [-100, 2]}], "needs processing_class"),
        ([], "needs a training dataset with rows"),
    ],
)
def test_data_without_pairs_is_refused(rows, match):
    with pytest.raises(ValueError, match=match):
        training_pairs(rows, None)


def test_the_trainer_extracts_the_training_datas_iv_before_training(tmp_path, tokenizer):
    rows = Dataset.from_list(
        [{"prompt": f"Q: {p['input']}\nA:", "completion": f" {p['output']}"} for p in PAIRS]
    )
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = IVGuidedTrainer(
        model,
        guided_config(tmp_path, max_steps=1, disable_tqdm=True),
        instruction_vectors="auto",
        train_dataset=rows,
        processing_class=tokenizer,
    )
    (iv,) = trainer.instruction_vectors
    expected = extract_instruction_vector(
        tiny_model("llama"), tokenizer, training_pairs(rows), seed=0, progress=False
    )
    assert iv.task == "training data" and iv.heads == expected.heads and iv.strength == expected.strength
    torch.testing.assert_close(iv.vector, expected.vector)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # extraction left it as it was
    trainer.train()
    saved = tmp_path / "run" / "instruction_vectors" / "kl" / "0" / "instruction_vector.json"
    assert saved.is_file() and '"training data"' in saved.read_text()
    trainer.create_model_card()
    assert "| 0 | training data |" in (tmp_path / "run" / "README.md").read_text()


def test_auto_from_a_saved_head_set(tmp_path, tokenizer):
    """``auto_iv_heads``: the IV is built from the saved set's best heads, not from its own
    mediation analysis: a set ranked upside down gives the heads an analysis would rank last."""
    model = tiny_model("llama")
    cheap = {"n_shots": 2, "n_mean_prompts": 6, "n_cie_prompts": 2, "progress": False}
    heads = extract_head_set(model, tokenizer, ["antonym", "uppercase"], **cheap)
    heads.cie, heads.task_cie = -heads.cie, -heads.task_cie
    heads.save_pretrained(tmp_path / "heads")
    trainer = IVGuidedTrainer(
        model,
        guided_config(tmp_path, max_steps=1, auto_iv_heads=str(tmp_path / "heads")),
        instruction_vectors="auto",
        train_dataset=prompt_completion_rows(),
        processing_class=tokenizer,
    )
    (iv,) = trainer.instruction_vectors
    assert (
        iv.settings["head_set"]["tasks"] == ["antonym", "uppercase"] and iv.settings["n_mean_prompts"] == 25
    )
    assert iv.heads == heads.top(len(iv.heads))
    exact = extract_instruction_vector(
        tiny_model("llama"), tokenizer, training_pairs(prompt_completion_rows(), tokenizer),
        n_heads=len(iv.heads), calibrate=False, seed=0, **cheap,
    )  # fmt: skip
    assert exact.heads != iv.heads  # what the trainer would have used without the set


def test_pairs_from_chats_and_the_iv_read_at_the_generation_prompt(tokenizer):
    """Each assistant turn of a chat is a pair (the user turn before it, the answer); system
    messages and chats without an answer give none; the IV's prompts wear the chat template."""
    from ivtrainer.iv_guided.own_task_iv import own_task_iv

    system = {"role": "system", "content": "be brief"}
    chats = [
        {"messages": [system, {"role": "user", "content": f"hot {i}"}, {"role": "assistant", "content": f"cold {i}"},
                      {"role": "user", "content": f"up {i}"}, {"role": "assistant", "content": f"down {i}"}]}
        for i in range(8)
    ]  # fmt: skip
    chats.append({"messages": [system, {"role": "user", "content": "no answer"}]})
    pairs = training_pairs(Dataset.from_list(chats))
    assert pairs[:2] == [{"input": "hot 0", "output": "cold 0"}, {"input": "up 0", "output": "down 0"}]
    assert len(pairs) == 16
    split = Dataset.from_list(
        [{"prompt": c["messages"][:2], "completion": c["messages"][2:3]} for c in chats[:8]]
    )
    assert training_pairs(split)[0] == {"input": "hot 0", "output": "cold 0"}
    iv = own_task_iv(
        tiny_model("llama"),
        tokenizer,
        Dataset.from_list(chats),
        n_heads=3,
        n_shots=2,
        n_mean_prompts=4,
        n_cie_prompts=2,
        calibrate=False,
        progress=False,
    )
    assert iv.settings["chat_template"] is True


def test_the_head_set_shipped_for_the_model_is_used_when_asked(tmp_path, tokenizer, monkeypatch):
    """``heads="shipped"`` takes the head set shipped for the model's checkpoint (matched by name
    and layout); the default (None, ``"exact"``) runs per-task CIE; another model has none."""
    from ivtrainer.iv_guided.own_task_iv import own_task_iv
    from ivtrainer.steering import head_set as head_set_module

    model = tiny_model("llama")
    model.config._name_or_path = "tiny/shipped"
    cheap = {"n_shots": 2, "n_mean_prompts": 6, "n_cie_prompts": 2, "progress": False}
    heads = extract_head_set(model, tokenizer, ["antonym", "uppercase"], **cheap)
    heads.cie, heads.task_cie = -heads.cie, -heads.task_cie  # ranked upside down: its heads show
    heads.save_pretrained(tmp_path / "shipped")
    monkeypatch.setattr(head_set_module, "SHIPPED", tmp_path / "shipped")
    data = prompt_completion_rows()
    shipped = own_task_iv(model, tokenizer, data, heads="shipped", calibrate=False, n_heads=3, **cheap)
    assert shipped.settings["head_set"]["tasks"] == ["antonym", "uppercase"] and shipped.heads == heads.top(3)
    for default in (None, "exact"):
        exact = own_task_iv(model, tokenizer, data, heads=default, calibrate=False, n_heads=3, **cheap)
        assert not exact.settings.get("head_set") and exact.heads != shipped.heads
    other = tiny_model("llama")  # another checkpoint's name
    assert head_set_module.shipped_head_set(other) is None
    assert head_set_module.shipped_head_set(tiny_model("qwen2")) is None
    with pytest.raises(InvalidInputError, match="ships a head set for the default model only"):
        own_task_iv(other, tokenizer, data, heads="shipped", calibrate=False, n_heads=3, **cheap)


@pytest.mark.real
def test_the_shipped_head_set_fits_the_default_model(default_model):
    from ivtrainer.steering.head_set import SHIPPED, shipped_head_set

    model, _ = default_model
    head_set = shipped_head_set(model)
    assert head_set is not None and head_set.tasks and (SHIPPED / "README.md").is_file()
    assert len(head_set.top(20)) == 20
