import random

import pytest
import torch

from ivtrainer.datasets.tasks import load_task
from ivtrainer.errors import InvalidInputError
from ivtrainer.modeling.architectures import get_layout
from ivtrainer.modeling.hooks import hooks, record_head_outputs
from ivtrainer.steering.icl import PromptBuilder
from ivtrainer.steering.mediation import cie_atp, cie_exact, cie_reference, mean_head_activations
from ivtrainer.testing import tiny_model


@pytest.fixture(scope="module")
def prompts(tokenizer):
    builder = PromptBuilder(tokenizer)
    rng = random.Random(0)
    examples = load_task("antonym")
    clean = builder.sample(examples, 6, 3, rng)
    corrupted = builder.sample(examples, 2, 3, rng, shuffle_labels=True)
    return clean, corrupted


def _relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# gemma2's sliding-window cache cannot be rolled back: it exercises the batched fallback.
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "gpt_neox", "gemma", "gemma2"])
def test_exact_matches_the_reference_loop(model_type, prompts):
    clean, corrupted = prompts
    model = tiny_model(model_type)
    layout = get_layout(model)
    mean = mean_head_activations(model, layout, clean, batch_size=4)
    for prompt in corrupted:
        reference = cie_reference(model, layout, prompt, mean)
        assert reference.abs().max() > 0
        assert _relative_error(cie_exact(model, layout, prompt, mean), reference) < 1e-3
        # several chunks of rows, with the cache rolled back between them
        assert _relative_error(cie_exact(model, layout, prompt, mean, max_rows=5), reference) < 1e-3


def test_mean_activations_do_not_depend_on_batching(prompts):
    clean, _ = prompts
    model = tiny_model("llama")
    layout = get_layout(model)
    one = mean_head_activations(model, layout, clean, batch_size=1)
    torch.testing.assert_close(
        mean_head_activations(model, layout, clean, batch_size=4), one, atol=1e-5, rtol=1e-4
    )
    assert one.shape == (3, 4, 16)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_mean_activations_equal_a_full_forward_and_stop_at_the_deepest_layer(model_type, prompts):
    clean, _ = prompts
    model = tiny_model(model_type)
    layout = get_layout(model)
    expected = torch.zeros(layout.n_layers, layout.n_heads, layout.head_dim)
    for prompt in clean:
        with record_head_outputs(model) as heads:
            model(input_ids=torch.tensor([prompt.input_ids]))
        expected += torch.stack([heads[i][0, -1] for i in range(layout.n_layers)]) / len(clean)
    torch.testing.assert_close(mean_head_activations(model, layout, clean, batch_size=4), expected)

    calls = []
    with hooks(layout.layers[-1].register_forward_hook(lambda *_: calls.append(1))):
        shallow = mean_head_activations(model, layout, clean, layers=[1, 0], batch_size=4)
    assert calls == []  # the forward ended at layer 1: the last layer never ran
    torch.testing.assert_close(shallow[:2], expected[:2])
    assert not shallow[2:].any()


def test_mean_activations_refuse_layers_out_of_range(prompts):
    model = tiny_model("llama")
    with pytest.raises(InvalidInputError, match=r"layers must be non-empty and in \[0, 3\)"):
        mean_head_activations(model, get_layout(model), prompts[0], layers=[3])


def test_atp_tracks_exact(prompts):
    clean, corrupted = prompts
    model = tiny_model("llama")
    layout = get_layout(model)
    mean = mean_head_activations(model, layout, clean)
    exact = cie_exact(model, layout, corrupted[0], mean)
    atp = cie_atp(model, layout, corrupted[0], mean)
    assert torch.corrcoef(torch.stack([exact.flatten(), atp.flatten()]))[0, 1] > 0.9
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients accumulated


def test_atp_on_frozen_model(prompts):
    clean, corrupted = prompts
    model = tiny_model("gpt2").requires_grad_(False)
    layout = get_layout(model)
    mean = mean_head_activations(model, layout, clean)
    assert cie_atp(model, layout, corrupted[0], mean).abs().sum() > 0


def test_shuffled_labels_break_the_mapping(tokenizer):
    builder = PromptBuilder(tokenizer)
    demos_seen = []
    builder.encode = lambda demos, query: demos_seen.append(demos)  # inspect what would be encoded
    builder.sample(load_task("antonym"), 20, 5, random.Random(0), shuffle_labels=True)
    truth = {e["input"]: e["output"] for e in load_task("antonym", "all")}
    wrong = sum(d["output"] != truth[d["input"]] for demos in demos_seen for d in demos)
    assert wrong >= 0.6 * 20 * 5
