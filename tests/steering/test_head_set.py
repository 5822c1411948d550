"""HeadSet: mean CIE over tasks, save/load, the IV from mean activations only, bad input."""

from __future__ import annotations

import pytest
import torch

from ivtrainer import HeadSet, extract_head_set, extract_instruction_vector
from ivtrainer.modeling.architectures import get_layout
from ivtrainer.steering.extraction import head_contributions
from ivtrainer.steering.head_set import IncompatibleHeadSetError, InvalidHeadSetError
from ivtrainer.testing import tiny_model

CHEAP = {"n_shots": 2, "n_mean_prompts": 6, "n_cie_prompts": 2, "progress": False}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def head_set(llama, tokenizer):
    return extract_head_set(llama, tokenizer, ["antonym", "uppercase"], **CHEAP)


def test_the_mean_over_tasks_of_each_tasks_own_cie(llama, tokenizer, head_set):
    per_task = [
        extract_instruction_vector(llama, tokenizer, t, calibrate=False, n_heads=3, **CHEAP).cie
        for t in ("antonym", "uppercase")
    ]
    torch.testing.assert_close(head_set.task_cie, torch.stack(per_task))
    torch.testing.assert_close(head_set.cie, torch.stack(per_task).mean(0))
    assert head_set.tasks == ["antonym", "uppercase"]
    order = torch.argsort(head_set.cie.flatten(), descending=True)[:4]
    assert head_set.top(4) == [divmod(int(i), 4) for i in order]


def test_the_iv_uses_the_head_set_and_skips_mediation(llama, tokenizer, head_set, monkeypatch):
    import ivtrainer.steering.extraction as module

    def no_mediation(*args, **kwargs):
        raise AssertionError("CIE measured although a head set was given")

    monkeypatch.setattr(module, "mean_cie", no_mediation)
    iv = extract_instruction_vector(
        llama, tokenizer, "present_past", heads=head_set, calibrate=False, n_heads=2, **CHEAP
    )
    assert iv.heads == head_set.top(2)
    torch.testing.assert_close(iv.cie, head_set.cie)
    assert iv.settings["head_set"]["tasks"] == ["antonym", "uppercase"]
    # only the heads' layers are read, and the vector is what a full read gives for those heads
    monkeypatch.undo()
    full = extract_instruction_vector(llama, tokenizer, "present_past", calibrate=False, n_heads=2, **CHEAP)
    read = sorted({layer for layer, _ in iv.heads})
    unread = [layer for layer in range(3) if layer not in read]
    torch.testing.assert_close(iv.mean_activations[read], full.mean_activations[read])
    assert unread and not iv.mean_activations[unread].any()
    expected = head_contributions(get_layout(llama), full.mean_activations, iv.heads).sum(0)
    torch.testing.assert_close(iv.vector, expected)


def test_save_load_and_a_folder_as_heads(llama, tokenizer, head_set, tmp_path):
    head_set.save_pretrained(tmp_path / "heads")
    loaded = HeadSet.from_pretrained(tmp_path / "heads")
    torch.testing.assert_close(loaded.cie, head_set.cie)
    assert loaded.tasks == head_set.tasks and "Head set for" in (tmp_path / "heads" / "README.md").read_text()
    iv = extract_instruction_vector(
        llama, tokenizer, "antonym", heads=tmp_path / "heads", calibrate=False, n_heads=3, **CHEAP
    )
    assert iv.heads == head_set.top(3)
    with pytest.raises(FileNotFoundError, match="not a head set folder"):
        HeadSet.from_pretrained(tmp_path)
    (tmp_path / "heads" / "head_set.json").write_text("{")
    with pytest.raises(InvalidHeadSetError, match="not valid JSON"):
        HeadSet.from_pretrained(tmp_path / "heads")


def test_a_head_set_of_another_model_is_refused_before_any_forward(tokenizer, head_set):
    other = tiny_model("llama", num_hidden_layers=4)
    with pytest.raises(IncompatibleHeadSetError, match=r"3 layers x 4 heads.*4 x 4"):
        extract_instruction_vector(other, tokenizer, "antonym", heads=head_set, **CHEAP)
    with pytest.raises(ValueError, match="tasks is empty"):
        extract_head_set(other, tokenizer, [], **CHEAP)
    with pytest.raises(InvalidHeadSetError, match="task_cie must have shape"):
        HeadSet(**{**head_set.__dict__, "tasks": ["one"]})


