"""subtract_adapter: PEFT's own delta, several adapters, dtypes and refused adapters."""

import copy
import math

import pytest
import torch

from ivtrainer.arithmetic import AdapterMismatchError, subtract_adapter
from ivtrainer.testing import peft_subtraction, tiny_model
from tests.utils import TARGETS, trained_adapter, weights


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_set_scale_and_merge(model_type, use_rslora, tmp_path):
    trained = trained_adapter(model_type, use_rslora=use_rslora)
    trained.save_pretrained(tmp_path / "adapter")
    expected = weights(peft_subtraction(copy.deepcopy(trained), 0.7))
    result = subtract_adapter(tiny_model(model_type), tmp_path / "adapter", 0.7)
    from transformers import PreTrainedModel

    assert isinstance(result, PreTrainedModel) and not any("lora" in n for n, _ in result.named_modules())
    got = weights(result)
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    base = weights(tiny_model(model_type))
    changed = [k for k in got if not torch.equal(got[k], base[k])]
    assert changed and all(any(t in k for t in TARGETS[model_type]) or "lm_head" in k for k in changed)


def test_peft_model_input_and_explicit_delta():
    trained = trained_adapter("llama")
    base = tiny_model("llama")
    module = trained.base_model.model.model.layers[0].self_attn.q_proj
    delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
    result = subtract_adapter(trained, lam=2.0)
    torch.testing.assert_close(
        result.model.layers[0].self_attn.q_proj.weight,
        base.model.layers[0].self_attn.q_proj.weight - 2.0 * delta,
    )


def test_several_adapters_with_their_own_lambdas(tmp_path):
    a, b = trained_adapter("llama", seed=1), trained_adapter("llama", seed=2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    both = weights(subtract_adapter(tiny_model("llama"), [tmp_path / "a", tmp_path / "b"], [0.5, 1.5]))
    one_then_other = subtract_adapter(
        subtract_adapter(tiny_model("llama"), tmp_path / "a", 0.5), tmp_path / "b", 1.5
    )
    for key, value in weights(one_then_other).items():
        torch.testing.assert_close(both[key], value, atol=1e-6, rtol=1e-5)


def test_bfloat16_model_is_computed_in_float32(tmp_path):
    trained = trained_adapter("llama")
    trained.save_pretrained(tmp_path / "adapter")
    # The same bf16 base values, once kept in bf16 and once upcast to fp32.
    reference = weights(subtract_adapter(tiny_model("llama").bfloat16().float(), tmp_path / "adapter", 0.3))
    half = subtract_adapter(tiny_model("llama").bfloat16(), tmp_path / "adapter", 0.3)
    weight = half.model.layers[1].self_attn.o_proj.weight
    assert weight.dtype == torch.bfloat16
    # One rounding of the fp32 result, not a bf16 computation.
    assert torch.equal(weight, reference["model.layers.1.self_attn.o_proj.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("lam", [math.nan, math.inf, "0.3", True])
def test_bad_lambda(lam, tmp_path):
    trained_adapter("llama").save_pretrained(tmp_path / "adapter")
    model = tiny_model("llama")
    before = weights(model)
    with pytest.raises(ValueError, match="lambda must be a finite number"):
        subtract_adapter(model, tmp_path / "adapter", lam)
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())


def test_shape_mismatch_changes_nothing(tmp_path):
    trained_adapter("llama").save_pretrained(tmp_path / "adapter")
    other = tiny_model("llama", hidden_size=32, num_attention_heads=2)
    before = weights(other)
    with pytest.raises(AdapterMismatchError, match="does not fit this model"):
        subtract_adapter(other, tmp_path / "adapter", 0.5, check_base_model=False)
    assert not any("lora" in n for n, _ in other.named_modules())
    assert all(torch.equal(v, before[k]) for k, v in weights(other).items())


def test_dora_and_other_adapter_types_are_refused(tmp_path):
    from peft import IA3Config, get_peft_model

    trained_adapter("llama", use_dora=True).save_pretrained(tmp_path / "dora")
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
    trained = trained_adapter("llama")
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
    trained_adapter("llama").save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="got 2 lambdas for 1 adapters"):
        subtract_adapter(tiny_model("llama"), tmp_path / "adapter", [0.1, 0.2])
