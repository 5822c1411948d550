"""Calibration: the shared-prefix scorer equals plain forwards, the choice is the best searched
setting, the strength travels with the vector, and too few pairs are refused."""

from __future__ import annotations

import dataclasses
import logging
import random

import pytest
import torch

from ivtrainer import extract_instruction_vector
from ivtrainer.callbacks import IVInterventionCallback
from ivtrainer.datasets.tasks import load_task
from ivtrainer.modeling.architectures import get_layout
from ivtrainer.steering.calibration import ZeroShotScorer
from ivtrainer.steering.icl import EncodedPrompt, PromptBuilder, last_token_forward
from ivtrainer.steering.intervention import add_to_residual
from ivtrainer.testing import tiny_model

CHEAP = {
    "n_shots": 2,
    "n_mean_prompts": 6,
    "n_cie_prompts": 2,
    "n_calibration_prompts": 12,
    "progress": False,
}


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_tree_scorer_equals_plain_forwards(model_type, tokenizer):
    """Each setting's hits from the tree step equal those of a plain forward with the vector added:
    the answers are set to what the plain route predicts under one setting, so that setting must
    get every prompt right and the others exactly what the plain route says."""
    model = tiny_model(model_type, seed=3).eval()
    layout = get_layout(model)
    builder = PromptBuilder(tokenizer)
    prompts = [builder.encode([], q) for q in load_task("antonym", "extraction")[:6]]
    gen = torch.Generator().manual_seed(0)
    settings = [(layer, 3.0 * torch.randn(layout.hidden_size, generator=gen)) for layer in (0, 1, 2, 1)]

    def plain_predictions(setting):
        with add_to_residual(model, [setting]):
            return last_token_forward(model, prompts).argmax(-1).tolist()

    for target in range(len(settings)):
        answers = plain_predictions(settings[target])
        labelled = [EncodedPrompt(p.input_ids, a) for p, a in zip(prompts, answers, strict=True)]
        expected = [sum(x == a for x, a in zip(plain_predictions(s), answers, strict=True)) for s in settings]
        scorer = ZeroShotScorer(model, layout, labelled, chunk=3)  # chunks of 3: two tree steps
        assert scorer._tree
        assert scorer.hits(settings) == expected and expected[target] == len(prompts)
        assert scorer._tree  # no fallback was needed
        scorer._tree = False  # the fallback (batched plain forwards) counts the same
        assert scorer.hits(settings) == expected


def test_calibration_picks_the_best_searched_setting_and_stores_the_strength(tokenizer):
    model = tiny_model("llama", seed=1)
    iv = extract_instruction_vector(model, tokenizer, "antonym", n_heads=3, **CHEAP)
    calibration = iv.metrics["calibration"]
    best = max(row[3] for row in calibration["searched"])
    assert calibration["accuracy"] == best
    assert (iv.edit_layer, iv.strength, len(iv.heads)) == (
        calibration["edit_layer"],
        calibration["strength"],
        calibration["n_heads"],
    )
    assert iv.settings["calibrate"] is True and iv.settings["strength"] == iv.strength
    assert {row[2] for row in calibration["searched"]} == {1.0, 2.0, 4.0, 8.0}


def test_a_fixed_strength_and_layer_are_not_searched(tokenizer):
    model = tiny_model("llama", seed=1)
    iv = extract_instruction_vector(
        model, tokenizer, "antonym", n_heads=3, edit_layer=2, strength=3.0, **CHEAP
    )
    assert (iv.edit_layer, iv.strength) == (2, 3.0)
    assert {(row[1], row[2]) for row in iv.metrics["calibration"]["searched"]} == {(2, 3.0)}


