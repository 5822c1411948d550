import pytest
import torch

from ivtrainer.modeling.architectures import get_layout
from ivtrainer.steering.intervention import add_to_residual
from ivtrainer.testing import tiny_model

LAYER = 1


def _edit_layer_output(model, layer, **inputs):
    out = {}
    handle = get_layout(model).layers[layer].register_forward_hook(lambda m, a, o: out.setdefault("h", o))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return out["h"][0] if isinstance(out["h"], tuple) else out["h"]


def _batch(padding_side):
    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    if padding_side == "left":
        ids, mask = (
            torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]]),
            torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]),
        )
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_adds_at_the_last_real_token(model_type, padding_side):
    model = tiny_model(model_type)
    vector = torch.randn(64, generator=torch.Generator().manual_seed(0))
    batch = _batch(padding_side)
    before = _edit_layer_output(model, LAYER, **batch)
    with add_to_residual(model, [(LAYER, vector)], strength=2.5):
        after = _edit_layer_output(model, LAYER, **batch)
    expected = torch.zeros_like(before)
    last = [4, 4] if padding_side == "left" else [4, 2]
    for row, col in enumerate(last):
        expected[row, col] = 2.5 * vector
    torch.testing.assert_close(after - before, expected, atol=1e-5, rtol=0)


def test_all_positions_and_masks():
    model = tiny_model("llama")
    vector = torch.ones(64)
    batch = _batch("right")
    before = _edit_layer_output(model, LAYER, **batch)
    with add_to_residual(model, [(LAYER, vector)], positions="all"):
        diff = _edit_layer_output(model, LAYER, **batch) - before
    torch.testing.assert_close(diff[..., 0], batch["attention_mask"].float(), atol=1e-5, rtol=0)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = True
    with add_to_residual(model, [(LAYER, vector)], positions=mask):
        diff = _edit_layer_output(model, LAYER, **batch) - before
    torch.testing.assert_close(diff[..., 0], mask.float(), atol=1e-5, rtol=0)


def test_strength_changes_between_forwards():
    model = tiny_model("qwen2")
    vector = torch.ones(64)
    batch = {"input_ids": torch.tensor([[3, 4, 5]])}
    before = _edit_layer_output(model, LAYER, **batch)
    with add_to_residual(model, [(LAYER, vector)], strength=1.0) as handle:
        first = _edit_layer_output(model, LAYER, **batch)
        handle.strength = 0.25
        second = _edit_layer_output(model, LAYER, **batch)
    assert (first - before)[0, -1, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert (second - before)[0, -1, 0].item() == pytest.approx(0.25, abs=1e-5)


def test_hooks_removed_on_error():
    model = tiny_model("llama")
    layout = get_layout(model)
    with pytest.raises(KeyError), add_to_residual(model, [(LAYER, torch.ones(64))]):
        raise KeyError("boom")
    assert not layout.layers[LAYER]._forward_hooks and not model._forward_pre_hooks


def test_peft_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "o_proj"]))
    batch = _batch("right")
    before = _edit_layer_output(model, LAYER, **batch)
    with add_to_residual(model, [(LAYER, torch.ones(64))]):
        diff = _edit_layer_output(model, LAYER, **batch) - before
    assert diff[0, 4, 0].item() == pytest.approx(1.0, abs=1e-5) and diff[1, 2, 0].item() == pytest.approx(
        1.0, abs=1e-5
    )
    assert diff.abs().sum().item() == pytest.approx(2 * 64, rel=1e-4)


def test_same_gradients_under_gradient_checkpointing():
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "labels": torch.tensor([[3, 4, 5, 6]])}

    def grads(checkpointing):
        model = tiny_model("llama").train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with add_to_residual(model, [(LAYER, vector)], strength=3.0):
            model(**batch).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    torch.testing.assert_close(grads(True), grads(False))


def test_batched_generation_matches_single_rows(tokenizer):
    model = tiny_model("llama")
    vector = 4 * torch.randn(64, generator=torch.Generator().manual_seed(2))
    tokenizer.padding_side = "left"
    texts = ["Q: hot\nA:", "Q: a much longer question here\nA:"]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with add_to_residual(model, [(LAYER, vector)]):
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        together = model.generate(**batch, **kwargs)[:, -4:]
        alone = [model.generate(**tokenizer([t], return_tensors="pt"), **kwargs)[0, -4:] for t in texts]
    plain = model.generate(**tokenizer([texts[0]], return_tensors="pt"), **kwargs)[0, -4:]
    assert torch.equal(together, torch.stack(alone))
    assert not torch.equal(plain, alone[0])  # the vector does change the generation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"positions": "first"}, "positions must be 'last', 'all'"),
        ({"positions": torch.ones(3, dtype=torch.bool)}, r"must be \(batch, seq\)"),
    ],
)
def test_bad_positions(kwargs, message):
    with (
        pytest.raises(ValueError, match=message),
        add_to_residual(tiny_model("llama"), [(0, torch.ones(64))], **kwargs),
    ):
        pass


def test_bad_layer_or_vector():
    model = tiny_model("llama")
    with (
        pytest.raises(ValueError, match="layer 3 is out of range"),
        add_to_residual(model, [(3, torch.ones(64))]),
    ):
        pass
    with pytest.raises(ValueError, match="hidden size is 64"), add_to_residual(model, [(0, torch.ones(65))]):
        pass
