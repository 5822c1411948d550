"""IV dynamics: re-extraction on a fine-tuned model, comparison and hidden-state similarity."""

from __future__ import annotations

import json

import pytest
import torch

from ivtrainer import extract_instruction_vector
from ivtrainer.cli import main
from ivtrainer.datasets.tasks import load_task
from ivtrainer.steering.dynamics import analyze_iv, hidden_state_similarity
from ivtrainer.steering.icl import PromptBuilder
from ivtrainer.testing import tiny_model

SMALL = {
    "n_heads": 3,
    "n_shots": 2,
    "n_mean_prompts": 6,
    "n_cie_prompts": 2,
    "progress": False,
    "calibrate": False,
}


@pytest.fixture(scope="module")
def iv(tokenizer):
    return extract_instruction_vector(tiny_model("llama"), tokenizer, "antonym", **SMALL)


def test_the_unchanged_model_gives_the_same_vector(iv, tokenizer):
    model = tiny_model("llama")
    result = analyze_iv(model, tokenizer, iv, base_model=model, n_prompts=8, progress=False)
    assert result.cosine == pytest.approx(1.0, abs=1e-5) and result.head_overlap == 1.0
    assert result.cie_change.abs().max() < 1e-5
    assert result.evaluation["fine_tuned"] == result.evaluation["original"]
    assert set(result.evaluation["fine_tuned"]) == {"hidden_iv_cosine", "accuracy_0shot", "accuracy_2shot"}


def test_a_changed_model_moves_the_vector(iv, tokenizer):
    changed = tiny_model("llama")
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    result = analyze_iv(changed, tokenizer, iv, n_prompts=8, progress=False)
    assert result.cosine < 0.999 and "original" not in result.evaluation
    assert result.to_dict()["cie_change_abs_mean"] > 0


def test_hidden_state_similarity_by_hand(iv, tokenizer):
    model = tiny_model("llama")
    prompt = PromptBuilder(tokenizer).encode([], load_task("antonym", "held_out")[0])
    with torch.no_grad():
        hidden = model(torch.tensor([prompt.input_ids]), output_hidden_states=True).hidden_states[
            iv.edit_layer + 1
        ]
    expected = torch.nn.functional.cosine_similarity(hidden[0, -1], iv.vector, dim=0)
    assert hidden_state_similarity(model, iv, [prompt, prompt]) == pytest.approx(float(expected), abs=1e-5)


def test_analyze_cli(iv, tokenizer, tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    iv.save_pretrained(tmp_path / "iv")
    out = tmp_path / "analysis"
    args = [
        "analyze",
        "--model",
        str(folder),
        "--iv",
        str(tmp_path / "iv"),
        "--base",
        str(folder),
        "--out",
        str(out),
        "--n-prompts",
        "4",
    ]
    assert main(args) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["iv_cosine"] == pytest.approx(1.0, abs=1e-5) and report["head_overlap"] == 1.0
    assert (out / "cie_change.png").stat().st_size > 0 and (
        out / "reextracted_iv" / "instruction_vector.json"
    ).is_file()
    assert "head overlap 100%" in capsys.readouterr().out
    assert main(args) == 2 and "exists and is not empty" in capsys.readouterr().err


def test_an_iv_without_a_task_needs_examples(iv, tokenizer):
    from dataclasses import replace

    with pytest.raises(ValueError, match="pass examples="):
        analyze_iv(tiny_model("llama"), tokenizer, replace(iv, task=None), progress=False)
    with pytest.raises(ValueError, match="'my_file' is not a built-in task: pass examples="):
        analyze_iv(tiny_model("llama"), tokenizer, replace(iv, task="my_file"), progress=False)


def test_reextraction_keeps_the_original_strength(iv, tokenizer):
    from dataclasses import replace

    original = replace(iv, strength=3.0)
    result = analyze_iv(tiny_model("llama"), tokenizer, original, progress=False)
    assert result.reextracted.strength == 3.0 and result.reextracted.edit_layer == iv.edit_layer
