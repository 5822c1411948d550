"""Measuring forgetting: a new task the model cannot do, and the abilities fine-tuning on it may erase.

New task: a made-up output format, ``Q: cold\\nA:`` -> `` [cold]`` (zero-shot accuracy 0 for the
default model), on words of the built-in tasks. Scored as EasyEdit-style exact match: every answer
token the teacher-forced argmax.

Held-out abilities, measured before and after fine-tuning (Jiang et al.'s split of what
fine-tuning can erase):

- in-context learning: 5-shot first-token accuracy on held-out pairs of the six built-in tasks,
  in the same ``Q:/A:`` format the new task uses;
- knowledge: facts the model knows (a built-in counterfactual set's old targets) asked as plain
  completions (``The capital city of France is``: teacher-forced first token);
- instruction following: the same facts asked as chat instructions (``What is the capital city of
  France? Answer with one word.``: does the 16-token greedy reply contain the answer).

Forgetting is the drop of :func:`held_out_mean`, the mean of those three.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ivtrainer.datasets.prompt_completion import encode_prompt_completion
from ivtrainer.datasets.tasks import Example, list_tasks, load_examples, load_task
from ivtrainer.errors import InvalidInputError
from ivtrainer.evaluation.ability_prompts import QUESTIONS, icl_examples
from ivtrainer.evaluation.predictions import target_predictions
from ivtrainer.modeling.hooks import eval_mode
from ivtrainer.steering.icl import PromptBuilder, draw, first_token_accuracy

__all__ = [
    "QUESTIONS",
    "evaluate_abilities",
    "held_out_mean",
    "icl_abilities",
    "icl_ability",
    "icl_examples",
    "instruction_hits",
    "new_task_dataset",
    "new_task_prompt",
    "new_task_words",
]


def new_task_words() -> tuple[list[str], list[str], list[str]]:
    """(train, test, validation) words: 256, 100 and 100 inputs of the built-in word tasks."""
    words = sorted(
        {p["input"] for t in ("antonym", "present_past", "singular_plural") for p in load_task(t, "all")}
        - {p["output"] for p in load_task("uppercase", "all")}  # no ALL-CAPS inputs
    )
    random.Random(0).shuffle(words)
    return words[:256], words[256:356], words[356:456]


def new_task_prompt(word: str) -> str:
    return f"Q: {word}\nA:"


def new_task_dataset(words: Sequence[str], tokenizer):
    """A tokenised ``datasets.Dataset`` teaching ``Q: w\\nA: [w]``, the loss on the answer only."""
    from datasets import Dataset

    return Dataset.from_list(
        [encode_prompt_completion(tokenizer, new_task_prompt(w), f" [{w}]") for w in words]
    )


def evaluate_abilities(
    model: nn.Module,
    tokenizer,
    facts: Sequence[dict[str, str]],
    new_task_words: Sequence[str],
    *,
    split: str = "test",
    n_icl: int = 40,
    progress: bool = False,
    abilities: Mapping[str, Any] | None = None,
    lm_eval_tasks: Sequence[str] = (),
    lm_eval_limit: int | None = None,
    fixed_demos: bool = False,
) -> dict[str, float]:
    """Accuracies (0-1): ``icl/<task>`` for each built-in task, ``facts/completion``,
    ``facts/instruction`` (only if the tokenizer has a chat template) and ``new_task``.

    ``split="test"`` takes the ICL queries from each task's held-out pairs; ``"validation"`` from
    its demonstration pool (choose settings there). ``facts`` are edit records (``prompt``,
    ``subject``, ``target_old``, ``relation``), e.g. from :func:`~ivtrainer.build_counterfacts`.

    Your own abilities too: ``abilities`` maps a name to input/output pairs (a JSON/JSONL file, a
    ``datasets.Dataset``, a list of dicts: :func:`~ivtrainer.datasets.tasks.load_examples`), scored
    as the built-in ones (``icl/<name>``, :func:`icl_ability`); ``lm_eval_tasks`` are
    lm-evaluation-harness tasks (``lm_eval/<task>/<metric>``, ``[eval]`` extra; ``lm_eval_limit``
    documents each). Both count in :func:`held_out_mean` only through the ICL mean (yours) or not
    at all (lm-eval's, whose metrics differ by task). ``fixed_demos``: the built-in tasks' queries
    share one draw of demonstrations (:func:`icl_abilities`; about 5x cheaper).
    """
    own = {name: _ability_pairs(name, source) for name, source in (abilities or {}).items()}  # checked first
    scores: dict[str, float] = {}
    with tqdm(total=4, desc="evaluating", unit="part", disable=not progress, leave=False) as bar:
        scores.update(icl_abilities(model, tokenizer, split=split, n_icl=n_icl, fixed_demos=fixed_demos))
        for name, pairs in own.items():
            scores[f"icl/{name}"] = icl_ability(model, tokenizer, pairs, name=name, split=split, n_icl=n_icl)
        if lm_eval_tasks:
            from ivtrainer.evaluation.lm_eval_harness import evaluate_lm

            lm = evaluate_lm(model, tokenizer, lm_eval_tasks, limit=lm_eval_limit)
            scores.update({f"lm_eval/{k}": v for k, v in lm.items()})
        bar.update()
        completion = target_predictions(
            model, tokenizer, [f["prompt"] for f in facts], [f["target_old"] for f in facts]
        )
        scores["facts/completion"] = statistics.mean(float(p[0] == t[0]) for p, t in completion)
        bar.update()
        if getattr(tokenizer, "chat_template", None):  # a base model has no chat format to ask in
            chats = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": QUESTIONS[f["relation"]].format(f["subject"])}],
                    tokenize=False,
                    add_generation_prompt=True,
                )
                for f in facts
            ]
            scores["facts/instruction"] = statistics.mean(
                instruction_hits(model, tokenizer, chats, [f["target_old"] for f in facts])
            )
        bar.update()
        words = list(new_task_words)
        new = target_predictions(
            model, tokenizer, [new_task_prompt(w) for w in words], [f"[{w}]" for w in words]
        )
        scores["new_task"] = statistics.mean(float(p == t) for p, t in new)
        bar.update()
    return scores


def icl_abilities(
    model: nn.Module, tokenizer, *, split: str = "test", n_icl: int = 40, fixed_demos: bool = False
) -> dict[str, float]:
    """``icl/<task>``: 5-shot first-token accuracy on each built-in task, ``n_icl`` prompts each
    (:func:`icl_examples`; the same prompts as the ``ivtrainer_icl_<task>`` lm-eval tasks).

    ``fixed_demos``: the same five demonstrations (one fixed draw per task) before every query of
    the test split, as MMLU's 5-shot does, so the shared prefix runs once: about 5x cheaper, a
    different (higher-variance) estimate than demonstrations drawn per query.
    """
    builder = PromptBuilder(tokenizer)
    scores = {}
    for task in list_tasks():
        fixed = fixed_demos and split == "test"
        prompts = [builder.encode(d, q) for d, q in icl_examples(task, n_icl, split=split, fixed_demos=fixed)]
        scores[f"icl/{task}"] = first_token_accuracy(model, prompts, shared_prefix=fixed)
    return scores


def icl_ability(
    model: nn.Module, tokenizer, pairs: Sequence[Example], *, name: str, split: str = "test", n_icl: int = 40
) -> float:
    """5-shot first-token accuracy on your own input/output pairs, as on a built-in task: a fixed
    shuffle (seeded by ``name``) puts two thirds in the demonstration pool and one third held out,
    the queries of ``split="test"``."""
    pairs = _ability_pairs(name, pairs)
    random.Random(f"ability/{name}").shuffle(pairs)
    cut = len(pairs) * 2 // 3
    pool, held = pairs[:cut], pairs[cut:]
    queries = held[:n_icl] if split == "test" else None
    builder = PromptBuilder(tokenizer)
    drawn = draw(pool, n_icl, 5, random.Random(name), queries=queries)
    return first_token_accuracy(model, [builder.encode(d, q) for d, q in drawn])


def _ability_pairs(name: str, source: Any) -> list[Example]:
    pairs = load_examples(source, source=name)
    if len(pairs) < 9:
        raise InvalidInputError(
            f"ability {name!r} has {len(pairs)} pairs: give at least 9 (5 demonstrations, queries held out)"
        )
    return pairs


@torch.no_grad()
def instruction_hits(
    model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str], max_new_tokens: int = 16
) -> list[float]:
    """Whether a short greedy reply contains the answer (1.0 or 0.0 per prompt): an
    instruction-tuned model answers in a sentence, so its first token is rarely the fact itself."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_token = tokenizer.pad_token
    if pad_token is None:  # batching needs one; any token does under the attention mask
        tokenizer.pad_token = tokenizer.eos_token
    hits = []
    try:
        with eval_mode(model):
            for start in range(0, len(prompts), 16):
                batch = tokenizer(
                    list(prompts[start : start + 16]),
                    add_special_tokens=False,
                    return_tensors="pt",
                    padding=True,
                ).to(next(model.parameters()).device)
                out = model.generate(  # type: ignore[operator]  # a transformers model
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
                replies = tokenizer.batch_decode(
                    out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
                )
                hits += [
                    float(a.lower() in r.lower())
                    for r, a in zip(replies, answers[start : start + 16], strict=True)
                ]
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
    return hits


def held_out_mean(scores: dict[str, float]) -> float:
    """The mean of in-context learning (averaged over tasks), facts as completions and facts as
    instructions (when measured): what forgetting is measured on."""
    icl = statistics.mean(v for k, v in scores.items() if k.startswith("icl/"))
    return statistics.mean(
        [icl, *(scores[k] for k in ("facts/completion", "facts/instruction") if k in scores)]
    )
