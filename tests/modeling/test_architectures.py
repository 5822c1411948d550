import pytest
import torch
from torch import nn

import ivtrainer
from ivtrainer.errors import UnsupportedArchitectureError
from ivtrainer.modeling.architectures import ARCHITECTURES, get_layout, register_architecture, unwrap_model
from ivtrainer.modeling.hooks import record_head_outputs
from ivtrainer.testing import TINY_ARCHITECTURES, tiny_model

EXPECTED = {  # model_type -> (attention output path in layer 0, head_dim)
    "llama": ("model.layers.0.self_attn.o_proj", 16),
    "mistral": ("model.layers.0.self_attn.o_proj", 16),
    "qwen2": ("model.layers.0.self_attn.o_proj", 16),
    "qwen3": ("model.layers.0.self_attn.o_proj", 16),
    "gemma": ("model.layers.0.self_attn.o_proj", 32),
    "gemma2": ("model.layers.0.self_attn.o_proj", 24),
    "gemma3_text": ("model.layers.0.self_attn.o_proj", 24),
    "phi3": ("model.layers.0.self_attn.o_proj", 16),
    "gpt2": ("transformer.h.0.attn.c_proj", 16),
    "gpt_neox": ("gpt_neox.layers.0.attention.dense", 16),
}


@pytest.fixture
def restore_registry():
    saved = dict(ARCHITECTURES)
    yield
    ARCHITECTURES.clear()
    ARCHITECTURES.update(saved)


def _ids(batch=2, seq=7, vocab=320):
    return torch.randint(1, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def test_every_tiny_family_is_checked():
    assert set(EXPECTED) == set(TINY_ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_layout_and_head_capture(model_type):
    model = tiny_model(model_type)
    layout = get_layout(model)
    path, head_dim = EXPECTED[model_type]
    assert (layout.n_layers, layout.n_heads, layout.head_dim, layout.hidden_size) == (3, 4, head_dim, 64)
    assert layout.attn_output_names[0] == path
    assert layout.attn_outputs[2] is model.get_submodule(path.replace(".0.", ".2."))
    assert layout.layers[1] is model.get_submodule(layout.layer_names[1])

    with record_head_outputs(model) as heads:
        model(_ids())
    assert sorted(heads) == [0, 1, 2]
    for h in heads.values():
        assert h.shape == (2, 7, 4, head_dim)
    # The captured tensor is the projection's input: projecting it gives the attention output.
    outputs = {}
    handle = layout.attn_outputs[1].register_forward_hook(lambda m, a, o: outputs.setdefault(1, o))
    with record_head_outputs(model, layers=[1]) as heads:
        model(_ids())
    handle.remove()
    torch.testing.assert_close(layout.attn_outputs[1](heads[1].flatten(-2)), outputs[1])


def test_gemma3_multimodal_wrapper():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from ivtrainer.testing import tiny_config

    config = Gemma3Config(
        text_config=tiny_config("gemma3_text").to_dict(),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
    )
    layout = get_layout(Gemma3ForConditionalGeneration(config))
    assert layout.model_type == "gemma3"
    assert (layout.n_layers, layout.n_heads, layout.head_dim) == (3, 4, 24)
    assert layout.attn_output_names[0] == "model.language_model.layers.0.self_attn.o_proj"


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_peft_wrapped(model_type):
    from peft import LoraConfig, get_peft_model

    target = {"llama": ["o_proj", "q_proj"], "gpt2": ["c_proj", "c_attn"]}[model_type]
    model = get_peft_model(
        tiny_model(model_type), LoraConfig(r=2, target_modules=target, fan_in_fan_out=model_type == "gpt2")
    )
    layout = get_layout(model)
    assert layout.attn_output_names[0] == "base_model.model." + EXPECTED[model_type][0]
    assert layout.attn_outputs[0] is model.get_submodule(layout.attn_output_names[0])
    assert hasattr(layout.attn_outputs[0], "lora_A")  # the LoRA wrapper: same input as the base layer
    with record_head_outputs(model) as heads:
        model(input_ids=_ids())
    assert heads[0].shape == (2, 7, 4, 16)


def test_compiled_wrapped():
    model = tiny_model("qwen2")
    compiled = torch.compile(model)  # compiles lazily: never called here
    assert unwrap_model(compiled) is model
    layout = get_layout(compiled)
    assert (
        layout.attn_output_names[0] == "_orig_mod.model.layers.0.self_attn.o_proj"
    )  # names inside `compiled`
    assert layout.attn_outputs[0] is compiled.get_submodule(layout.attn_output_names[0])


def test_deepspeed_engine_wrapped(monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    }
    try:
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config, dist_init_required=True
        )
        layout = get_layout(engine)
        assert unwrap_model(engine) is model.get_base_model()
        assert layout.n_layers == 3
        assert layout.attn_output_names[0] == "module.base_model.model.model.layers.0.self_attn.o_proj"
        assert layout.attn_outputs[0] is engine.get_submodule(layout.attn_output_names[0])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_unsupported_architecture_lists_what_was_found():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=4))
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_layout(model)
    message = str(info.value)
    assert "'mamba'" in message and "backbone.layers (2 x MambaBlock" in message
    assert "register_architecture('mamba'" in message
    assert "\n" not in message


