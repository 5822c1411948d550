"""The instruction vector of the task being trained, from its own training data: what the public
FvForgetting code puts on the teacher (``instruction_vectors="auto"``).

The pairs come from the training rows (prompt/completion or input/output text, chats, or tokenised
rows whose labels mark the answer), and the IV is extracted as any other
(:func:`~ivtrainer.steering.extraction.extract_instruction_vector`: few-shot prompts built
from those pairs), on the model as it is before this training.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers.utils import logging

from ivtrainer.datasets.formats import detect_format
from ivtrainer.datasets.tasks import Example
from ivtrainer.errors import InvalidInputError
from ivtrainer.steering.extraction import extract_instruction_vector
from ivtrainer.steering.head_set import HeadSet
from ivtrainer.steering.instruction_vector import InstructionVector

__all__ = ["AUTO", "own_task_iv", "training_pairs"]

logger = logging.get_logger(__name__)

#: The value of ``instruction_vectors`` that asks for the training data's own IV.
AUTO = "auto"

# Rows read from the training data: enough for 100 ten-shot prompts and 64 calibration pairs.
MAX_PAIRS = 512


def training_pairs(dataset: Any, tokenizer: Any = None, *, limit: int = MAX_PAIRS) -> list[Example]:
    """``{"input", "output"}`` pairs from the first ``limit`` training rows.

    Rows may have ``prompt``/``completion`` or ``input``/``output`` text, ``input_ids`` with
    ``labels`` (-100 on the prompt, decoded with ``tokenizer``), or be conversations (``messages``,
    or conversational prompt/completion): each assistant turn is a pair, its input the user turn
    before it and its output what the assistant says (see :func:`own_task_iv` for the prompts they
    make). Rows with an empty side are skipped.
    """
    rows = [dataset[i] for i in range(min(limit, len(dataset)))] if hasattr(dataset, "__len__") else []
    if not rows:
        raise InvalidInputError(
            "instruction_vectors='auto' needs a training dataset with rows (a map-style datasets.Dataset or "
            "list) to extract the task's IV from; extract it first (`ivtrainer extract-iv`) for streamed data"
        )
    try:
        data_format = detect_format(dataset) if hasattr(dataset, "column_names") else None
    except InvalidInputError:
        data_format = None
    columns = list(getattr(dataset, "column_names", None) or rows[0])
    if data_format is not None and data_format.conversational:
        pairs = [pair for row in rows for pair in _conversation_pairs(row)]
    elif {"prompt", "completion"} <= set(columns):
        pairs = [(r["prompt"], r["completion"]) for r in rows]
    elif {"input", "output"} <= set(columns):
        pairs = [(r["input"], r["output"]) for r in rows]
    elif {"input_ids", "labels"} <= set(columns):
        if tokenizer is None:
            raise InvalidInputError(
                "instruction_vectors='auto' on tokenised data needs processing_class= (the tokenizer) to read "
                "the prompts and answers back"
            )
        pairs = [_decoded(tokenizer, r["input_ids"], r["labels"]) for r in rows]
    else:
        raise InvalidInputError(
            f"instruction_vectors='auto' cannot find prompts and answers in the columns {columns}: give "
            "'messages' chats, prompt/completion or input/output text, or input_ids with labels (-100 on the prompt)"
        )
    out = []
    for prompt, answer in pairs[:limit]:
        if isinstance(prompt, str) and isinstance(answer, str) and prompt.strip() and answer.strip():
            out.append({"input": prompt.strip(), "output": answer.strip()})
    return out


def _conversation_pairs(row: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(the user turn before it, the assistant's answer) for each assistant turn of a row."""
    messages = row.get("messages") or [*(row.get("prompt") or []), *(row.get("completion") or [])]
    pairs, user = [], None
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        if message.get("role") == "user":
            user = message.get("content")
        elif message.get("role") == "assistant" and user is not None:
            pairs.append((user, message.get("content")))
    return pairs


def _decoded(tokenizer: Any, input_ids, labels) -> tuple[str, str]:
    prompt = [t for t, label in zip(input_ids, labels, strict=False) if label == -100]
    answer = [t for t, label in zip(input_ids, labels, strict=False) if label != -100]
    return (
        tokenizer.decode(prompt, skip_special_tokens=True),
        tokenizer.decode(answer, skip_special_tokens=True),
    )


def own_task_iv(
    model: nn.Module,
    tokenizer: Any,
    dataset: Any,
    *,
    heads: HeadSet | str | os.PathLike | None = None,
    name: str = "training data",
    seed: int = 0,
    progress: bool | None = None,
    **extraction: Any,
) -> InstructionVector:
    """The IV of the task in ``dataset``, extracted on ``model`` as it is now (the package's
    default extraction: calibrated; from a saved universal head set with ``heads=``, as the
    public FvForgetting code does, which costs only the mean activations). ``extraction``: more
    :func:`~ivtrainer.steering.extraction.extract_instruction_vector` arguments.

    Conversations give pairs of (user turn, assistant answer), and their few-shot prompts are
    wrapped in the tokenizer's chat template as one user turn (``chat_template=True``), so the IV
    is read at the template's generation prompt: the token the KL's ``last_prompt`` position picks
    in the training rows. Earlier turns and system messages do not enter the IV's prompts."""
    from ivtrainer.utils.distributed import is_zero3_partitioned

    if is_zero3_partitioned(model):
        raise InvalidInputError(
            "instruction_vectors='auto' cannot extract an IV from a ZeRO-3-partitioned model: extract it first "
            "(`ivtrainer extract-iv --task train.jsonl --out task-iv`) and pass the folder"
        )
    pairs = training_pairs(dataset, tokenizer)
    if (
        hasattr(dataset, "column_names") and detect_format(dataset).conversational
    ):  # read the IV where the chat's answer starts: the generation prompt
        extraction.setdefault("chat_template", True)
    iv = extract_instruction_vector(
        model, tokenizer, pairs, heads=heads, name=name, seed=seed, progress=progress, **extraction
    )
    calibration = iv.metrics.get("calibration", {})
    logger.warning(
        "instruction_vectors='auto': the IV of the training data (%d pairs): %d heads, layer %d, strength %g%s",
        len(pairs), len(iv.heads), iv.edit_layer, iv.strength,
        f", zero-shot {calibration['base_accuracy']:.2f} -> {calibration['accuracy']:.2f} on calibration pairs"
        if "accuracy" in calibration else "",
    )  # fmt: skip
    return iv
