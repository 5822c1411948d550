import json

import pytest

from ivtrainer.datasets.tasks import list_tasks, load_examples, load_task


def test_builtin_tasks():
    tasks = list_tasks()
    assert len(tasks) >= 6
    for name in tasks:
        everything = load_task(name, "all")
        extraction, held_out = load_task(name, "extraction"), load_task(name, "held_out")
        assert len(everything) >= 150, name
        assert len({e["input"] for e in everything}) == len(everything), f"{name}: duplicate inputs"
        assert sorted(map(str, extraction + held_out)) == sorted(map(str, everything))
        assert len(held_out) >= len(everything) // 3
        assert load_task(name) == extraction  # deterministic


def test_generated_tasks_are_exact():
    assert all(e["output"] == e["input"].upper() for e in load_task("uppercase", "all"))
    assert all(e["output"] == e["input"][0] for e in load_task("first_letter", "all"))


def test_unknown_task():
    with pytest.raises(ValueError, match="no built-in task 'nope'; choose one of"):
        load_task("nope")
    with pytest.raises(ValueError, match="neither a file nor a built-in task"):
        load_examples("nope")


def test_load_examples_from_files(tmp_path):
    pairs = [{"input": "a", "output": "b"}, {"input": "c", "output": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(pairs))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    (tmp_path / "p.json").write_text(json.dumps({"pairs": [["a", "b"], ["c", "d"]]}))
    for name in ("d.json", "d.jsonl", "p.json"):
        assert load_examples(tmp_path / name) == pairs
    assert load_examples(str(tmp_path / "d.json")) == pairs


def test_load_examples_from_dataset():
    from datasets import Dataset

    ds = Dataset.from_dict({"input": ["a"], "output": ["b"], "extra": [1]})
    assert load_examples(ds) == [{"input": "a", "output": "b"}]
    with pytest.raises(ValueError, match="no 'output' column"):
        load_examples(Dataset.from_dict({"input": ["a"], "answer": ["b"]}))


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        ([], "no examples"),
        ([{"input": "a", "output": "b"}, {"input": "c", "answer": "d"}], "example 1 has no 'output' field"),
        ([{"output": "b"}], "example 0 has no 'input' field"),
        ([{"input": "a", "output": 3}], "'output' must be a non-empty string"),
        (["a"], "example 0 is a str"),
        ({"input": "a"}, "must be a list"),
    ],
)
def test_bad_examples(examples, message):
    with pytest.raises(ValueError, match=message):
        load_examples(examples)


def test_missing_field_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n{"input": "c"}\n')
    with pytest.raises(ValueError, match=r"example 1 in .*bad\.jsonl has no 'output' field"):
        load_examples(path)
