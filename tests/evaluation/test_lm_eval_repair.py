"""lm-evaluation-harness with an IV repair on: each request gets its task's IV where
``IVRepair.apply`` puts it (the last context token), given or routed, and the continual
benchmark's tasks score what ``ivtrainer continual`` scores."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from lm_eval.api.instance import Instance

from ivtrainer.continual.sequence_tasks import ORDERS, SEQUENCE_TASKS, load_sequence_task
from ivtrainer.errors import InvalidInputError
from ivtrainer.evaluation.lm_eval_harness import evaluate_lm, task_manager
from ivtrainer.evaluation.lm_eval_repair import RepairedHFLM
from ivtrainer.evaluation.lm_eval_tasks import lm_eval_tasks_path
from ivtrainer.steering.repair import IVRepair, TaskVectors, exact_match
from ivtrainer.steering.routing import NearestTaskRouter
from ivtrainer.testing import tiny_model

TASKS = ("brackets", "initial")


@pytest.fixture(scope="module")
def manager():
    return task_manager()


@pytest.fixture(scope="module")
def setup(iv, tokenizer):
    """A tiny model and a routed repair of two sequence tasks, IVs strong enough to move answers."""
    model = tiny_model("llama", seed=1).eval()
    vectors = {
        "brackets": dataclasses.replace(iv, vector=4 * iv.vector, task="brackets"),
        "initial": dataclasses.replace(iv, vector=-4 * iv.vector, task="initial"),
    }
    prompts = {t: [r["prompt"] for r in load_sequence_task(t, "validation")] for t in TASKS}
    router = NearestTaskRouter.fit(model, tokenizer, prompts)
    return model, IVRepair(TaskVectors(vectors, {"initial": 0.5}), router)


def _loglikelihood(model, tokenizer, context, continuation, repair=None, task=None):
    """Sum of the continuation's log-probabilities, the IV of ``task`` at the last context token."""
    n_context = len(tokenizer(context)["input_ids"])
    ids = torch.tensor([tokenizer(context + continuation)["input_ids"]])
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[0, n_context - 1] = True
    with (
        torch.no_grad(),
        repair.vectors.apply(model, [task], positions=mask) if repair else contextlib.nullcontext(),
    ):
        logits = model(ids).logits.log_softmax(-1)
    answer = ids[0, n_context:]
    return float(logits[0, n_context - 1 : -1].gather(-1, answer.unsqueeze(-1)).sum())


def _request(kind, task_name, args, i):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=(task_name, i, 1))