def test_cli_extract_heads_then_extract_iv_with_them_and_a_held_out_split(tmp_path, tokenizer):
    import json
    import os
    import subprocess
    import sys

    folder = tmp_path / "model"
    tiny_model("llama", seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    exe = os.path.join(os.path.dirname(sys.executable), "ivtrainer")
    small = ["--n-shots", "2", "--n-mean-prompts", "4"]
    heads = subprocess.run(
        [exe, "extract-heads", "--model", str(folder), "--tasks", "antonym,uppercase", "--out", str(tmp_path / "h"),
         *small, "--n-cie-prompts", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert heads.returncode == 0, heads.stderr
    assert "top heads by mean CIE over 2 tasks" in heads.stdout
    assert HeadSet.from_pretrained(tmp_path / "h").tasks == ["antonym", "uppercase"]
    task = tmp_path / "my_task.jsonl"
    task.write_text("".join(json.dumps({"input": f"w{i}", "output": f"W{i}"}) + "\n" for i in range(30)))
    iv = subprocess.run(
        [exe, "extract-iv", "--model", str(folder), "--task", str(task), "--heads", str(tmp_path / "h"),
         "--out", str(tmp_path / "iv"), "--eval-split", "0.33", *small],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert iv.returncode == 0, iv.stderr
    assert (
        "| 10 held-out pairs | first token | exact match |" in iv.stdout and "Lift from the IV" in iv.stdout
    )
    saved = json.loads((tmp_path / "iv" / "instruction_vector.json").read_text())
    assert saved["task"] == "my_task" and saved["settings"]["head_set"]["tasks"] == ["antonym", "uppercase"]
    assert saved["metrics"]["evaluation"]["n"] == 10 and saved["settings"]["n_examples"] == 20
    card = (tmp_path / "iv" / "README.md").read_text()
    assert "Measured on held-out pairs" in card and "# Instruction vector for `my_task`" in card
    bad = subprocess.run(
        [exe, "extract-iv", "--model", str(folder), "--task", "antonym", "--heads", str(tmp_path / "nope"),
         "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "not an existing folder" in bad.stderr and not (tmp_path / "x").exists()


def test_a_head_set_with_n_top_fixes_the_head_count(llama, tokenizer, head_set, tmp_path, monkeypatch):
    """``n_top``: the IV sums that many of the set's top heads, and the calibration searches the
    layer and strength only, in two passes (the layers near the best at every strength); a set
    saved without it loads and calibrates the count; a bad count is refused."""
    import dataclasses
    import json

    import ivtrainer.steering.calibration as calibration

    dataclasses.replace(head_set, n_top=3).save_pretrained(tmp_path / "heads")
    loaded = HeadSet.from_pretrained(tmp_path / "heads")
    assert loaded.n_top == 3 and "top 3 heads" in (tmp_path / "heads" / "README.md").read_text()
    passes = []
    hits = calibration.ZeroShotScorer.hits
    monkeypatch.setattr(
        calibration.ZeroShotScorer, "hits", lambda self, *a: passes.append(1) or hits(self, *a)
    )
    iv = extract_instruction_vector(
        llama, tokenizer, "antonym", heads=loaded, n_calibration_prompts=16, **CHEAP
    )
    searched = iv.metrics["calibration"]["searched"]
    assert iv.heads == head_set.top(3) and {int(r[0]) for r in searched} == {3}
    assert len(passes) <= 2 and {r[2] for r in searched if r[1] == iv.edit_layer} == {1.0, 2.0, 4.0, 8.0}
    passes.clear()
    iv = extract_instruction_vector(
        llama, tokenizer, "antonym", heads=head_set, n_calibration_prompts=16, **CHEAP
    )
    assert len(passes) == 3 and {int(r[0]) for r in iv.metrics["calibration"]["searched"]} == {5, 10}
    config = json.loads((tmp_path / "heads" / "head_set.json").read_text())
    del config["n_top"]
    (tmp_path / "heads" / "head_set.json").write_text(json.dumps(config))
    assert HeadSet.from_pretrained(tmp_path / "heads").n_top is None
    for bad in (0, True, 13, 2.0):
        with pytest.raises(InvalidHeadSetError, match="n_top"):
            dataclasses.replace(head_set, n_top=bad)
