"""In-context-learning prompts and first-answer-token scoring (Todd et al.'s format and metric).

A k-shot prompt is ``Q: x1\\nA: y1\\n\\nQ: x2\\nA: y2 ... Q: xq\\nA:`` and the model should continue
with `` yq``. Scoring follows Todd et al.: the first token of the answer, teacher-forced, from the
logits at the prompt's last token.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ivtrainer.datasets.tasks import Example
from ivtrainer.errors import InvalidInputError
from ivtrainer.modeling.architectures import takes_logits_to_keep, unwrap_model
from ivtrainer.modeling.shared_prefix import shared_prefix_logits

__all__ = [
    "EncodedPrompt",
    "PromptBuilder",
    "check_extraction_sizes",
    "check_prompts_fit",
    "draw",
    "first_token_accuracy",
    "last_token_forward",
    "shared_prefix_forward",
]


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of one prompt and the id of its answer's first token."""

    input_ids: list[int]
    answer_id: int


@dataclasses.dataclass
class PromptBuilder:
    """Builds and tokenises k-shot prompts for one tokenizer.

    Args:
        chat_template: wrap the k-shot text in the tokenizer's chat template as one user turn; the
            answer then starts the assistant turn (no leading space).
    """

    tokenizer: Any  # a transformers tokenizer
    input_prefix: str = "Q: "
    output_prefix: str = "\nA:"
    separator: str = "\n\n"
    chat_template: bool = False

    def __post_init__(self) -> None:
        if self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise InvalidInputError(
                "chat_template=True, but the tokenizer has no chat template; pass chat_template=False"
            )

    def text(self, demos: Sequence[Example], query: str) -> str:
        shots = [f"{self.input_prefix}{d['input']}{self.output_prefix} {d['output']}" for d in demos]
        body = self.separator.join([*shots, f"{self.input_prefix}{query}{self.output_prefix}"])
        if not self.chat_template:
            return body
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )

    def encode(self, demos: Sequence[Example], query: Example) -> EncodedPrompt:
        prompt = self.text(demos, query["input"])
        answer = query["output"] if self.chat_template else " " + query["output"]
        # Special tokens come from the chat template's text when there is one; else the tokenizer's default.
        kwargs = {"add_special_tokens": not self.chat_template}
        prompt_ids = self.tokenizer(prompt, **kwargs)["input_ids"]
        full_ids = self.tokenizer(prompt + answer, **kwargs)["input_ids"]
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            answer_id = full_ids[len(prompt_ids)]
        else:  # the answer merged with the prompt's last token: score its own first token
            answer_id = self.tokenizer(answer, add_special_tokens=False)["input_ids"][0]
        return EncodedPrompt(prompt_ids, answer_id)

    def sample(
        self, pool: Sequence[Example], n_prompts: int, n_shots: int, rng: random.Random, **options: Any
    ) -> list[EncodedPrompt]:
        """``n_prompts`` prompts with ``n_shots`` demos from ``pool``, tokenised; ``options`` are
        :func:`draw`'s (``queries``, ``shuffle_labels``, ``fixed_demos``)."""
        return [self.encode(demos, query) for demos, query in draw(pool, n_prompts, n_shots, rng, **options)]


def draw(
    pool: Sequence[Example],
    n_prompts: int,
    n_shots: int,
    rng: random.Random,
    *,
    queries: Sequence[Example] | None = None,
    shuffle_labels: bool = False,
    fixed_demos: bool = False,
) -> list[tuple[list[Example], Example]]:
    """``(demos, query)`` of ``n_prompts`` prompts: ``n_shots`` demos from ``pool``; the query from
    ``queries`` (default: ``pool``, never one of its own demos). ``shuffle_labels`` permutes the
    demos' outputs, so the task cannot be read off the demonstrations (Todd et al.'s corrupted
    prompts). ``fixed_demos``: the same demos before every query (as MMLU's 5-shot uses the same
    five dev examples for every question; needs ``queries``): the prompts then share a prefix that
    :func:`shared_prefix_forward` computes once.
    """
    if fixed_demos:
        if queries is None:
            raise InvalidInputError("fixed_demos needs queries that are not in the demonstration pool")
        asked = {q["input"] for q in queries[:n_prompts]}
        demos = rng.sample([d for d in pool if d["input"] not in asked], n_shots)
        return [(demos, queries[i % len(queries)]) for i in range(n_prompts)]
    out = []
    for i in range(n_prompts):
        if queries is None:
            chosen = rng.sample(range(len(pool)), n_shots + 1)
            query, demos = pool[chosen[0]], [pool[j] for j in chosen[1:]]
        else:
            query = queries[i % len(queries)]
            candidates = [d for d in pool if d["input"] != query["input"]]
            demos = rng.sample(candidates, n_shots)
        if shuffle_labels and n_shots > 1:
            outputs = [d["output"] for d in demos]
            while outputs == [d["output"] for d in demos] and len(set(outputs)) > 1:
                rng.shuffle(outputs)
            demos = [{"input": d["input"], "output": o} for d, o in zip(demos, outputs, strict=True)]
        out.append((demos, query))
    return out


