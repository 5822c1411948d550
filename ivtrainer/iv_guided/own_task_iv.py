"""The instruction vector of the task being trained, from its own training data: what the public
FvForgetting code puts on the teacher (``instruction_vectors="auto"``).

The pairs come from the training rows (prompt/completion or input/output text, chats, or tokenised
rows whose labels mark the answer), and the IV is extracted as any other
(:func:`~ivtrainer.steering.extraction.extract_instruction_vector`: few-shot prompts built
from those pairs), on the model as it is before this training.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ivtrainer.datasets.formats import detect_format
from ivtrainer.datasets.tasks import Example
from ivtrainer.errors import InvalidInputError
from ivtrainer.steering.extraction import extract_instruction_vector
from ivtrainer.steering.head_set import HeadSet, shipped_head_set
from ivtrainer.steering.instruction_vector import InstructionVector

__all__ = ["AUTO", "EXACT", "SHIPPED_HEADS", "own_task_iv", "training_pairs"]

logger = logging.get_logger(__name__)

#: The value of ``instruction_vectors`` that asks for the training data's own IV.
AUTO = "auto"
#: The value of ``auto_iv_heads`` that asks for exact CIE over every head (no head set: the default).
EXACT = "exact"
#: The value of ``auto_iv_heads`` that asks for the head set ivtrainer ships for the model.
SHIPPED_HEADS = "shipped"

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


def _once(extract: Callable[[], InstructionVector]) -> tuple[InstructionVector, int]:
    """``extract()`` run on the main process only and its IV sent to every process (under
    ``accelerate launch`` each would otherwise extract the same IV, N times the work), with the
    number of processes. An error there is raised on every process, so that none waits forever."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return extract(), 1
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            iv = extract()
            box[0] = dataclasses.replace(
                iv, **{f.name: getattr(iv, f.name).cpu() for f in dataclasses.fields(iv)
                       if isinstance(getattr(iv, f.name), torch.Tensor)}
            )  # fmt: skip
        except Exception as exc:  # sent as an error, raised everywhere
            box[0] = (
                exc if isinstance(exc, InvalidInputError) else RuntimeError(f"{type(exc).__name__}: {exc}")
            )
    broadcast_object_list(box, from_process=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0], dist.get_world_size()


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
    default extraction: calibrated). ``heads``: None or ``"exact"``: exact CIE over every head;
    a saved universal head set (an object, folder or Hub id), as the public FvForgetting code
    does, which costs only the mean activations; ``"shipped"``: the head set ivtrainer ships for
    the model (:func:`~ivtrainer.steering.head_set.shipped_head_set`: the default model's; its IVs
    steer better and cost less, but IV-guided training with them forgot more in the continual
    benchmark, so it is not the default). ``extraction``: more
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
    shipped = ""
    if heads == SHIPPED_HEADS:
        heads = shipped_head_set(model)
        if heads is None:
            raise InvalidInputError(
                "auto_iv_heads='shipped': ivtrainer ships a head set for the default model only; build one for this "
                "model with `ivtrainer extract-heads --model ... --out heads` and pass that folder"
            )
        shipped = "; heads from the head set shipped for this model"
    elif heads == EXACT:
        heads = None
    if (
        hasattr(dataset, "column_names") and detect_format(dataset).conversational
    ):  # read the IV where the chat's answer starts: the generation prompt
        extraction.setdefault("chat_template", True)
    iv, processes = _once(
        lambda: extract_instruction_vector(
            model, tokenizer, pairs, heads=heads, name=name, seed=seed, progress=progress, **extraction
        )
    )
    calibration = iv.metrics.get("calibration", {})
    if processes > 1 and torch.distributed.get_rank() != 0:
        return iv  # said once, by the process that extracted it
    logger.warning(
        "instruction_vectors='auto': the IV of the training data (%d pairs%s%s): %d heads, layer %d, strength %g%s",
        len(pairs), f"; extracted on the main process for all {processes}" if processes > 1 else "", shipped,
        len(iv.heads), iv.edit_layer, iv.strength,
        f", zero-shot {calibration['base_accuracy']:.2f} -> {calibration['accuracy']:.2f} on calibration pairs"
        if "accuracy" in calibration else "",
    )  # fmt: skip
    return iv
