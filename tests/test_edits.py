"""Edit records, the built-in counterfactual set and the knowledge-update metrics."""

from __future__ import annotations

import json

import pytest
import torch

import ivtrainer.metrics
from ivtrainer.cli import main
from ivtrainer.datasets.edits import (
    EDIT_FIELDS,
    _candidate_relations,
    build_counterfacts,
    edit_dataset,
    load_edits,
    split_edits,
    target_predictions,
)
from ivtrainer.evaluation.edit_metrics import evaluate_edits, locality_reference, score_tokens
from ivtrainer.testing import tiny_edits, tiny_model

COUNTERFACT = {  # EasyEdit's CounterFact split
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "target_new": "English",
    "rephrase_prompt": "Danielle Darrieux, a native speaker of",
    "locality_prompt": "The mother tongue of Léon Blum is",
    "locality_ground_truth": "French",
}
ZSRE = {  # MEND's ZsRE split
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "answers": ["University of Michigan"],
    "alt": "Illinois Institute of Technology",
    "rephrase": "What university did Watts Humphrey take part in?",
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving",
}


def test_load_counterfact_zsre_and_own_format(tmp_path):
    cf = load_edits([COUNTERFACT])[0]
    assert cf["target_old"] == "French" and cf["target_new"] == "English"
    assert cf["rephrase_prompt"].startswith("Danielle") and cf["locality_ground_truth"] == "French"
    zs = load_edits([ZSRE])[0]
    assert zs["prompt"] == ZSRE["src"] and zs["target_old"] == "University of Michigan"
    assert zs["target_new"] == ZSRE["alt"] and zs["locality_prompt"] == ZSRE["loc"]
    assert set(cf) == set(zs) == set(EDIT_FIELDS)
    assert load_edits([cf]) == [cf]  # our own schema round-trips
    (tmp_path / "cf.json").write_text(json.dumps([COUNTERFACT, COUNTERFACT]))
    (tmp_path / "zsre.jsonl").write_text(json.dumps(ZSRE) + "\n" + json.dumps(ZSRE) + "\n")
    assert load_edits(tmp_path / "cf.json") == [cf, cf]
    assert load_edits(str(tmp_path / "zsre.jsonl")) == [zs, zs]
    from datasets import Dataset

    assert load_edits(Dataset.from_list([COUNTERFACT])) == [cf]


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (
            [{k: v for k, v in COUNTERFACT.items() if k != "rephrase_prompt"}],
            "record 0 has no 'rephrase_prompt'",
        ),
        ([{k: v for k, v in ZSRE.items() if k != "alt"}], "record 0 has no 'alt'"),
        ([], "no edit records"),
        (["a string"], "record 0 is a str"),
        ("no/such/file.json", "is not a file"),
        ("builtin", "pass model= and tokenizer="),
        ({"prompt": "x"}, "list of records"),
    ],
)
def test_load_edits_errors(source, match):
    with pytest.raises(ValueError, match=match):
        load_edits(source)


def test_split_is_fixed_disjoint_and_stratified():
    records = tiny_edits(30)
    val, test = split_edits(records)
    assert split_edits(records) == (val, test)
    assert len(val) == 10 and len(test) == 20
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in test}
    assert sum(r["relation"] == "capital" for r in val) == 5
    with pytest.raises(ValueError, match="validation_fraction"):
        split_edits(records, 1.0)


def test_edit_dataset_masks_the_prompt(tokenizer):
    rec = tiny_edits(1)[0]
    row = edit_dataset([rec], tokenizer, "old")[0]
    answer = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tokenizer.decode(answer) == " " + rec["target_old"]
    assert row["labels"][: len(tokenizer(rec["prompt"])["input_ids"])] == [-100] * len(
        tokenizer(rec["prompt"])["input_ids"]
    )
    new = edit_dataset([rec], tokenizer, "new", prompts=("prompt", "rephrase_prompt"), add_eos=True)
    assert len(new) == 2 and new[0]["input_ids"][-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="'new' or 'old'"):
        edit_dataset([rec], tokenizer, "both")


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
    metric = ivtrainer.metrics.load("knowledge_update")
    preds, refs = [[1, 2], [3], [4, 4, 4]], [[1, 5], [3], [4, 0, 4]]
    kinds = ["reliability", "generality", "locality"]
    assert metric.compute(predictions=preds, references=refs) == pytest.approx(score_tokens(preds, refs))
    assert metric.compute(predictions=preds, references=refs, kinds=kinds) == score_tokens(preds, refs, kinds)
    with pytest.raises(ValueError, match="no metric"):
        ivtrainer.metrics.path("bleu")


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


@pytest.mark.real
def test_builtin_counterfacts_are_facts_the_default_model_knows(default_model):
    model, tok = default_model
    records = build_counterfacts(model, tok)
    assert len(records) >= 60
    assert {r["relation"] for r in records} >= {"capital", "language", "landmark_city"}
    relation_of = {
        rel["prompt"].format(s): rel["name"] for rel in _candidate_relations() for s, _ in rel["facts"]
    }
    edit_prompts = {r["prompt"] for r in records}
    for r in records:
        assert r["target_new"] != r["target_old"]
        assert relation_of[r["locality_prompt"]] != r["relation"]  # unrelated knowledge
        assert r["locality_prompt"] not in edit_prompts  # never edited
    # checked through another code path: greedy generation completes the old fact
    sample = records[:: max(1, len(records) // 12)]
    for r in sample:
        ids = tok(r["prompt"], return_tensors="pt")
        out = model.generate(
            **ids, max_new_tokens=len(tok(" " + r["target_old"])["input_ids"]), do_sample=False
        )
        assert tok.decode(out[0, ids["input_ids"].shape[1] :]).strip() == r["target_old"]
    scores = evaluate_edits(
        model, tok, [r | {"target_new": r["target_old"]} for r in records], base_model=model
    )
    assert scores["reliability"] == 1.0 and scores["locality"] == 1.0
