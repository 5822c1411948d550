import logging
import random

import pytest
import torch

from ivtrainer.datasets.tasks import load_task
from ivtrainer.errors import InvalidInputError
from ivtrainer.evaluation.predictions import target_predictions
from ivtrainer.modeling import shared_prefix
from ivtrainer.steering.icl import PromptBuilder, last_token_forward, shared_prefix_forward
from ivtrainer.testing import tiny_model


@pytest.fixture(scope="module")
def fixed(tokenizer):
    held = load_task("antonym", "held_out")
    return PromptBuilder(tokenizer).sample(
        load_task("antonym"), 10, 5, random.Random(0), queries=held, fixed_demos=True
    )


def test_fixed_demos_are_the_same_before_every_query_and_never_a_query(tokenizer):
    held = load_task("antonym", "held_out")[:6]
    builder = PromptBuilder(tokenizer)
    prompts = builder.sample(load_task("antonym"), 6, 5, random.Random(0), queries=held, fixed_demos=True)
    texts = [tokenizer.decode(p.input_ids) for p in prompts]
    demos = texts[0].rsplit("\n\nQ:", 1)[0]
    assert all(t.rsplit("\n\nQ:", 1)[0] == demos for t in texts)
    assert all(f"Q: {q['input']}\n" not in demos for q in held)
    assert [t.rsplit("Q: ", 1)[1] for t in texts] == [f"{q['input']}\nA:" for q in held]
    with pytest.raises(InvalidInputError, match="fixed_demos needs queries"):
        builder.sample(load_task("antonym"), 6, 5, random.Random(0), fixed_demos=True)


# gpt2 has no logits_to_keep; gemma2's sliding-window cache cannot be rolled back (the fallback)
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "gemma2"])
def test_shared_prefix_forward_equals_plain_forwards(model_type, fixed, monkeypatch):
    model = tiny_model(model_type)
    reference = last_token_forward(model, fixed, batch_size=4)
    # three tree steps, the cache rolled back to the prefix between them
    monkeypatch.setattr(shared_prefix, "_chunks", lambda lengths, _: [range(0, 4), range(4, 8), range(8, 10)])
    shared = shared_prefix_forward(model, fixed)
    torch.testing.assert_close(shared, reference, atol=1e-4, rtol=1e-4)
    assert shared_prefix.common_prefix([p.input_ids for p in fixed]) > 40  # the five demonstrations


def test_shared_prefix_forward_falls_back_when_the_tree_step_is_wrong(fixed, monkeypatch, caplog):
    model = tiny_model("llama")
    reference = last_token_forward(model, fixed)
    zeros = lambda m, cache, n, suffixes, wanted: [torch.zeros(len(w), reference.shape[1]) for w in wanted]  # noqa: E731
    monkeypatch.setattr(shared_prefix, "_tree_step", zeros)
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(shared_prefix_forward(model, fixed), reference)
    assert "differs from the plain forward" in caplog.text


def test_prompts_without_a_long_common_prefix_run_plain(tokenizer, monkeypatch):
    model = tiny_model("llama")
    prompts = PromptBuilder(tokenizer).sample(load_task("antonym"), 6, 3, random.Random(0))
    assert shared_prefix.common_prefix([p.input_ids for p in prompts]) < 8
    monkeypatch.setattr(shared_prefix, "_tree_step", None)  # never reached
    torch.testing.assert_close(shared_prefix_forward(model, prompts), last_token_forward(model, prompts))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_target_predictions_do_not_depend_on_batching(model_type, tokenizer):
    model = tiny_model(model_type)
    pairs = load_task("antonym")[:9]
    prompts = [f"Q: {p['input']}\nA:" for p in pairs]
    targets = [f"{p['output']} and more words" if i % 3 == 0 else p["output"] for i, p in enumerate(pairs)]
    one = target_predictions(model, tokenizer, prompts, targets, batch_size=1)
    assert target_predictions(model, tokenizer, prompts, targets, batch_size=4) == one
    assert [len(p) for p, _ in one] == [len(t) for _, t in one]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_target_predictions_with_a_shared_prefix_equal_plain_batches(model_type, tokenizer):
    model = tiny_model(model_type)
    pairs = load_task("antonym")[:12]
    prompts = [f"Task: opposite of the word\nInput: {p['input']}\nOutput:" for p in pairs]
    targets = [p["output"] for p in pairs]
    plain = target_predictions(model, tokenizer, prompts, targets)
    assert target_predictions(model, tokenizer, prompts, targets, shared_prefix=True) == plain


def test_chunks_hold_about_max_tokens_and_every_sequence_once():
    assert shared_prefix._chunks([3, 3, 3, 10, 1], 6) == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert shared_prefix._chunks([], 6) == []
