"""What a training dataset's rows are, read from its columns, and the rows tokenised for a
``Trainer``: the dataset types trl documents (conversational ``messages``, prompt/completion plain
or conversational, ``text``), ivtrainer's task files (``input``/``output``), knowledge-edit records
(CounterFact, ZsRE) and rows already tokenised."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ivtrainer.datasets.prompt_completion import encode_conversation, encode_prompt_completion
from ivtrainer.errors import InvalidInputError

__all__ = [
    "CONVERSATIONAL_PROMPT_COMPLETION",
    "EDITS",
    "INPUT_OUTPUT",
    "MESSAGES",
    "PROMPT_COMPLETION",
    "TEXT",
    "TOKENIZED",
    "DataFormat",
    "as_prompt_completion",
    "detect_format",
    "tokenize_rows",
    "usable_rows",
]


@dataclasses.dataclass(frozen=True)
class DataFormat:
    """A dataset's format: its ``name`` (as logged), whether its rows are conversations, and
    whether they mark where the answer starts (the loss then covers the answers only, and
    IV-guided training has a place for the IV: the token before the answer)."""

    name: str
    conversational: bool
    has_answer: bool
    description: str

    def __str__(self) -> str:
        return f"{self.name} ({self.description})"


MESSAGES = DataFormat(
    "conversational",
    True,
    True,
    "'messages' chats rendered with the chat template; the loss on the assistant turns",
)
CONVERSATIONAL_PROMPT_COMPLETION = DataFormat(
    "conversational prompt-completion", True, True,
    "'prompt' and 'completion' message lists; the loss on the completion",
)  # fmt: skip
PROMPT_COMPLETION = DataFormat(
    "prompt-completion", False, True, "'prompt' and 'completion' text; the loss on the completion"
)
INPUT_OUTPUT = DataFormat(
    "input-output",
    False,
    True,
    "'input' and 'output' text (ivtrainer task files), trained as prompt/completion",
)
TEXT = DataFormat(
    "language modeling", False, False, "'text'; the loss on every token, no prompt/answer split"
)
TOKENIZED = DataFormat("tokenized", False, True, "'input_ids' (and 'labels'), used as they are")
EDITS = DataFormat(
    "knowledge edits",
    False,
    True,
    "CounterFact/ZsRE records: prompt + new target (old target for F-Learning)",
)

_EDIT_FIELDS = ({"target_new", "ground_truth"}, {"target_new", "target_old"}, {"src", "alt"})


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, Mapping) and "role" in m for m in value)


def detect_format(dataset: Any) -> DataFormat:
    """The format of ``dataset`` (a ``datasets.Dataset``), from its columns and first row; an
    error names the columns and the formats there are."""
    columns = set(getattr(dataset, "column_names", None) or [])
    first = dataset[0] if len(dataset) else {}
    if "input_ids" in columns:
        return TOKENIZED
    if "messages" in columns:
        return MESSAGES
    if {"prompt", "completion"} <= columns:
        if _is_messages(first.get("prompt")):
            return CONVERSATIONAL_PROMPT_COMPLETION
        return PROMPT_COMPLETION
    if any(fields <= columns for fields in _EDIT_FIELDS):
        return EDITS
    if {"input", "output"} <= columns:
        return INPUT_OUTPUT
    if "text" in columns:
        return TEXT
    raise InvalidInputError(
        f"cannot tell the dataset's format from its columns {sorted(columns)}: give 'messages' (chats), "
        "'prompt' and 'completion', 'input' and 'output', 'text', or 'input_ids' (tokenised)"
    )


def usable_rows(dataset: Any, data_format: DataFormat) -> list[int]:
    """The indices of the rows that can train: a conversation with an assistant turn that says
    something, a prompt and a non-empty answer, non-empty text. Public files have a few rows
    without (empty fields, ``None`` content, a chat that ends on the user)."""

    def text(value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    def answered(messages: Any) -> bool:
        return _is_messages(messages) and any(
            m.get("role") == "assistant" and text(m.get("content")) for m in messages
        )

    def ok(row: Mapping[str, Any]) -> bool:
        if data_format is MESSAGES:
            return answered(row.get("messages"))
        if data_format is CONVERSATIONAL_PROMPT_COMPLETION:
            return _is_messages(row.get("prompt")) and answered(row.get("completion"))
        if data_format is PROMPT_COMPLETION:
            return isinstance(row.get("prompt"), str) and text(row.get("completion"))
        if data_format is INPUT_OUTPUT:
            return text(row.get("input")) and text(row.get("output"))
        if data_format is TEXT:
            return text(row.get("text"))
        return True

    return [i for i, row in enumerate(dataset) if ok(row)]


def tokenize_rows(
    dataset: Any, tokenizer: Any, data_format: DataFormat | None = None, *, add_eos: bool = True
):
    """``dataset`` as ``input_ids``, ``attention_mask`` and ``labels`` for a ``Trainer``: the
    answer (completion, output, assistant turns) labelled and the prompt -100; ``text`` rows
    labelled throughout; tokenised rows as they are. ``add_eos`` ends a text answer with the
    end-of-sequence token (a chat's turns end with the template's own end-of-turn token)."""
    data_format = data_format or detect_format(dataset)
    if data_format is TOKENIZED:
        return dataset
    if data_format is EDITS:
        raise InvalidInputError(
            "knowledge-edit records train through ivtrainer.datasets.edits.edit_dataset (their new or old target)"
        )

    def encode(row: Mapping[str, Any]) -> dict:
        if data_format is MESSAGES:
            return encode_conversation(tokenizer, row["messages"])
        if data_format is CONVERSATIONAL_PROMPT_COMPLETION:
            prompt = list(row["prompt"])
            return encode_conversation(tokenizer, prompt + list(row["completion"]), first_answer=len(prompt))
        if data_format is TEXT:
            encoded = encode_prompt_completion(tokenizer, "", row["text"], add_eos=add_eos)
            return {**encoded, "labels": encoded["input_ids"]}
        prompt, answer = (row["prompt"], row["completion"]) if data_format is PROMPT_COMPLETION else (
            row["input"], " " + row["output"].strip()
        )  # fmt: skip
        return encode_prompt_completion(tokenizer, prompt, answer, add_eos=add_eos)

    return dataset.map(encode, remove_columns=dataset.column_names, desc=f"Tokenizing ({data_format.name})")


def as_prompt_completion(dataset: Any):
    """``input``/``output`` rows (ivtrainer's task files) as trl's ``prompt``/``completion`` text,
    the answer after a space as :func:`tokenize_rows` trains it."""

    def rename(row: Mapping[str, Any]) -> dict:
        return {"prompt": row["input"], "completion": " " + str(row["output"]).strip()}

    return dataset.map(rename, remove_columns=dataset.column_names)
