"""Teacher-forced predictions of target tokens (EasyEdit's scoring): what the edit metrics, the
held-out abilities, the continual runner and IV repair score with."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ivtrainer.errors import InvalidInputError
from ivtrainer.modeling.architectures import takes_logits_to_keep
from ivtrainer.modeling.hooks import eval_mode
from ivtrainer.modeling.shared_prefix import shared_prefix_logits

__all__ = ["target_predictions"]


@torch.no_grad()
def target_predictions(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 32,
    desc: str | None = None,
    shared_prefix: bool = False,
    intervene: Callable[[list[int], torch.Tensor], contextlib.AbstractContextManager] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Teacher-forced argmax at the target positions of ``prompt + " " + target`` (EasyEdit).

    Returns one ``(predicted ids, target ids)`` pair per prompt. Batches are right-padded, which
    leaves every real position's logits as in an unpadded forward. ``shared_prefix``: the prompts
    start with the same tokens (one task's instruction), computed once
    (:func:`~ivtrainer.modeling.shared_prefix.shared_prefix_logits`; plain batches where the model
    cannot). ``intervene(rows, mask)``: a context manager each batch's forward runs in, given the
    batch's prompt indices and a ``(batch, seq)`` bool mask of each row's last prompt token (where
    an IV goes: its effect on the answer is that of greedy decoding with the IV on the prompt).
    """
    if len(prompts) != len(targets):
        raise InvalidInputError(f"{len(prompts)} prompts but {len(targets)} targets")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for prompt, target in zip(prompts, targets, strict=True):
        full = tokenizer(f"{prompt} {target}")["input_ids"]
        n_prompt = len(tokenizer(prompt)["input_ids"])
        if n_prompt >= len(full):
            raise InvalidInputError(f"target {target!r} adds no tokens to prompt {prompt!r}")
        rows.append((full, n_prompt))
    if shared_prefix and intervene is None:
        wanted = [list(range(n - 1, len(full) - 1)) for full, n in rows]
        logits = shared_prefix_logits(model, [full for full, _ in rows], wanted)
        if logits is not None:
            return [(lg.argmax(-1).tolist(), full[n:]) for lg, (full, n) in zip(logits, rows, strict=True)]
    # longest first, in batches of similar length: little padding, and the slowest batch (and any
    # out-of-memory error) comes first
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list[tuple[list[int], list[int]] | None] = [None] * len(rows)
    keep = takes_logits_to_keep(model)
    with eval_mode(model):
        starts = range(0, len(rows), batch_size)
        bar = tqdm(starts, desc=desc, disable=desc is None or len(starts) < 2, leave=False, unit="batch")
        for start in bar:
            batch = order[start : start + batch_size]
            width = len(rows[batch[0]][0])
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, row in enumerate(batch):
                full = rows[row][0]
                ids[i, : len(full)] = torch.tensor(full)
                mask[i, : len(full)] = 1
            # the LM head only where a target token is predicted (a tensor of positions)
            first = min(rows[row][1] for row in batch) - 1
            extra = {"logits_to_keep": torch.arange(first, width - 1)} if keep else {}
            context: contextlib.AbstractContextManager = contextlib.nullcontext()
            if intervene is not None:
                last_prompt = torch.zeros_like(mask, dtype=torch.bool)
                last_prompt[torch.arange(len(batch)), torch.tensor([rows[r][1] - 1 for r in batch])] = True
                context = intervene(batch, last_prompt.to(device))
            with context:
                logits = model(
                    input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **extra
                ).logits
            shift = first if keep else 0
            for i, row in enumerate(batch):
                full, n = rows[row]
                pred = logits[i, n - 1 - shift : len(full) - 1 - shift].argmax(-1).tolist()
                out[row] = (pred, full[n:])
    return out  # type: ignore[return-value]
