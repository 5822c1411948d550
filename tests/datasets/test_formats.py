"""Dataset formats read from the columns, rows that cannot train, chats labelled on their assistant
turns (the same labels as trl's ``{% generation %}`` masks), and the IV's place in a chat."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from ivtrainer.datasets import formats
from ivtrainer.datasets.prompt_completion import encode_conversation
from ivtrainer.errors import InvalidInputError
from ivtrainer.steering.intervention import last_prompt_positions
from ivtrainer.testing import tiny_tokenizer

# ChatML with trl's generation markers around each assistant turn (what trl needs for
# assistant_only_loss); the tiny tokenizer's own template has none, like SmolLM2's.
MARKED_CHATML = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ message['content'] }}<|im_end|>\n{% endgeneration %}{% else %}<|im_start|>"
    "{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hot"},
    {"role": "assistant", "content": "cold"},
    {"role": "user", "content": "up"},
    {"role": "assistant", "content": "down"},
]


@pytest.mark.parametrize(
    ("rows", "name"),
    [
        ([{"messages": CHAT}], "conversational"),
        ([{"prompt": CHAT[:2], "completion": CHAT[2:3]}], "conversational prompt-completion"),
        ([{"prompt": "Q: hot\nA:", "completion": " cold"}], "prompt-completion"),
        ([{"input": "hot", "output": "cold"}], "input-output"),
        ([{"text": "hot cold"}], "language modeling"),
        ([{"input_ids": [1, 2], "labels": [-100, 2]}], "tokenized"),
        ([{"prompt": "p", "ground_truth": "a", "target_new": "b", "subject": "s"}], "knowledge edits"),
        ([{"src": "q", "alt": "b", "answers": ["a"]}], "knowledge edits"),
    ],
)
def test_the_format_is_read_from_the_columns(rows, name):
    assert formats.detect_format(Dataset.from_list(rows)).name == name


def test_unknown_columns_are_named():
    with pytest.raises(InvalidInputError, match=r"columns \['answer', 'question'\]: give 'messages'"):
        formats.detect_format(Dataset.from_list([{"question": "q", "answer": "a"}]))


def test_rows_that_cannot_train_are_found():
    chats = Dataset.from_list(
        [
            {"messages": CHAT},
            {"messages": CHAT[:2]},  # ends on the user
            {"messages": [*CHAT[:2], {"role": "assistant", "content": ""}]},  # an empty answer
        ]
    )
    assert formats.usable_rows(chats, formats.MESSAGES) == [0]
    pairs = Dataset.from_list([{"prompt": "a", "completion": " b"}, {"prompt": "a", "completion": "  "}])
    assert formats.usable_rows(pairs, formats.PROMPT_COMPLETION) == [0]


def _labelled(tokenizer, encoded) -> str:
    return tokenizer.decode(
        [t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=False) if label != -100]
    )


def test_a_chat_is_labelled_on_its_assistant_turns():
    tokenizer = tiny_tokenizer()
    encoded = encode_conversation(tokenizer, CHAT)
    assert tokenizer.decode(encoded["input_ids"]) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert _labelled(tokenizer, encoded) == "cold<|im_end|>\ndown<|im_end|>\n"
    later = encode_conversation(tokenizer, CHAT, first_answer=3)  # a completion's turns only
    assert _labelled(tokenizer, later) == "down<|im_end|>\n"


def test_the_labels_equal_trls_generation_masks():
    """On a template with {% generation %} markers, trl's assistant masks and ivtrainer's prefix
    rendering (which needs no markers) label the same tokens."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = MARKED_CHATML
    trl_side = tokenizer.apply_chat_template(
        CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ours = encode_conversation(tokenizer, CHAT)
    assert ours["input_ids"] == list(trl_side["input_ids"])
    want = [
        t if m else -100 for t, m in zip(trl_side["input_ids"], trl_side["assistant_masks"], strict=False)
    ]
    assert ours["labels"] == want


def test_the_iv_goes_on_the_token_before_each_answer():
    """last_prompt, computed from the labels, against positions found by decoding: the last token
    of each ``<|im_start|>assistant\\n`` generation prompt."""
    tokenizer = tiny_tokenizer()
    encoded = encode_conversation(tokenizer, CHAT)
    ids = encoded["input_ids"]
    by_hand = [
        p for p in range(len(ids))
        if tokenizer.decode(ids[: p + 1]).endswith("<|im_start|>assistant\n")
        and not tokenizer.decode(ids[:p]).endswith("<|im_start|>assistant\n")
    ]  # fmt: skip
    assert len(by_hand) == 2
    got = last_prompt_positions(torch.tensor([encoded["labels"]]))[0].nonzero().flatten().tolist()
    assert got == by_hand


def test_templates_that_are_not_prefix_preserving_are_refused():
    tokenizer = tiny_tokenizer()
    # drops earlier assistant turns' content once the chat goes on (as some thinking templates do)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}"
    )
    with pytest.raises(InvalidInputError, match="not prefix-preserving"):
        encode_conversation(tokenizer, CHAT)
    with pytest.raises(InvalidInputError, match="chat template"):
        encode_conversation(tiny_tokenizer(chat_template=False), CHAT)


def test_text_rows_tokenised_for_a_trainer():
    tokenizer = tiny_tokenizer()
    rows = Dataset.from_list([{"input": "hot", "output": "cold"}])
    (row,) = formats.tokenize_rows(rows, tokenizer)
    assert _labelled(tokenizer, row) == " cold<|endoftext|>"
    (text,) = formats.tokenize_rows(Dataset.from_list([{"text": "hot cold"}]), tokenizer)
    assert text["labels"] == text["input_ids"]
    (pair,) = formats.as_prompt_completion(rows)
    assert pair == {"prompt": "hot", "completion": " cold"}
