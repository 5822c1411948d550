import json
import math
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

import ivtrainer
from ivtrainer import InstructionVector, extract_instruction_vector
from ivtrainer.errors import UnsupportedArchitectureError
from ivtrainer.hub.push import HubError
from ivtrainer.modeling.architectures import get_layout
from ivtrainer.steering.extraction import head_contributions
from ivtrainer.steering.instruction_vector import IncompatibleVectorError
from ivtrainer.testing import tiny_model, tiny_tokenizer

SMALL = {
    "n_heads": 3,
    "n_shots": 3,
    "n_mean_prompts": 6,
    "n_cie_prompts": 2,
    "progress": False,
    "calibrate": False,
}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def iv(llama, tokenizer):
    return extract_instruction_vector(llama, tokenizer, "antonym", **SMALL)


def test_extraction(iv, llama):
    layout = get_layout(llama)
    assert iv.task == "antonym"
    assert iv.cie.shape == (3, 4) and iv.mean_activations.shape == (3, 4, 16) and iv.vector.shape == (64,)
    top = torch.topk(iv.cie.flatten(), 3)
    assert iv.heads == [divmod(int(i), 4) for i in top.indices]
    assert iv.head_scores == pytest.approx(top.values.tolist())
    assert iv.edit_layer == 1  # n_layers // 3
    torch.testing.assert_close(iv.vector, head_contributions(layout, iv.mean_activations, iv.heads).sum(0))
    assert (iv.hidden_size, iv.n_layers, iv.n_heads, iv.head_dim, iv.model_type) == (64, 3, 4, 16, "llama")
    assert iv.settings["method"] == "exact" and iv.settings["n_shots"] == 3


def test_head_contribution_is_the_projection_of_that_head_alone(llama, iv):
    layout = get_layout(llama)
    layer, head = iv.heads[0]
    x = torch.zeros(4, 16)
    x[head] = iv.mean_activations[layer, head]
    weight = layout.attn_outputs[layer].weight  # Linear without bias: W @ x
    torch.testing.assert_close(
        head_contributions(layout, iv.mean_activations, [(layer, head)])[0], weight @ x.flatten()
    )


def test_gpt2_conv1d_with_bias():
    model = tiny_model("gpt2")
    layout = get_layout(model)
    mean = torch.randn(3, 4, 16)
    proj = layout.attn_outputs[2]
    x = torch.zeros(4, 16)
    x[1] = mean[2, 1]
    expected = x.flatten() @ proj.weight  # Conv1D stores (in, out); the bias cancels
    torch.testing.assert_close(head_contributions(layout, mean, [(2, 1)])[0], expected)


def test_deterministic(llama, tokenizer, iv):
    again = extract_instruction_vector(llama, tokenizer, "antonym", **SMALL)
    assert again.heads == iv.heads and torch.equal(again.vector, iv.vector)


def test_atp_and_chat_template(llama, tokenizer):
    atp = extract_instruction_vector(llama, tokenizer, "antonym", method="atp", chat_template=True, **SMALL)
    assert atp.settings["method"] == "atp" and atp.settings["chat_template"] is True
    assert atp.vector.shape == (64,)


def test_auto_edit_layer_without_calibration_searches_the_layer_only(llama, tokenizer):
    iv = extract_instruction_vector(
        llama, tokenizer, "antonym", edit_layer="auto", n_calibration_prompts=8, **SMALL
    )
    calibration = iv.metrics["calibration"]
    assert {row[2] for row in calibration["searched"]} == {1.0} and iv.strength == 1.0
    assert {row[0] for row in calibration["searched"]} == {3} and len(iv.heads) == 3
    assert {row[1] for row in calibration["searched"]} == {0, 1, 2} and iv.edit_layer == calibration[
        "edit_layer"
    ]


def test_tokenizer_without_pad_token(llama):
    tokenizer = tiny_tokenizer(pad_token=False)
    assert tokenizer.pad_token is None
    extract_instruction_vector(llama, tokenizer, "uppercase", **SMALL)


def test_save_and_load(iv, tmp_path, llama):
    iv.save_pretrained(tmp_path / "iv")
    assert sorted(os.listdir(tmp_path / "iv")) == [
        "README.md",
        "instruction_vector.json",
        "instruction_vector.safetensors",
    ]
    loaded = InstructionVector.from_pretrained(tmp_path / "iv")
    for name in ("vector", "cie", "mean_activations"):
        assert torch.equal(getattr(loaded, name), getattr(iv, name))
    assert loaded.heads == iv.heads and loaded.settings == iv.settings and loaded.edit_layer == iv.edit_layer
    config = json.loads((tmp_path / "iv" / "instruction_vector.json").read_text())
    assert config["format_version"] == 1 and config["heads"] == [list(h) for h in iv.heads]
    card = (tmp_path / "iv" / "README.md").read_text()
    assert "library_name: ivtrainer" in card and f"decoder layer {iv.edit_layer}" in card


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an instruction vector folder"):
        InstructionVector.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        InstructionVector.from_pretrained("nobody/no-such-vector")


