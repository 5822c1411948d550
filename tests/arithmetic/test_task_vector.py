"""subtract_task_vector: the formula over shards, dtypes, and bad input that writes nothing."""

import json
import math

import pytest
import torch

from ivtrainer.testing import tiny_model
from tests.utils import finetuned_pair


@pytest.mark.parametrize("save_kwargs", [{}, {"max_shard_size": "40KB"}])
def test_task_vector_formula_and_files(tmp_path, tokenizer, save_kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ivtrainer.arithmetic import subtract_task_vector

    base, tuned = finetuned_pair(tmp_path, tokenizer, **save_kwargs)
    out = subtract_task_vector(tmp_path / "base", tmp_path / "tuned", 0.4, tmp_path / "out")
    base_files = sorted(p.name for p in (tmp_path / "base").iterdir())
    written = ["ivtrainer_task_vector.json", ".ivtrainer-output.json"]  # the record, and the folder's marker
    assert sorted(p.name for p in out.iterdir()) == sorted([*base_files, *written])
    if save_kwargs:
        assert len(list(out.glob("*.safetensors"))) > 1  # the shard layout is kept
    result = AutoModelForCausalLM.from_pretrained(out)
    tuned_params = dict(tuned.named_parameters())
    for name, param in base.named_parameters():
        expected = param - 0.4 * (tuned_params[name] - param)
        torch.testing.assert_close(dict(result.named_parameters())[name], expected, atol=1e-6, rtol=1e-6)
    assert AutoTokenizer.from_pretrained(out)("hello").input_ids == tokenizer("hello").input_ids
    assert json.loads((out / "ivtrainer_task_vector.json").read_text())["lam"] == 0.4
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_task_vector_bfloat16_rounds_once(tmp_path, tokenizer):
    from safetensors.torch import load_file

    from ivtrainer.arithmetic import subtract_task_vector

    base, tuned = finetuned_pair(tmp_path, tokenizer, dtype=torch.bfloat16)
    out = subtract_task_vector(tmp_path / "base", tmp_path / "tuned", 1.5, tmp_path / "out")
    got = load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    b = base.model.layers[0].mlp.up_proj.weight.float()
    t = tuned.model.layers[0].mlp.up_proj.weight.float()
    assert got.dtype == torch.bfloat16 and torch.equal(got, (b - 1.5 * (t - b)).bfloat16())


def test_task_vector_bad_input_writes_nothing(tmp_path, tokenizer):
    from ivtrainer.arithmetic import subtract_task_vector

    finetuned_pair(tmp_path, tokenizer)
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        subtract_task_vector(tmp_path / "base", tmp_path / "tuned", 0.5, tmp_path / "exists")
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="lambda must be a finite number"):
        subtract_task_vector(tmp_path / "base", tmp_path / "tuned", math.nan, tmp_path / "o1")
    tiny_model("llama", hidden_size=32, num_attention_heads=2).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="has shape"):
        subtract_task_vector(tmp_path / "base", tmp_path / "small", 0.5, tmp_path / "o2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no model\.safetensors"):
        subtract_task_vector(tmp_path / "base", tmp_path / "empty", 0.5, tmp_path / "o3")
    # A broken shard fails mid-way: no output folder and no temporary folder are left.
    data = (tmp_path / "tuned" / "model.safetensors").read_bytes()
    (tmp_path / "tuned" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is truncated"):
        subtract_task_vector(tmp_path / "base", tmp_path / "tuned", 0.5, tmp_path / "o4")
    leftovers = {p.name for p in tmp_path.iterdir()}
    assert not leftovers & {"o1", "o2", "o3", "o4"} and not [n for n in leftovers if ".tmp-" in n]
    with pytest.raises(FileExistsError, match="was not written by ivtrainer"):  # overwrite replaces ours only
        subtract_task_vector(tmp_path / "base", tmp_path / "base", 0.5, tmp_path / "exists", overwrite=True)
    with pytest.raises(ValueError, match=r"out_dir .* is the input"):
        subtract_task_vector(tmp_path / "base", tmp_path / "base", 0.5, tmp_path / "base", overwrite=True)
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    subtract_task_vector(tmp_path / "base", tmp_path / "base", 0.5, tmp_path / "o5")
    (tmp_path / "o5" / "stale.txt").write_text("from the first run")
    subtract_task_vector(tmp_path / "base", tmp_path / "base", 0.5, tmp_path / "o5", overwrite=True)
    assert not (tmp_path / "o5" / "stale.txt").exists()
