import copy
import json
import math

import pytest
import torch

from ivtrainer.arithmetic.parameter_arithmetic import AdapterMismatchError, subtract_adapter
from ivtrainer.testing import peft_subtraction, tiny_model

TARGETS = {"llama": ["q_proj", "o_proj", "embed_tokens"], "gpt2": ["c_attn", "c_proj"]}


def _trained_adapter(model_type, *, seed=0, use_rslora=False, **kwargs):
    """A LoRA adapter with random (non-zero) B, as after training."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[model_type],
        fan_in_fan_out=model_type == "gpt2",
        use_rslora=use_rslora,
        **kwargs,
    )
    peft_model = get_peft_model(tiny_model(model_type), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return peft_model


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_set_scale_and_merge(model_type, use_rslora, tmp_path):
    trained = _trained_adapter(model_type, use_rslora=use_rslora)
    trained.save_pretrained(tmp_path / "adapter")
    expected = _weights(peft_subtraction(copy.deepcopy(trained), 0.7))
    result = subtract_adapter(tiny_model(model_type), tmp_path / "adapter", 0.7)
    from transformers import PreTrainedModel

    assert isinstance(result, PreTrainedModel) and not any("lora" in n for n, _ in result.named_modules())
    got = _weights(result)
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    base = _weights(tiny_model(model_type))
    changed = [k for k in got if not torch.equal(got[k], base[k])]
    assert changed and all(any(t in k for t in TARGETS[model_type]) or "lm_head" in k for k in changed)


def test_peft_model_input_and_explicit_delta():
    trained = _trained_adapter("llama")
    base = tiny_model("llama")
    module = trained.base_model.model.model.layers[0].self_attn.q_proj
    delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
    result = subtract_adapter(trained, lam=2.0)
    torch.testing.assert_close(
        result.model.layers[0].self_attn.q_proj.weight,
        base.model.layers[0].self_attn.q_proj.weight - 2.0 * delta,
    )


def test_several_adapters_with_their_own_lambdas(tmp_path):
    a, b = _trained_adapter("llama", seed=1), _trained_adapter("llama", seed=2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    both = _weights(subtract_adapter(tiny_model("llama"), [tmp_path / "a", tmp_path / "b"], [0.5, 1.5]))
    one_then_other = subtract_adapter(
        subtract_adapter(tiny_model("llama"), tmp_path / "a", 0.5), tmp_path / "b", 1.5
    )
    for key, value in _weights(one_then_other).items():
        torch.testing.assert_close(both[key], value, atol=1e-6, rtol=1e-5)


def test_bfloat16_model_is_computed_in_float32(tmp_path):
    trained = _trained_adapter("llama")
    trained.save_pretrained(tmp_path / "adapter")
    # The same bf16 base values, once kept in bf16 and once upcast to fp32.
    reference = _weights(subtract_adapter(tiny_model("llama").bfloat16().float(), tmp_path / "adapter", 0.3))
    half = subtract_adapter(tiny_model("llama").bfloat16(), tmp_path / "adapter", 0.3)
    weight = half.model.layers[1].self_attn.o_proj.weight
    assert weight.dtype == torch.bfloat16
    # One rounding of the fp32 result, not a bf16 computation.
    assert torch.equal(weight, reference["model.layers.1.self_attn.o_proj.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("lam", [math.nan, math.inf, "0.3", True])
def test_bad_lambda(lam, tmp_path):
    _trained_adapter("llama").save_pretrained(tmp_path / "adapter")
    model = tiny_model("llama")
    before = _weights(model)
    with pytest.raises(ValueError, match="lambda must be a finite number"):
        subtract_adapter(model, tmp_path / "adapter", lam)
    assert all(torch.equal(v, before[k]) for k, v in _weights(model).items())


def test_shape_mismatch_changes_nothing(tmp_path):
    _trained_adapter("llama").save_pretrained(tmp_path / "adapter")
    other = tiny_model("llama", hidden_size=32, num_attention_heads=2)
    before = _weights(other)
    with pytest.raises(AdapterMismatchError, match="does not fit this model"):
        subtract_adapter(other, tmp_path / "adapter", 0.5, check_base_model=False)
    assert not any("lora" in n for n, _ in other.named_modules())
    assert all(torch.equal(v, before[k]) for k, v in _weights(other).items())


def test_dora_and_other_adapter_types_are_refused(tmp_path):
    from peft import IA3Config, get_peft_model

    _trained_adapter("llama", use_dora=True).save_pretrained(tmp_path / "dora")
    with pytest.raises(AdapterMismatchError, match="uses DoRA"):
        subtract_adapter(tiny_model("llama"), tmp_path / "dora", 0.5)
    ia3 = get_peft_model(
        tiny_model("llama"),
        IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterMismatchError, match="is a IA3 adapter; only LoRA"):
        subtract_adapter(tiny_model("llama"), tmp_path / "ia3", 0.5)


def test_adapter_for_another_base_model(tmp_path):
    trained = _trained_adapter("llama")
    trained.peft_config["default"].base_model_name_or_path = "someone/another-model"
    trained.save_pretrained(tmp_path / "adapter")
    model = tiny_model("llama")
    model.config._name_or_path = "me/my-model"
    with pytest.raises(AdapterMismatchError, match="was trained on 'someone/another-model'"):
        subtract_adapter(model, tmp_path / "adapter", 0.5)
    subtract_adapter(model, tmp_path / "adapter", 0.5, check_base_model=False)  # explicit override works


def test_missing_adapter_and_lambda_count(tmp_path):
    from ivtrainer.errors import InputNotFoundError

    with pytest.raises(InputNotFoundError, match="not an existing folder"):  # never a Hub download
        subtract_adapter(tiny_model("llama"), tmp_path / "nothing", 0.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterMismatchError, match="cannot read a PEFT adapter"):
        subtract_adapter(tiny_model("llama"), tmp_path / "empty", 0.5)
    _trained_adapter("llama").save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="got 2 lambdas for 1 adapters"):
        subtract_adapter(tiny_model("llama"), tmp_path / "adapter", [0.1, 0.2])


# -- subtract_task_vector ------------------------------------------------------------------------


def _finetuned_pair(tmp_path, tokenizer, dtype=torch.float32, **save_kwargs):
    base = tiny_model("llama").to(dtype)
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_((torch.randn(param.shape, generator=generator) * 0.05).to(dtype))
    base.save_pretrained(tmp_path / "base", **save_kwargs)
    tokenizer.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned", **save_kwargs)
    return base, tuned


@pytest.mark.parametrize("save_kwargs", [{}, {"max_shard_size": "40KB"}])
def test_task_vector_formula_and_files(tmp_path, tokenizer, save_kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ivtrainer.arithmetic.parameter_arithmetic import subtract_task_vector

    base, tuned = _finetuned_pair(tmp_path, tokenizer, **save_kwargs)
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

    from ivtrainer.arithmetic.parameter_arithmetic import subtract_task_vector

    base, tuned = _finetuned_pair(tmp_path, tokenizer, dtype=torch.bfloat16)
    out = subtract_task_vector(tmp_path / "base", tmp_path / "tuned", 1.5, tmp_path / "out")
    got = load_file(out / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    b = base.model.layers[0].mlp.up_proj.weight.float()
    t = tuned.model.layers[0].mlp.up_proj.weight.float()
    assert got.dtype == torch.bfloat16 and torch.equal(got, (b - 1.5 * (t - b)).bfloat16())


def test_task_vector_bad_input_writes_nothing(tmp_path, tokenizer):
    from ivtrainer.arithmetic.parameter_arithmetic import subtract_task_vector

    _finetuned_pair(tmp_path, tokenizer)
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


# -- ivtrainer forget ------------------------------------------------------------------------------


def _cli(*args):
    import os
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "ivtrainer")
    return subprocess.run([exe, "forget", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_cli_forget_adapter_and_task_vector(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    _finetuned_pair(tmp_path, tokenizer)
    _trained_adapter("llama").save_pretrained(tmp_path / "adapter")
    result = _cli(
        "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", "--lam", 0.3, "--out", tmp_path / "o"
    )
    assert result.returncode == 0, result.stderr
    expected = subtract_adapter(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter", 0.3
    )
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    for key, value in _weights(expected).items():
        torch.testing.assert_close(_weights(got)[key], value)
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

    _finetuned_pair(tmp_path, tokenizer)
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
