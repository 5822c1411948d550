"""Does an instruction vector work? Zero-shot, zero-shot + IV and k-shot accuracy on held-out pairs,
with the lift's uncertainty (the papers' validation: Todd et al., Jiang et al.).

Two metrics: first-token accuracy (Todd et al.'s: the argmax next token is the answer's first
token) and exact match of the greedy continuation up to the end of its line (what matters for
multi-token answers). The IV is added at the prompt's last token only, also while generating.
The lift (zero-shot + IV minus zero-shot, first token) gets a paired bootstrap 95% interval and
an exact sign test on the pairs where the two disagree.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ivtrainer.datasets.tasks import Example, load_examples
from ivtrainer.errors import InvalidInputError
from ivtrainer.modeling.hooks import eval_mode
from ivtrainer.steering.icl import EncodedPrompt, PromptBuilder, last_token_forward

__all__ = ["VectorEvaluation", "evaluate_vector", "sign_test", "split_pairs"]

#: Significance level under which a lift is reported as real.
ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class VectorEvaluation:
    """Accuracies on ``n`` held-out pairs; ``k_shot`` maps each ``k`` to its (first-token, exact) pair."""

    n: int
    zero_shot: float
    zero_shot_iv: float
    k_shot: dict[int, float]
    exact_zero_shot: float
    exact_zero_shot_iv: float
    exact_k_shot: dict[int, float]
    lift: float
    lift_interval: tuple[float, float]
    p_value: float
    strength: float
    edit_layer: int

    @property
    def significant(self) -> bool:
        return self.lift > 0 and self.p_value < ALPHA

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """Markdown: one row per condition, first-token and exact-match accuracy."""
        rows = [
            ("zero-shot", self.zero_shot, self.exact_zero_shot),
            (
                f"zero-shot + IV (layer {self.edit_layer}, x{self.strength:g})",
                self.zero_shot_iv,
                self.exact_zero_shot_iv,
            ),
            *((f"{k}-shot", self.k_shot[k], self.exact_k_shot[k]) for k in sorted(self.k_shot)),
        ]
        lines = [f"| {self.n} held-out pairs | first token | exact match |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {first:.2f} | {exact:.2f} |" for name, first, exact in rows]
        low, high = self.lift_interval
        lines += [
            "",
            f"Lift from the IV: {self.lift:+.2f} (95% bootstrap interval {low:+.2f} to {high:+.2f}; "
            f"sign test p = {self.p_value:.2g}){'' if self.significant else ': not significant'}.",
        ]
        return "\n".join(lines)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of ``wins`` vs ``losses`` at p = 1/2 (McNemar's exact test)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(max(wins, losses), n + 1)) / 2**n
    return min(1.0, 2 * tail)


def evaluate_vector(
    iv: Any,
    model: nn.Module,
    tokenizer: Any,
    pairs: Any,
    *,
    shots: Sequence[int] = (0, 5),
    demonstrations: Any = None,
    strength: float | None = None,
    chat_template: bool = False,
    n_bootstrap: int = 1000,
    max_new_tokens: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool | None = None,
) -> VectorEvaluation:
    """See :meth:`ivtrainer.steering.instruction_vector.InstructionVector.evaluate`."""
    data = load_examples(pairs)
    demos = load_examples(demonstrations) if demonstrations is not None else data
    ks = sorted({int(k) for k in shots if int(k) > 0})
    if any(int(k) < 0 for k in shots):
        raise InvalidInputError(f"shots must be >= 0, got {list(shots)}")
    if not data:
        raise InvalidInputError("no pairs to evaluate on")
    if ks and len({d["input"] for d in demos}) < max(ks) + 1:
        raise InvalidInputError(
            f"{len(demos)} demonstration pairs are too few for {max(ks)}-shot prompts; pass more pairs or "
            "demonstrations=, or lower shots"
        )
    iv.check_compatible(model)
    builder = PromptBuilder(tokenizer, chat_template=chat_template)
    rng = random.Random(seed)
    zero = [builder.encode([], q) for q in data]
    few = {k: builder.sample(demos, len(data), k, rng, queries=data) for k in ks}
    new_tokens = max_new_tokens or 2 + max(
        len(tokenizer(" " + q["output"], add_special_tokens=False)["input_ids"]) for q in data
    )
    answers = [q["output"].strip() for q in data]
    with (
        eval_mode(model),
        tqdm(
            total=2 + len(ks),
            desc="evaluating the IV",
            unit="condition",
            disable=None if progress is None else not progress,
        ) as bar,
    ):
        right: dict[str | int, list[int]] = {"zero": _first_right(model, zero, batch_size)}
        exact: dict[str | int, list[int]] = {
            "zero": _exact(model, tokenizer, zero, answers, new_tokens, batch_size)
        }
        bar.update(1)
        with iv.apply(model, strength):
            right["iv"] = _first_right(model, zero, batch_size)
            exact["iv"] = _exact(model, tokenizer, zero, answers, new_tokens, batch_size)
        bar.update(1)
        for k in ks:
            right[k] = _first_right(model, few[k], batch_size)
            exact[k] = _exact(model, tokenizer, few[k], answers, new_tokens, batch_size)
            bar.update(1)
    diff = [a - b for a, b in zip(right["iv"], right["zero"], strict=True)]
    boot = random.Random(seed + 1)
    n = len(diff)
    means = sorted(sum(diff[boot.randrange(n)] for _ in range(n)) / n for _ in range(n_bootstrap))
    interval = (means[int(0.025 * (n_bootstrap - 1))], means[int(0.975 * (n_bootstrap - 1))])

    def mean(values: list[int]) -> float:
        return round(sum(values) / len(values), 4)

    return VectorEvaluation(
        n=n,
        zero_shot=mean(right["zero"]),
        zero_shot_iv=mean(right["iv"]),
        k_shot={k: mean(right[k]) for k in ks},
        exact_zero_shot=mean(exact["zero"]),
        exact_zero_shot_iv=mean(exact["iv"]),
        exact_k_shot={k: mean(exact[k]) for k in ks},
        lift=round(sum(diff) / n, 4),
        lift_interval=(round(interval[0], 4), round(interval[1], 4)),
        p_value=sign_test(diff.count(1), diff.count(-1)),
        strength=float(iv.strength if strength is None else strength),
        edit_layer=int(iv.edit_layer),
    )


def _first_right(model: nn.Module, prompts: list[EncodedPrompt], batch_size: int) -> list[int]:
    logits = last_token_forward(model, prompts, batch_size=batch_size)
    return [int(i == p.answer_id) for i, p in zip(logits.argmax(-1).tolist(), prompts, strict=True)]


@torch.no_grad()
def _exact(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[EncodedPrompt],
    answers: list[str],
    new_tokens: int,
    batch_size: int,
) -> list[int]:
    """Greedy continuation, left-padded batches; right when its first line equals the answer.
    An active ``iv.apply`` adds the vector at the prompt's last token only (cached decoding steps
    are left alone)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p.input_ids) for p in batch)
        ids = torch.full((len(batch), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p.input_ids) :] = torch.tensor(p.input_ids)
            mask[row, width - len(p.input_ids) :] = 1
        generated = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )[:, width:]
        for row, answer in zip(generated, answers[start : start + batch_size], strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip()
            out.append(int(text == answer))
    return out


def split_pairs(
    examples: Sequence[Example], fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """(extraction, held-out): a seeded random ``fraction`` of ``examples`` held out."""
    if not 0 < fraction < 1:
        raise InvalidInputError(f"the evaluation split must be a fraction in (0, 1), got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(fraction * len(examples)))
    held = set(order[:n_held])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
