"""forget() and ``ivtrainer forget``: adapters or a full fine-tune subtracted into a new folder, with its card."""

import json

import pytest
import torch

from ivtrainer.arithmetic import subtract_adapter
from tests.utils import finetuned_pair, trained_adapter, weights


def _cli(*args):
    import os
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "ivtrainer")
    return subprocess.run([exe, "forget", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_forget_adapter_and_task_vector(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    finetuned_pair(tmp_path, tokenizer)
    trained_adapter("llama").save_pretrained(tmp_path / "adapter")
    result = _cli(
        "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "--lam", 0.3, "--out", tmp_path / "o"
    )
    assert result.returncode == 0, result.stderr
    expected = subtract_adapter(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter", 0.3
    )
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    for key, value in weights(expected).items():
        torch.testing.assert_close(weights(got)[key], value)
    assert (tmp_path / "o" / "tokenizer.json").is_file()

    result = _cli(
        "--base", tmp_path / "base", "--finetuned", tmp_path / "tuned", "--lam", 0.3, "--out", tmp_path / "t"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "t" / "ivtrainer_task_vector.json").read_text())["lam"] == 0.3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lam", "0.3"], "pass either --adapter"),
        (["--adapter", "a", "--finetuned", "b", "--lam", "0.3"], "pass either --adapter"),
        (["--adapter", "a", "--lam", "nan"], "lambda must be a finite number"),
        (
            ["--adapter", "a", "--adapter", "b", "--lam", "1", "--lam", "2", "--lam", "3"],
            "got 3 lambdas for 2 adapters",
        ),
    ],
)
def test_cli_forget_bad_input(tmp_path, args, message):
    result = _cli("--base", tmp_path / "base", *args, "--out", tmp_path / "o")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_forget_push_checks_token_first(tmp_path, monkeypatch):
    from unittest import mock

    from ivtrainer.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with mock.patch("ivtrainer.modeling.loading.load_model") as load:
        code = main(["forget", "--base", "x", "--adapter", "a", "--lam", "0.3", "--out", str(tmp_path / "o"),
                     "--push-to-hub", "me/forgot"])  # fmt: skip
    assert code == 2 and not load.called and not (tmp_path / "o").exists()


def test_cli_forget_pushes_the_weights_and_a_card(tmp_path, tokenizer, monkeypatch):
    from ivtrainer.cli import main
    from ivtrainer.testing import intercept_hub_upload

    finetuned_pair(tmp_path, tokenizer)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with intercept_hub_upload("me/forgot") as sent:
        code = main(["forget", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "tuned"), "--lam", "0.3",
                     "--out", str(tmp_path / "o"), "--push-to-hub", "me/forgot"])  # fmt: skip
    assert code == 0 and sent["repo_id"] == "me/forgot"
    assert {"model.safetensors", "config.json", "README.md"} <= sent["files"]
    card = sent["card"]
    for text in (
        "forgetting by parameter subtraction",
        "arXiv:2311.08011",
        "| lambda | 0.3 |",
        "- ivtrainer",
        "- forget",
    ):
        assert text in card, text
    assert "base_model:" not in card  # a local folder is not a Hub id: no claim in the metadata
    assert (tmp_path / "o" / "README.md").read_text() == card


def test_forget_function_writes_the_model_a_card_and_reports_the_delta(tmp_path, tokenizer):
    """The adapter route lives in the library: the CLI's result from Python, sizes included."""
    from transformers import AutoModelForCausalLM

    from ivtrainer.arithmetic import forget, subtract_adapter

    finetuned_pair(tmp_path, tokenizer)
    trained_adapter("llama", seed=1).save_pretrained(tmp_path / "a")
    trained_adapter("llama", seed=2).save_pretrained(tmp_path / "b")
    result = forget(
        tmp_path / "base", tmp_path / "o", adapters=[tmp_path / "a", tmp_path / "b"], lam=[0.5, 1.5]
    )
    expected = subtract_adapter(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), [tmp_path / "a", tmp_path / "b"], [0.5, 1.5]
    )
    got = weights(AutoModelForCausalLM.from_pretrained(result.path))
    for key, value in weights(expected).items():
        torch.testing.assert_close(got[key], value)
    assert result.path == (tmp_path / "o").resolve() and result.lambdas == [0.5, 1.5]
    assert result.tensors > 0 and result.relative > 0 and result.delta_norm > 0
    card = (tmp_path / "o" / "README.md").read_text()
    assert "(lambda 0.5)" in card and "(lambda 1.5)" in card

    tv = forget(tmp_path / "base", tmp_path / "t", finetuned=tmp_path / "tuned", lam=0.0)
    assert tv.delta_norm == 0 and tv.tensors > 0  # lambda 0: a no-op, and it shows


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "pass either adapters="),
        ({"adapters": "a", "finetuned": "b"}, "pass either adapters="),
        ({"adapters": "a", "lam": -1.0}, "lam must be >= 0"),
        ({"adapters": ["a", "b"], "lam": [1.0, 2.0, 3.0]}, "got 3 lambdas for 2 adapters"),
    ],
)
def test_forget_function_bad_input_before_any_work(tmp_path, kwargs, match):
    from ivtrainer.arithmetic import forget

    with pytest.raises(ValueError, match=match):
        forget(tmp_path / "base", tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()