def test_apply_steers_and_checks_shapes(iv, llama):
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        plain = llama(ids).logits
        with iv.apply(llama, strength=2.0):
            steered = llama(ids).logits
    assert not torch.allclose(plain[0, -1], steered[0, -1])
    torch.testing.assert_close(plain[0, :-1], steered[0, :-1])  # only the last token is edited
    other = tiny_model("llama", hidden_size=32, num_attention_heads=2)
    with pytest.raises(IncompatibleVectorError, match="hidden size 64, 3 layers"), iv.apply(other):
        pass


def test_push_to_hub_sends_the_saved_files(iv, monkeypatch):
    from ivtrainer.testing import intercept_hub_upload

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with intercept_hub_upload("me/antonym-iv") as sent:
        url = iv.push_to_hub("me/antonym-iv", private=True)
    sent["create_repo"].assert_called_once_with(
        "me/antonym-iv", repo_type="model", private=True, exist_ok=True
    )
    assert url == "https://hub.invalid/commit/1"
    assert sent["files"] == {"README.md", "instruction_vector.json", "instruction_vector.safetensors"}
    assert json.loads(sent["texts"]["instruction_vector.json"])["heads"] == [list(h) for h in iv.heads]
    assert "instruction-vector" in sent["card"]


def test_push_without_token_or_repo_fails_before_work(iv, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored token either
    with mock.patch("huggingface_hub.HfApi.create_repo") as create_repo:
        with pytest.raises(HubError, match="no Hugging Face token"):
            iv.push_to_hub("me/antonym-iv")
        with pytest.raises(HubError, match="needs a repo id"):
            iv.push_to_hub("")
    create_repo.assert_not_called()


class _CountForwards:
    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.n += 1


@pytest.mark.parametrize(
    ("examples", "kwargs", "message"),
    [
        ([], {}, "no examples"),
        ([{"input": "a", "output": "b"}] * 3, {"n_shots": 3}, "3 examples are too few for 3-shot prompts"),
        ("antonym", {"n_heads": 13}, r"n_heads must be between 1 and the model's 3 x 4 = 12 heads"),
        ("antonym", {"n_heads": 0}, "n_heads must be between 1"),
        ("no_such_task", {}, "neither a file nor a built-in task"),
        ("antonym", {"method": "fast"}, "method must be 'exact' or 'atp'"),
        ("antonym", {"edit_layer": 7}, r"edit_layer must be None, 'auto' or a layer in \[0, 3\)"),
        ("antonym", {"n_cie_prompts": 0}, "n_cie_prompts must be an integer >= 1"),
        ([{"input": "a"}], {}, "example 0 has no 'output' field"),
    ],
)
def test_bad_input_fails_before_any_forward(llama, tokenizer, examples, kwargs, message):
    counter = _CountForwards(llama)
    try:
        with pytest.raises(ValueError, match=message):
            extract_instruction_vector(llama, tokenizer, examples, **{**SMALL, **kwargs})
    finally:
        counter.handle.remove()
    assert counter.n == 0


def test_unsupported_architecture(tokenizer):
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=320, state_size=4))
    with pytest.raises(UnsupportedArchitectureError):
        extract_instruction_vector(model, tokenizer, "antonym", **SMALL)


def test_chat_template_missing(llama):
    with pytest.raises(ValueError, match="no chat template"):
        extract_instruction_vector(
            llama, tiny_tokenizer(chat_template=False), "antonym", chat_template=True, **SMALL
        )


def test_peft_model_extraction_and_apply(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("qwen2"), LoraConfig(r=2, target_modules=["o_proj"]))
    iv = extract_instruction_vector(model, tokenizer, "antonym", **SMALL)
    bare = extract_instruction_vector(tiny_model("qwen2"), tokenizer, "antonym", **SMALL)
    assert iv.heads == bare.heads  # zero-initialised adapters: the base model's analysis
    torch.testing.assert_close(iv.vector, bare.vector)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with iv.apply(model):
            steered = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    # the IV goes in at the last token only: earlier positions unchanged, the last one moved
    torch.testing.assert_close(steered[:, :-1], before[:, :-1])
    assert float((steered[:, -1] - before[:, -1]).abs().max()) > 1e-4
    torch.testing.assert_close(after, before)  # the hooks are gone