def test_each_request_gets_its_tasks_iv_at_its_last_context_token(setup, tokenizer):
    """A batch of requests of two tasks and one without an IV, padded to one length: each
    log-likelihood is that of its own forward with its own IV (none for the third), given or
    routed; a forced wrong route changes them; generation is IVRepair.apply around generate."""
    model, repair = setup
    rows = [(t, r) for t in TASKS for r in load_sequence_task(t, "test")[:3]]
    args = [(r["prompt"], r["completion"]) for _, r in rows] + [("Q: hot\nA:", " cold")]
    names = [f"ivtrainer_sequence_{t}" for t, _ in rows] + ["other"]
    requests = [_request("loglikelihood", n, a, i) for i, (n, a) in enumerate(zip(names, args, strict=True))]
    given = {f"ivtrainer_sequence_{t}": t for t in TASKS}
    expected = [
        _loglikelihood(model, tokenizer, *a, repair, t) for a, (t, _) in zip(args, rows, strict=False)
    ]
    expected.append(_loglikelihood(model, tokenizer, *args[-1]))
    plain = [_loglikelihood(model, tokenizer, *a) for a in args]

    assert repair.router.route(model, tokenizer, [args[-1][0]]) == [None]  # no known task: no IV, routed too
    for tasks, want in ((given, expected), (None, expected)):
        lm = RepairedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, repair=repair, tasks=tasks)
        got = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        assert got == pytest.approx(want, abs=1e-4)
        assert dict(lm.routes["ivtrainer_sequence_initial"]) == {"initial": 3}
    assert all(
        abs(a - b) > 1e-3 for a, b in zip(got[:-1], plain[:-1], strict=True)
    )  # every IV moved its answer
    assert got[-1] == pytest.approx(plain[-1], abs=1e-5)
    assert dict(lm.routes["other"]) == {"none": 1}

    wrong = RepairedHFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=4, repair=repair,
        tasks={"ivtrainer_sequence_brackets": "initial", "ivtrainer_sequence_initial": "brackets"},
    )  # fmt: skip
    assert [ll for ll, _ in wrong.loglikelihood(requests[:6], disable_tqdm=True)] != pytest.approx(
        expected[:6], abs=1e-3
    )

    gen_args = {"until": [], "max_gen_toks": 3, "do_sample": False}
    generating = [
        _request("generate_until", n, (a[0], gen_args), i)
        for i, (n, a) in enumerate(zip(names, args, strict=True))
    ]
    lm = RepairedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, repair=repair, tasks=given)
    texts = lm.generate_until(generating, disable_tqdm=True)
    prompts = [a[0] for a in args]
    tasks = [t for t, _ in rows] + [None]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad(), repair.apply(model, tasks=tasks):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert texts == tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def test_evaluate_lm_with_the_repair_scores_what_the_continual_runner_scores(setup, tokenizer, manager):
    """The ivtrainer_sequence_* tasks with the repair on: acc is exact_match with the same repair
    on the same test rows (task given and routed), and the routing shares are reported."""
    model, repair = setup
    names = [f"ivtrainer_sequence_{t}" for t in TASKS]
    given = dict(zip(names, TASKS, strict=True))
    for tasks in (given, None):
        scores = evaluate_lm(
            model, tokenizer, names, limit=6, manager=manager, repair=repair, repair_tasks=tasks
        )
        for name, task in given.items():
            rows = load_sequence_task(task, "test")[:6]
            hits = exact_match(model, tokenizer, rows, repair=repair.vectors, tasks=[task] * len(rows))
            assert scores[f"{name}/acc"] == pytest.approx(sum(hits) / len(hits))
            assert scores[f"repair/{name}/{task}"] == 1.0
    assert not any(
        k.startswith("repair/") for k in evaluate_lm(model, tokenizer, names[:1], limit=2, manager=manager)
    )


def test_bad_repair_settings_are_refused_before_any_work(setup, tokenizer, manager):
    model, repair = setup
    with pytest.raises(InvalidInputError, match="names groups"):
        evaluate_lm(
            model, tokenizer, ["ivtrainer_sequence_order1"], manager=manager, repair=repair,
            repair_tasks={"ivtrainer_sequence_order1": "brackets"},
        )  # fmt: skip
    with pytest.raises(InvalidInputError, match="unknown lm-eval task 'ivtrainer_sequence_bracket'"):
        evaluate_lm(
            model, tokenizer, ["ivtrainer_sequence_brackets"], manager=manager, repair=repair,
            repair_tasks={"ivtrainer_sequence_bracket": "brackets"},
        )  # fmt: skip
    with pytest.raises(InvalidInputError, match=r"no IV for tasks \['json'\]"):
        evaluate_lm(
            model, tokenizer, ["ivtrainer_sequence_json"], manager=manager, repair=repair,
            repair_tasks={"ivtrainer_sequence_json": "json"},
        )  # fmt: skip
    with pytest.raises(InvalidInputError, match="give the repair too"):
        evaluate_lm(model, tokenizer, ["ivtrainer_sequence_json"], manager=manager, repair_tasks={})
    no_router = IVRepair(repair.vectors)
    with pytest.raises(InvalidInputError, match="has no router"):
        evaluate_lm(model, tokenizer, ["ivtrainer_sequence_json"], manager=manager, repair=no_router)


def test_every_sequence_task_and_order_ships_as_an_lm_eval_task(manager):
    assert {f"ivtrainer_sequence_{t}" for t in SEQUENCE_TASKS} <= set(manager.all_subtasks)
    for order in ("order1", "order2"):
        text = (lm_eval_tasks_path() / f"ivtrainer_sequence_{order}.yaml").read_text()
        assert [line.strip()[2:] for line in text.splitlines() if line.startswith("  - ivtrainer_")] == [
            f"ivtrainer_sequence_{t}" for t in ORDERS[order]
        ]