def test_register_new_architecture(restore_registry):
    from transformers import GPTJConfig, GPTJForCausalLM

    model = GPTJForCausalLM(GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=320))
    with pytest.raises(UnsupportedArchitectureError, match=r"transformer\.h \(2 x GPTJBlock.*out_proj"):
        get_layout(model)
    ivtrainer.register_architecture("gptj", layers="transformer.h", attn_output="attn.out_proj")
    layout = get_layout(model)
    assert (layout.n_layers, layout.n_heads, layout.head_dim) == (2, 4, 16)
    with record_head_outputs(model) as heads:
        model(_ids())
    assert heads[1].shape == (2, 7, 4, 16)


def test_register_refuses_silent_overwrite(restore_registry):
    with pytest.raises(ValueError, match="overwrite=True"):
        register_architecture("llama", layers="model.layers", attn_output="mlp.down_proj")
    register_architecture("llama", layers="model.layers", attn_output="self_attn.o_proj")  # same: fine


def test_wrong_module_is_caught_by_its_width(restore_registry):
    register_architecture("llama", layers="model.layers", attn_output="mlp.down_proj", overwrite=True)
    with pytest.raises(
        UnsupportedArchitectureError, match="takes 128 features, expected n_heads x head_dim = 4 x 16"
    ):
        get_layout(tiny_model("llama"))


def test_unregistered_type_with_known_layout_is_detected():
    from transformers import OlmoConfig, OlmoForCausalLM

    assert "olmo" not in ARCHITECTURES
    model = OlmoForCausalLM(
        OlmoConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=320,
            pad_token_id=0,
        )
    )
    assert get_layout(model).attn_output_names[1] == "model.layers.1.self_attn.o_proj"


def test_not_a_transformers_model():
    with pytest.raises(UnsupportedArchitectureError, match=r"has no `\.config`"):
        get_layout(nn.Linear(2, 2))


def test_hooks_are_removed_even_when_the_body_raises():
    model = tiny_model("llama")
    layout = get_layout(model)
    with pytest.raises(RuntimeError, match="boom"), record_head_outputs(model):
        assert all(len(m._forward_pre_hooks) == 1 for m in layout.attn_outputs)
        raise RuntimeError("boom")
    assert all(len(m._forward_pre_hooks) == 0 for m in layout.attn_outputs)


def test_capture_under_gradient_checkpointing():
    model = tiny_model("llama").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    with record_head_outputs(model, layers=[0]) as heads:
        handle = get_layout(model).attn_outputs[0].register_forward_pre_hook(lambda m, a: calls.append(1))
        model(_ids(), labels=_ids()).loss.backward()
        handle.remove()
    assert len(calls) == 2  # forward + recompute: the capture must not depend on the call count
    assert heads[0].shape == (2, 7, 4, 16)


def test_describe():
    text = get_layout(tiny_model("gpt2")).describe()
    assert "layers x heads 3 x 4 (head_dim 16, hidden 64)" in text
    assert "transformer.h.{0..2}.attn.c_proj (Conv1D)" in text
