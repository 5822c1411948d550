"""Scoring a continual run: every task and the held-out abilities after each stage, the IV repair
rows at the end, and results.json / results.md / the plots."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from ivtrainer.continual.continual_config import (
    ContinualSettings,
    _name,
)
from ivtrainer.continual.metrics import continual_scores
from ivtrainer.continual.stage import TASK_IV
from ivtrainer.utils.outputs import atomic_file

logger = logging.getLogger(__name__)


def _repair(
    model: nn.Module, tokenizer, config: ContinualSettings, rows, out: Path, stages
) -> dict[str, Any]:
    """IV repair on the final model: each task's IV (captured after its stage) added to its test
    prompts, the task given or routed from the prompt; strengths and the router's layer chosen on
    the validation rows only."""
    from ivtrainer.steering.instruction_vector import InstructionVector
    from ivtrainer.steering.repair import IVRepair, TaskVectors, choose_strengths, exact_match
    from ivtrainer.steering.routing import NearestTaskRouter

    start = time.perf_counter()
    names = [_name(t) for t in config.tasks]
    vectors = {
        _name(t): InstructionVector.from_pretrained(out / "stages" / str(s) / TASK_IV)
        for s, t in enumerate(config.tasks, start=1)
    }
    repair = TaskVectors(vectors)
    validation = {_name(t): rows[t]["validation"] for t in config.tasks}
    tried = choose_strengths(model, tokenizer, repair, validation)
    router = NearestTaskRouter.fit(
        model, tokenizer, {n: [r["prompt"] for r in v] for n, v in validation.items()}
    )
    # what a user loads to repair the final model around generate (IVRepair.from_pretrained)
    IVRepair(repair, router).save_pretrained(out / "repair")
    test = {_name(t): rows[t]["test"][: config.n_test] for t in config.tasks}
    given, routed, correct, total, unrouted = {}, {}, 0, 0, 0
    for name in names:
        prompts = [r["prompt"] for r in test[name]]
        hits = exact_match(model, tokenizer, test[name], repair=repair, tasks=[name] * len(prompts))
        given[name] = sum(hits) / len(hits)
        route = router.route(model, tokenizer, prompts)
        hits = exact_match(model, tokenizer, test[name], repair=repair, tasks=route)
        routed[name] = sum(hits) / len(hits)
        correct, total = correct + sum(r == name for r in route), total + len(route)
        unrouted += sum(r is None for r in route)
    final = stages[-1]["tasks"]
    learnt = [stages[i + 1]["tasks"][n] for i, n in enumerate(names)]  # right after each task's stage

    def summary(accuracy: dict[str, float]) -> dict[str, float]:
        ap = sum(accuracy.values()) / len(names)
        bwt = sum(accuracy[n] - learnt[i] for i, n in enumerate(names[:-1])) / max(len(names) - 1, 1)
        return {"AP": ap, "BWT": bwt if len(names) > 1 else 0.0}

    return {
        "strengths": dict(repair.strengths),
        "validation_accuracy": {n: {str(k): v for k, v in t.items()} for n, t in tried.items()},
        "router_layer": router.layer,
        "routing_accuracy": correct / total,
        # the task prompts the router's gate took for prompts of no known task (wrong routes too)
        "unrouted": unrouted / total,
        "task_given": given,
        "routed": routed,
        "without": {n: final[n] for n in names},
        "task_given_scores": summary(given),
        "routed_scores": summary(routed),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _evaluate(model: nn.Module, tokenizer, config: ContinualSettings, rows) -> dict[str, Any]:
    """Exact-match accuracy (every answer token the argmax, teacher-forced: greedy decoding's
    answer) on each task's test rows; and the held-out abilities."""
    from ivtrainer.evaluation.forgetting import icl_abilities
    from ivtrainer.evaluation.predictions import target_predictions

    tasks = {}
    for t in config.tasks:  # a task's prompts share their instruction: computed once
        test = rows[t][config.eval_split][: config.n_test]
        predictions = target_predictions(
            model, tokenizer, [r["prompt"] for r in test], [r["output"] for r in test], shared_prefix=True
        )
        tasks[_name(t)] = sum(pred == target for pred, target in predictions) / len(test)
    fixed = config.icl_demos == "fixed"
    scores = {
        "tasks": tasks,
        "abilities": icl_abilities(model, tokenizer, n_icl=config.n_icl, fixed_demos=fixed),
    }
    if config.lm_eval_tasks:
        from ivtrainer.evaluation.lm_eval_harness import evaluate_lm

        scores["lm_eval"] = evaluate_lm(model, tokenizer, config.lm_eval_tasks, limit=config.lm_eval_limit)
    return scores


def _write_results(
    out: Path,
    config: ContinualSettings,
    stages: list[dict[str, Any]],
    repair: dict[str, Any] | None = None,
    final_model: str | None = None,
) -> dict[str, Any]:
    from ivtrainer.continual.report import write_report

    names = [_name(t) for t in config.tasks]
    matrix = [[s["tasks"][n] for n in names] for s in stages]
    abilities = sorted(stages[0]["abilities"])
    before = sum(stages[0]["abilities"].values()) / len(abilities)
    after = sum(stages[-1]["abilities"].values()) / len(abilities)
    results = {
        "settings": {**dataclasses.asdict(config), "tasks": names},
        "tasks": names,
        "accuracy_matrix": matrix,
        **continual_scores(matrix),
        "abilities": {a: [s["abilities"][a] for s in stages] for a in abilities},
        "abilities_mean": [sum(s["abilities"].values()) / len(abilities) for s in stages],
        "ability_retention": after - before,
        # each stage's KL from the model before it, on 16 of its training rows (None: not measured)
        "forgetting_kl": [s.get("forgetting_kl") for s in stages[1:]],
        # lm-eval's scores after every stage, and their change from before to after
        **(
            {
                "lm_eval": {k: [s["lm_eval"][k] for s in stages] for k in sorted(stages[0]["lm_eval"])},
                "lm_eval_retention": {
                    k: stages[-1]["lm_eval"][k] - stages[0]["lm_eval"][k]
                    for k in sorted(stages[0]["lm_eval"])
                },
            }
            if config.lm_eval_tasks
            else {}
        ),
        **({"repair": repair} if repair is not None else {}),
        # the weights the run ended with (load_final_model checks the model it rebuilds against it)
        "final_model": final_model,
        # every stage's own times, whichever run it ran in (None: a stage written before they were kept)
        "seconds": (
            {k: round(sum(st["seconds"][k] for st in stages), 1) for k in ("train", "evaluate", "iv")}
            if all("seconds" in st for st in stages)
            else None
        ),
    }
    with atomic_file(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    write_report(out, results)
    return results
