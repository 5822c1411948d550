"""Tokenising a prompt and its completion for training: the loss covers the completion only."""

from __future__ import annotations

__all__ = ["encode_prompt_completion"]


def encode_prompt_completion(tokenizer, prompt: str, completion: str, *, add_eos: bool = False) -> dict:
    """``input_ids``, ``attention_mask`` and ``labels`` of ``prompt + completion`` (plus EOS when
    ``add_eos``), with the prompt's tokens labelled -100. The prompt is tokenised on its own to
    find where the completion starts, as trl's and EasyEdit's fine-tuning baselines do."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    full = tokenizer(prompt + completion)["input_ids"] + eos
    return {
        "input_ids": full,
        "attention_mask": [1] * len(full),
        "labels": [-100] * len(prompt_ids) + full[len(prompt_ids) :],
    }
