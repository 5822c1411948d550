"""The IV repair router's gate: which prompts it routes to a task and which it leaves alone.

    python benchmarks/router_gate.py [--run RUN] [--margins 1.5 2 3] [--write-docs]

For each built-in order, a ``NearestTaskRouter`` is fitted on the validation prompts of the
order's five tasks (on the default model, or on the final model of a continual run with
``--run``), then routes:

- the test prompts of those tasks (routing accuracy; the share the gate took for no known task);
- prompts of no known task: the other order's task prompts (the same layout, another code word),
  5-shot word-task prompts (``icl_examples``), the package's facts as completions and as chat
  questions (the chat template applied).

For each margin: the share of each kind that gets some task's IV. No forward is repeated: the
routes of every margin come from the same hidden states.
"""

from __future__ import annotations

import argparse

import torch
from _readme import replace_block
from transformers.utils import logging as hf_logging

from ivtrainer import load_default_model
from ivtrainer.continual.sequence_tasks import ORDERS, load_sequence_task
from ivtrainer.datasets.edits import candidate_facts
from ivtrainer.evaluation.ability_prompts import QUESTIONS, icl_examples
from ivtrainer.steering.icl import PromptBuilder
from ivtrainer.steering.routing import MARGIN, NearestTaskRouter, last_token_states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a continual run's --out: its final model instead of the default model")
    parser.add_argument("--margins", type=float, nargs="+", default=[1.5, MARGIN, 3.0])
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    if args.run:
        from ivtrainer.continual.run_sequence import load_final_model

        model, tokenizer = load_final_model(args.run)
    else:
        model, tokenizer = load_default_model()
    builder = PromptBuilder(tokenizer=tokenizer)
    facts = candidate_facts()[:48]
    outside = {
        "5-shot word tasks": [
            builder.text(d, q["input"])
            for t in (
                "antonym",
                "country_capital",
                "first_letter",
                "present_past",
                "singular_plural",
                "uppercase",
            )
            for d, q in icl_examples(t, 8)
        ],
        "facts as completions": [f["prompt"] for f in facts],
        "facts as chat questions": [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": QUESTIONS[f["relation"]].format(f["subject"])}],
                tokenize=False,
                add_generation_prompt=True,
            )
            for f in facts
        ],
    }
    lines = [
        "| router fitted on | prompts | "
        + " | ".join(f"margin {m:g}" for m in args.margins)
        + " | no gate |",
        "|---|---|" + "---|" * (len(args.margins) + 1),
    ]
    for order, other in (("order1", "order2"), ("order2", "order1")):
        validation = {t: [r["prompt"] for r in load_sequence_task(t, "validation")] for t in ORDERS[order]}
        router = NearestTaskRouter.fit(model, tokenizer, validation)
        test = [(t, r["prompt"]) for t in ORDERS[order] for r in load_sequence_task(t, "test")]
        kinds = {
            "its tasks' test prompts": [p for _, p in test],
            "the other order's task prompts": [
                r["prompt"] for t in ORDERS[other] for r in load_sequence_task(t, "test")
            ],
            **outside,
        }
        for kind, prompts in kinds.items():
            routes = {m: _routes(router, model, tokenizer, prompts, m) for m in [*args.margins, None]}
            if kind == "its tasks' test prompts":  # right task (gated: not right)
                cells = [
                    f"{sum(r == t for r, (t, _) in zip(routes[m], test, strict=True)) / len(test):.3f} right"
                    for m in [*args.margins, None]
                ]
            else:
                cells = [
                    f"{sum(r is not None for r in routes[m]) / len(prompts):.0%} get an IV"
                    for m in [*args.margins, None]
                ]
            lines.append(
                f"| {order} (layer {router.layer}) | {kind} ({len(prompts)}) | " + " | ".join(cells) + " |"
            )
    model_name = f"the final model of `{args.run}`" if args.run else "SmolLM2-135M-Instruct"
    text = (
        f"`python benchmarks/router_gate.py{' --run RUN' if args.run else ''}` ({model_name}; routers fitted on the "
        "32 validation prompts of each task):\n\n" + "\n".join(lines)
    )
    print(text)
    if args.write_docs:
        replace_block("router-gate", text)


def _routes(router: NearestTaskRouter, model, tokenizer, prompts, margin):
    """The routes at ``margin``, from hidden states computed once per prompt list."""
    key = tuple(prompts)
    if key not in _STATES:
        _STATES[key] = last_token_states(model, tokenizer, list(prompts))
    router.margin = margin
    try:
        return router.route_states(_STATES[key][router.layer])
    finally:
        router.margin = MARGIN


_STATES: dict[tuple[str, ...], torch.Tensor] = {}


if __name__ == "__main__":
    main()