def test_the_stored_strength_is_what_apply_and_the_callbacks_use(tokenizer):
    model = tiny_model("llama", seed=1).eval()
    iv = extract_instruction_vector(model, tokenizer, "antonym", calibrate=False, n_heads=3, **CHEAP)
    iv = dataclasses.replace(iv, strength=2.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    with iv.apply(model):
        own = model(ids).logits
    with iv.apply(model, strength=2.5):
        explicit = model(ids).logits
    with iv.apply(model, strength=1.0):
        one = model(ids).logits
    torch.testing.assert_close(own, explicit)
    assert not torch.allclose(own, one)
    ((_, vector),) = IVInterventionCallback(iv).pairs
    torch.testing.assert_close(vector, 2.5 * iv.vector)


def test_saved_strength_and_calibration_survive_a_round_trip(tokenizer, tmp_path):
    from ivtrainer import InstructionVector

    iv = extract_instruction_vector(tiny_model("llama", seed=1), tokenizer, "antonym", n_heads=3, **CHEAP)
    loaded = InstructionVector.from_pretrained(iv.save_pretrained(tmp_path / "iv"))
    assert loaded.strength == iv.strength and loaded.metrics["calibration"] == iv.metrics["calibration"]
    assert f"strength {iv.strength:g}" in (tmp_path / "iv" / "README.md").read_text()
    legacy = tmp_path / "iv" / "instruction_vector.json"  # written before calibration existed
    import json

    config = json.loads(legacy.read_text())
    config.pop("strength")
    legacy.write_text(json.dumps(config))
    assert InstructionVector.from_pretrained(tmp_path / "iv").strength == 1.0


def test_too_few_pairs_for_calibration_are_refused_before_any_forward(tokenizer):
    pairs = [{"input": f"w{i}", "output": f"o{i}"} for i in range(10)]
    model = tiny_model("llama")
    with pytest.raises(
        ValueError, match=r"calibration needs at least 16 extraction pairs.*got 10.*calibrate=False"
    ):
        extract_instruction_vector(model, tokenizer, pairs, **CHEAP)
    iv = extract_instruction_vector(model, tokenizer, pairs, calibrate=False, **CHEAP)
    assert iv.strength == 1.0 and iv.edit_layer == 1


def test_bad_strength(tokenizer, caplog):
    from transformers.utils import logging as hf_logging

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="strength must be > 0"):
        extract_instruction_vector(model, tokenizer, "antonym", strength=0.0, **CHEAP)
    with pytest.raises(ValueError, match="strength must be a finite number"):
        extract_instruction_vector(model, tokenizer, "antonym", strength=float("nan"), **CHEAP)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            extract_instruction_vector(model, tokenizer, "antonym", strength=50.0, calibrate=False, **CHEAP)
    finally:
        hf_logging.disable_propagation()
    assert any("outside the usual range" in r.getMessage() for r in caplog.records)


def test_a_vector_that_does_not_steer_is_reported(tokenizer, caplog):
    """A random tiny model: no setting beats zero-shot, and the extraction says so in one line."""
    from transformers.utils import logging as hf_logging

    random.seed(0)
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            iv = extract_instruction_vector(tiny_model("llama"), tokenizer, "antonym", n_heads=3, **CHEAP)
    finally:
        hf_logging.disable_propagation()
    calibration = iv.metrics["calibration"]
    lines = [r.getMessage() for r in caplog.records]
    if calibration["accuracy"] <= calibration["base_accuracy"]:
        assert any("does not raise zero-shot accuracy" in m for m in lines)
    else:
        assert any("rests on" in m for m in lines)


def test_sign_test_and_split():
    from ivtrainer.steering.vector_evaluation import sign_test, split_pairs

    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32)  # all five discordant pairs one way
    assert sign_test(3, 3) == 1.0
    pairs = [{"input": str(i), "output": str(i)} for i in range(30)]
    extraction, held = split_pairs(pairs, 0.33, seed=1)
    assert (
        len(held) == 10
        and len(extraction) == 20
        and not {p["input"] for p in held} & {p["input"] for p in extraction}
    )
    assert split_pairs(pairs, 0.33, seed=1) == (extraction, held)
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\)"):
        split_pairs(pairs, 1.5)


def test_evaluate_counts_what_plain_forwards_and_generation_give(tokenizer):
    """The tiny model's answers are made the targets: zero-shot first-token accuracy must be 1,
    and the IV's row must equal what a plain forward with the vector predicts."""
    from ivtrainer.steering.icl import PromptBuilder, last_token_forward

    model = tiny_model("llama", seed=1).eval()
    iv = extract_instruction_vector(model, tokenizer, "antonym", calibrate=False, n_heads=3, **CHEAP)
    iv = dataclasses.replace(iv, strength=8.0)
    builder = PromptBuilder(tokenizer)
    queries = load_task("antonym", "held_out")[:12]
    greedy = last_token_forward(model, [builder.encode([], q) for q in queries]).argmax(-1).tolist()
    pairs = [
        {"input": q["input"], "output": tokenizer.decode([t]).strip() or "x"}
        for q, t in zip(queries, greedy, strict=True)
    ]
    result = iv.evaluate(
        model,
        tokenizer,
        pairs,
        shots=(0, 2),
        demonstrations=load_task("antonym", "extraction"),
        progress=False,
    )
    expected_first = [builder.encode([], p) for p in pairs]
    base = last_token_forward(model, expected_first).argmax(-1)
    with iv.apply(model):
        steered = last_token_forward(model, expected_first).argmax(-1)
    answers = torch.tensor([p.answer_id for p in expected_first])
    assert result.n == 12 and set(result.k_shot) == {2}
    assert result.zero_shot == pytest.approx((base == answers).float().mean().item(), abs=1e-4)
    assert result.zero_shot_iv == pytest.approx((steered == answers).float().mean().item(), abs=1e-4)
    assert result.lift == pytest.approx(result.zero_shot_iv - result.zero_shot, abs=1e-4)
    low, high = result.lift_interval
    assert low <= result.lift <= high
    assert "| zero-shot |" in result.table() and "2-shot" in result.table()
