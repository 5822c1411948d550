"""The knowledge-update metrics (EasyEdit semantics), their evaluate module and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import ivtrainer.evaluation.metrics
from ivtrainer.cli import main
from ivtrainer.evaluation.edit_metrics import evaluate_edits, locality_reference, score_tokens
from ivtrainer.evaluation.predictions import target_predictions
from ivtrainer.testing import tiny_edits, tiny_model
from tests.utils import COUNTERFACT, ZSRE


def test_target_predictions_batching_matches_one_by_one(tokenizer):
    model = tiny_model("llama", seed=1)
    records = tiny_edits(5)
    prompts = [r["prompt"] for r in records] + ["x"]
    targets = [r["target_new"] for r in records] + ["a much longer target than the others"]
    batched = target_predictions(model, tokenizer, prompts, targets, batch_size=4)
    single = [
        target_predictions(model, tokenizer, [p], [t])[0] for p, t in zip(prompts, targets, strict=True)
    ]
    assert batched == single
    # the argmax is the model's own: check one position by hand
    full = tokenizer(f"{prompts[0]} {targets[0]}")["input_ids"]
    n = len(tokenizer(prompts[0])["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0]
    assert batched[0] == (logits[n - 1 : len(full) - 1].argmax(-1).tolist(), full[n:])


def test_score_tokens_is_the_mean_of_per_record_fractions():
    assert score_tokens([[1, 2], [3]], [[1, 5], [3]]) == {"score": 0.75}
    scores = score_tokens([[1, 2], [3], [4]], [[1, 2], [0], [4]], ["a", "a", "b"])
    assert scores == {"a": 0.5, "b": 1.0}
    with pytest.raises(ValueError, match="2 predicted tokens for 1"):
        score_tokens([[1, 2]], [[1]])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_tokens([[1], [2]], [[1]])


def test_evaluate_edits_semantics(tokenizer):
    model = tiny_model("llama", seed=2)
    records = tiny_edits(4)
    scores = evaluate_edits(model, tokenizer, records, base_model=model)
    assert scores["locality"] == 1.0  # an unedited model agrees with itself
    manual = target_predictions(
        model, tokenizer, [r["prompt"] for r in records], [r["target_new"] for r in records]
    )
    assert scores["reliability"] == pytest.approx(score_tokens(*zip(*manual, strict=True))["score"])
    base = locality_reference(model, tokenizer, records)
    other = tiny_model("llama", seed=3)
    via_predictions = evaluate_edits(other, tokenizer, records, base_predictions=base)
    assert via_predictions == evaluate_edits(other, tokenizer, records, base_model=model)
    assert via_predictions["locality"] < 1.0
    assert "locality" not in evaluate_edits(model, tokenizer, records)
    with pytest.raises(ValueError, match="not both"):
        evaluate_edits(model, tokenizer, records, base_model=model, base_predictions=base)


def test_evaluate_module_loads_offline_and_matches(monkeypatch):
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    metric = ivtrainer.evaluation.metrics.load("knowledge_update")
    preds, refs = [[1, 2], [3], [4, 4, 4]], [[1, 5], [3], [4, 0, 4]]
    kinds = ["reliability", "generality", "locality"]
    assert metric.compute(predictions=preds, references=refs) == pytest.approx(score_tokens(preds, refs))
    assert metric.compute(predictions=preds, references=refs, kinds=kinds) == score_tokens(preds, refs, kinds)
    with pytest.raises(ValueError, match="no metric"):
        ivtrainer.evaluation.metrics.path("bleu")


def test_evaluate_edits_cli(tmp_path, tokenizer, capsys):
    folder = tmp_path / "model"
    tiny_model("llama", seed=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "edits.json"
    data.write_text(json.dumps([COUNTERFACT, ZSRE | {"ground_truth": "x"}][:1]))
    out = tmp_path / "scores.json"
    assert (
        main(
            [
                "evaluate-edits",
                "--model",
                str(folder),
                "--base",
                str(folder),
                "--data",
                str(data),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "locality     100.0" in printed and "reliability" in printed
    assert json.loads(out.read_text())["locality"] == 1.0
    assert main(["evaluate-edits", "--model", str(folder), "--data", str(data), "--json", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["evaluate-edits", "--model", str(folder), "--data", str(tmp_path / "none.json")]) == 2
    assert "is not a file" in capsys.readouterr().err