def right_padded_batches(
    prompts: Sequence[EncodedPrompt], batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(input_ids, attention_mask, last)`` per batch, ``last`` the positions of the last real tokens.

    Right padding keeps every real token's position ids unchanged; pads are never attended.
    """
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p.input_ids) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, : len(p.input_ids)] = torch.tensor(p.input_ids)
            mask[row, : len(p.input_ids)] = 1
        yield ids.to(device), mask.to(device), mask.sum(-1).to(device) - 1


@torch.no_grad()
def last_token_forward(
    model: nn.Module,
    prompts: Sequence[EncodedPrompt],
    *,
    batch_size: int = 16,
    on_batch: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Logits at each prompt's last token, ``(n_prompts, vocab)`` in float32, in right-padded batches.

    ``on_batch(last_index)`` is called before each batch's forward with the ``(batch,)`` positions
    of the last real tokens, so hooks can read activations there. The LM head runs only at those
    positions (``logits_to_keep``), not over every token.
    """
    device = next(model.parameters()).device
    keep = takes_logits_to_keep(model)
    out = []
    for ids, mask, last in right_padded_batches(prompts, batch_size, device):
        if on_batch is not None:
            on_batch(last)
        positions, column = torch.unique(last, return_inverse=True)
        extra = {"logits_to_keep": positions} if keep else {}
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
        index = column if keep else last
        out.append(logits[torch.arange(len(ids), device=device), index].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def shared_prefix_forward(
    model: nn.Module, prompts: Sequence[EncodedPrompt], *, batch_size: int = 16
) -> torch.Tensor:
    """:func:`last_token_forward`'s logits for prompts that share a long prefix (the same
    demonstrations before each query), that prefix computed once
    (:func:`~ivtrainer.modeling.shared_prefix.shared_prefix_logits`; plain forwards of
    ``batch_size`` prompts where the model cannot)."""
    ids = [p.input_ids for p in prompts]
    logits = shared_prefix_logits(model, ids, [[len(i) - 1] for i in ids])
    if logits is None:
        return last_token_forward(model, prompts, batch_size=batch_size)
    return torch.cat(logits)


def first_token_accuracy(
    model: nn.Module, prompts: Sequence[EncodedPrompt], *, batch_size: int = 16, shared_prefix: bool = False
) -> float:
    """Fraction of prompts whose argmax next token is the answer's first token.

    ``shared_prefix``: the prompts share their demonstrations (see :func:`shared_prefix_forward`).
    """
    forward = shared_prefix_forward if shared_prefix else last_token_forward
    logits = forward(model, prompts, batch_size=batch_size)
    answers = torch.tensor([p.answer_id for p in prompts])
    return (logits.argmax(-1) == answers).float().mean().item()


def check_prompts_fit(model: nn.Module, prompts: Sequence[EncodedPrompt], *, n_shots: int) -> None:
    """Refuse, before any forward, prompts longer than the model's positions (an embedding index
    error deep inside the forward otherwise)."""
    config = getattr(unwrap_model(model), "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = max((len(p.input_ids) for p in prompts), default=0) + 1  # + the answer's first token
    if isinstance(limit, int) and longest > limit:
        raise InvalidInputError(
            f"the longest {n_shots}-shot prompt has {longest} tokens, more than the model's {limit} positions: "
            "use fewer shots (n_shots, --n-shots) or shorter examples"
        )


#: Longest input or output accepted for extraction: k-shot prompts repeat them k + 1 times.
MAX_FIELD_CHARS = 2000


def check_extraction_sizes(
    examples: list[dict[str, str]], *, n_shots: int, n_heads: int | None = None, source: str | None = None
) -> None:
    """What can be checked about extraction data without the model: enough pairs for
    ``n_shots``-shot prompts, fields short enough for prompts, outputs that differ (with one
    output for every input, shuffled labels change nothing and every causal effect is 0)."""
    if not isinstance(n_shots, int) or isinstance(n_shots, bool) or n_shots < 0:
        raise InvalidInputError(f"n_shots must be an integer >= 0, got {n_shots!r}")
    if n_heads is not None and (not isinstance(n_heads, int) or n_heads < 1):
        raise InvalidInputError(f"n_heads must be an integer >= 1, got {n_heads!r}")
    where = f" in {source}" if source else ""
    if len(examples) < n_shots + 1:
        raise InvalidInputError(
            f"{len(examples)} examples{where} are too few for {n_shots}-shot prompts: each prompt needs {n_shots} "
            f"demonstrations plus a query, so pass at least {n_shots + 1} examples or lower n_shots"
        )
    for i, ex in enumerate(examples):
        for field in ("input", "output"):
            if len(ex[field]) > MAX_FIELD_CHARS:
                raise InvalidInputError(
                    f"example {i}{where}: {field!r} has {len(ex[field])} characters (at most {MAX_FIELD_CHARS}); each "
                    f"{n_shots}-shot prompt repeats {n_shots + 1} pairs, so use short task pairs"
                )
    if len({ex["output"].strip() for ex in examples}) < 2:
        raise InvalidInputError(
            f"all {len(examples)} examples{where} have the output {examples[0]['output']!r}: with shuffled labels the "
            "corrupted prompts equal the clean ones, so every head's causal effect is 0; use a task whose "
            "outputs depend on the input"
        )
