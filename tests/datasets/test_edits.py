"""Edit records: the public formats, splits, tokenising and the built-in counterfactual set."""

from __future__ import annotations

import json

import pytest

from ivtrainer.datasets.edits import (
    EDIT_FIELDS,
    _candidate_relations,
    build_counterfacts,
    edit_dataset,
    load_edits,
    split_edits,
)
from ivtrainer.evaluation.edit_metrics import evaluate_edits
from ivtrainer.testing import tiny_edits
from tests.utils import COUNTERFACT, ZSRE


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