def test_cli_extract_iv(tmp_path, tokenizer):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "iv"
    cmd = [os.path.join(os.path.dirname(sys.executable), "ivtrainer"), "extract-iv", "--model", str(folder)]
    args = ["--task", "antonym", "--out", str(out), "--n-heads", "2", "--n-shots", "2", "--n-mean-prompts", "4",
            "--n-cie-prompts", "2", "--plot", "--method", "atp"]  # fmt: skip
    result = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "top 2 heads" in result.stdout and "causal effects (atp)" in result.stderr  # tqdm progress
    assert (out / "cie_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "calibration_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ivtrainer.InstructionVector.from_pretrained(out).settings["method"] == "atp"
    again = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300)
    assert (
        again.returncode == 2
        and "exists and is not empty" in again.stderr
        and "Traceback" not in again.stderr
    )
    bad = subprocess.run(
        [*cmd, "--task", "nope", "--out", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "neither a file nor a built-in task" in bad.stderr


def _tamper(folder, config=None, tensors=None):
    """Rewrite a saved IV folder's JSON fields and/or tensors."""
    from safetensors.torch import load_file, save_file

    path = folder / "instruction_vector.json"
    data = json.loads(path.read_text())
    data.update(config or {})
    path.write_text(json.dumps(data))
    if tensors:
        saved = load_file(folder / "instruction_vector.safetensors")
        save_file({**saved, **tensors}, folder / "instruction_vector.safetensors")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"edit_layer": -1}, r"edit_layer must be an integer in \[0, 3\), got -1"),
        ({"edit_layer": 999}, "got 999"),
        ({"edit_layer": "1"}, "got '1'"),
        ({"edit_layer": 1.5}, "got 1.5"),
        ({"heads": [[0, 99], [1, 1], [2, 2]]}, r"head \[0, 99\] is not a \(layer, head\) pair"),
        ({"heads": [[5, 0], [1, 1], [2, 2]]}, "is not a"),
        ({"heads": "L0H1"}, "heads and head_scores must be lists"),
        ({"head_scores": [0.1]}, "1 head_scores for 3 heads"),
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"format_version": 7}, "unsupported instruction vector format 7"),
        ({"n_layers": None}, "n_layers must be a positive integer"),
        ({"surprise": 1}, r"unknown fields \['surprise'\]"),
        ({"vector": torch.zeros(63)}, r"vector must have shape \(64,\), got \(63,\)"),
        ({"cie": torch.zeros(4, 3)}, r"cie must have shape \(3, 4\)"),
        ({"cie": torch.full((3, 4), math.nan)}, "cie has 12 non-finite values"),
        ({"mean_activations": torch.full((3, 4, 16), math.inf)}, "mean_activations has 192 non-finite"),
    ],
)
def test_tampered_folder_fails_with_one_line(iv, tmp_path, change, match):
    from ivtrainer.errors import IVTrainerError

    iv.save_pretrained(tmp_path / "iv")
    tensors = {k: v for k, v in change.items() if isinstance(v, torch.Tensor)}
    _tamper(tmp_path / "iv", {k: v for k, v in change.items() if k not in tensors}, tensors)
    with pytest.raises(IVTrainerError, match=match) as info:
        InstructionVector.from_pretrained(tmp_path / "iv")
    assert "\n" not in str(info.value) and str(tmp_path / "iv") in str(info.value)


@pytest.mark.parametrize(
    ("broken", "match"),
    [
        ({"instruction_vector.json": b"{not json"}, "is not valid JSON"),
        ({"instruction_vector.json": b"[1, 2]"}, "must hold a JSON object"),
        ({"instruction_vector.safetensors": b"\x00\x01garbage"}, "cannot be read"),
    ],
)
def test_corrupt_files_fail_with_one_line(iv, tmp_path, broken, match):
    from ivtrainer.errors import IVTrainerError

    iv.save_pretrained(tmp_path / "iv")
    for name, content in broken.items():
        (tmp_path / "iv" / name).write_bytes(content)
    with pytest.raises(IVTrainerError, match=match):
        InstructionVector.from_pretrained(tmp_path / "iv")


def test_mistyped_local_path_is_not_a_hub_download(tmp_path, monkeypatch):
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("a local path went to the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    for where in (tmp_path / "ivs" / "antonym", "./antonym-iv", "~/no-such/iv/folder"):
        with pytest.raises(FileNotFoundError, match="not an existing folder"):
            InstructionVector.from_pretrained(where)


def test_hub_vector_comes_from_one_commit(iv, tmp_path, monkeypatch):
    """Both files from one snapshot of the asked revision (``id@rev`` or revision=)."""
    import huggingface_hub

    calls = []

    def snapshot(repo_id, revision=None, token=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, sorted(allow_patterns)))
        iv.save_pretrained(tmp_path / "snap")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    InstructionVector.from_pretrained("me/antonym-iv@v1.0")
    InstructionVector.from_pretrained("me/antonym-iv", revision="abc123")
    files = ["instruction_vector.json", "instruction_vector.safetensors"]
    assert calls == [("me/antonym-iv", "v1.0", files), ("me/antonym-iv", "abc123", files)]


def test_prompts_longer_than_the_models_positions_are_refused_before_any_forward(tokenizer):
    model = tiny_model("gpt2")  # 256 positions
    long = [{"input": " ".join(["word"] * 40) + f" {i}", "output": f"w{i}"} for i in range(30)]
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(
        ValueError, match=r"10-shot prompt has \d+ tokens, more than the model's 256 positions"
    ):
        extract_instruction_vector(model, tokenizer, long, progress=False)
    assert calls == []
