"""The scripts in examples/ run as documented, on the default model (a few steps, on CPU)."""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ivtrainer import extract_instruction_vector
from ivtrainer.datasets.edits import build_counterfacts

pytestmark = pytest.mark.slow  # multi-process launches / real-model scripts

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def inputs(default_model, tmp_path_factory):
    """Built-in counterfacts as a file (built once) and a cheap IV of the default model."""
    model, tokenizer = default_model
    folder = tmp_path_factory.mktemp("examples")
    (folder / "edits.json").write_text(json.dumps(build_counterfacts(model, tokenizer)[:8]))
    extract_instruction_vector(
        model, tokenizer, "antonym", n_heads=3, n_mean_prompts=8, n_cie_prompts=2, progress=False
    ).save_pretrained(folder / "iv")
    return folder


def _run(script: str, out: Path, inputs: Path, *extra: str) -> str:
    command = [
        sys.executable,
        str(EXAMPLES / script),
        "--data",
        str(inputs / "edits.json"),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        *extra,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def _changed(out: Path, default_model) -> bool:
    trained = load_file(out / "model.safetensors")
    base = default_model[0].state_dict()
    return any(not base[name].equal(tensor) for name, tensor in trained.items())


@pytest.mark.real
def test_plain_iv_guided_and_f_learning_examples_run(inputs, tmp_path, default_model):
    _run("train_plain.py", tmp_path / "plain", inputs)
    _run("train_iv_guided.py", tmp_path / "iv", inputs, "--instruction_vectors", str(inputs / "iv"))
    _run(
        "train_f_learning.py", tmp_path / "f", inputs, "--old_num_train_epochs", "1", "--forget_lambda", "0.5"
    )
    for name in ("plain", "iv", "f"):
        assert _changed(tmp_path / name, default_model)
    assert (tmp_path / "iv" / "instruction_vectors").is_dir()
    assert json.loads((tmp_path / "f" / "_forget" / "f_learning.json").read_text())["complete"]


@pytest.mark.real
def test_sft_example_runs_with_the_callback_and_with_the_kl(inputs, tmp_path):
    iv = ["--instruction_vectors", str(inputs / "iv"), "--bf16", "false"]  # SFTConfig's default needs a GPU
    plain = _run("sft_with_callbacks.py", tmp_path / "sft", inputs, *iv)
    guided = _run("sft_with_callbacks.py", tmp_path / "sft-kl", inputs, *iv, "--kl", "true")
    assert (tmp_path / "sft" / "model.safetensors").is_file()
    assert "'iv_strength'" in plain and "'kl'" not in plain
    assert "'kl_last_prompt'" in guided and "'kl_all'" in guided  # the default recipe's two KL terms


def test_the_three_scripts_differ_only_in_trainer_config_and_extra_input():
    """A reader diffing the examples sees the swap and nothing else (F-Learning also drops the
    --lora_r wrapping: its config has --learn_method lora)."""
    plain = (EXAMPLES / "train_plain.py").read_text().split('"""', 2)[2].splitlines()
    for other in ("train_iv_guided.py", "train_f_learning.py"):
        lines = (EXAMPLES / other).read_text().split('"""', 2)[2].splitlines()
        changed = [
            line
            for line in difflib.unified_diff(plain, lines, lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))
        ]
        assert len(changed) <= 18, changed
