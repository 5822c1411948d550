"""Tokenising a prompt and its completion for training: the loss covers the completion only.

Plain text (``prompt`` + ``completion``) and conversations (``messages``, rendered with the
tokenizer's chat template: the loss covers the assistant turns) alike; the prompt is tokenised on
its own to find where the answer starts, as trl's and EasyEdit's fine-tuning baselines do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ivtrainer.errors import InvalidInputError

__all__ = ["encode_conversation", "encode_prompt_completion"]


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


def encode_conversation(tokenizer, messages: Sequence[dict[str, Any]], *, first_answer: int = 0) -> dict:
    """``input_ids``, ``attention_mask`` and ``labels`` of a conversation rendered with the
    tokenizer's chat template, the loss on its assistant turns (from message ``first_answer`` on:
    a conversational prompt/completion row's completion) and -100 elsewhere.

    Each assistant turn's tokens are found by rendering the conversation up to it with the
    template's generation prompt (what the model sees before it answers) and through it, so any
    template whose renderings extend each other works, with or without ``{% generation %}``
    markers. A turn covers what the template writes for it, its end-of-turn token included (so
    the model learns to stop)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError(
            "conversational data needs a tokenizer with a chat template (tokenizer.chat_template is unset)"
        )
    messages = list(messages)

    def ids(upto: int, generation_prompt: bool = False) -> list[int]:
        text = tokenizer.apply_chat_template(
            messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
        )
        # special tokens come from the template's text
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    full = ids(len(messages))
    labels = [-100] * len(full)
    for i, message in enumerate(messages):
        if i < first_answer or message.get("role") != "assistant":
            continue
        before, through = ids(i, generation_prompt=True), ids(i + 1)
        start, end = len(before), len(through)
        if through != full[:end] or before != full[:start]:
            raise InvalidInputError(
                "the chat template renders a conversation's beginning differently once it goes on (it is not "
                "prefix-preserving), so the assistant turns cannot be found in the tokens; use a template whose "
                "renderings extend each other, or prompt/completion text"
            )
        labels[start:end] = full[start:end]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}
