"""lm-eval with the IV repair on, on a finished ``ivtrainer continual --repair`` run.

    ivtrainer continual --quick --repair --out cq
    python benchmarks/lm_eval_repair.py --run cq [--abilities-limit 40] [--write-docs]

Loads the run's final model (``load_final_model``) and its ``<run>/repair``, then scores through
lm-evaluation-harness (``evaluate_lm``):

- the run's tasks as ``ivtrainer_sequence_<task>`` (the run's own test rows: ``limit`` = its
  ``n_test``) without the repair, with it (task given) and routed, next to what the run measured
  itself (``results.json``): the two must agree;
- ``ivtrainer_abilities`` (5-shot word tasks and facts, none of the run's tasks) without the
  repair, with it routed, and routed with the router's gate off (every prompt gets some task's
  IV): what the repair costs prompts of no known task.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from _readme import replace_block
from transformers.utils import logging as hf_logging

from ivtrainer.continual.run_sequence import load_final_model
from ivtrainer.continual.sequence_tasks import SEQUENCE_TASKS
from ivtrainer.evaluation.lm_eval_harness import evaluate_lm, task_manager
from ivtrainer.steering.repair import IVRepair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the --out of a finished `ivtrainer continual --repair`")
    parser.add_argument(
        "--abilities-limit", type=int, default=40, help="documents per ivtrainer_abilities task"
    )
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    run = Path(args.run)
    results = json.loads((run / "results.json").read_text())
    settings = json.loads((run / "settings.json").read_text())
    names = list(results["tasks"])
    unknown = [n for n in names if n not in SEQUENCE_TASKS]
    if unknown:
        raise SystemExit(f"tasks {unknown} are not built-in sequence tasks: they have no lm-eval task")
    if "repair" not in results:
        raise SystemExit(f"{run} was run without --repair")
    manager = task_manager()
    model, tokenizer = load_final_model(run)
    repair = IVRepair.from_pretrained(run / "repair")
    lm_tasks = {f"ivtrainer_sequence_{n}": n for n in names}
    limit = settings.get("n_test")
    start = time.perf_counter()
    scores = {
        "without": evaluate_lm(model, tokenizer, list(lm_tasks), limit=limit, manager=manager),
        "given": evaluate_lm(
            model,
            tokenizer,
            list(lm_tasks),
            limit=limit,
            manager=manager,
            repair=repair,
            repair_tasks=lm_tasks,
        ),
        "routed": evaluate_lm(model, tokenizer, list(lm_tasks), limit=limit, manager=manager, repair=repair),
    }
    seconds = time.perf_counter() - start
    measured = results["repair"]
    runner = {"without": measured["without"], "given": measured["task_given"], "routed": measured["routed"]}
    lines = [
        "| task | without | task given | routed | the run's own (without / given / routed) |",
        "|---|---|---|---|---|",
    ]
    agree = True
    for lm_task, name in lm_tasks.items():
        ours = [scores[k][f"{lm_task}/acc"] for k in ("without", "given", "routed")]
        theirs = [runner[k][name] for k in ("without", "given", "routed")]
        agree &= all(abs(a - b) < 1e-9 for a, b in zip(ours, theirs, strict=True))
        lines.append(
            f"| {name} | {ours[0]:.3f} | {ours[1]:.3f} | {ours[2]:.3f} | "
            + " / ".join(f"{v:.3f}" for v in theirs)
            + " |"
        )
    ungated = IVRepair(repair.vectors, copy.copy(repair.router))
    assert ungated.router is not None
    ungated.router.margin = None  # every prompt routed to some task: the repair before the gate
    repairs = {"without": None, "routed": repair, "no gate": ungated}
    abilities = {
        key: evaluate_lm(
            model,
            tokenizer,
            ["ivtrainer_abilities"],
            limit=args.abilities_limit,
            manager=manager,
            repair=chosen,
        )
        for key, chosen in repairs.items()
    }
    parts = sorted(k for k in abilities["without"] if k.endswith("/acc") and k != "ivtrainer_abilities/acc")
    means = {k: v["ivtrainer_abilities/acc"] for k, v in abilities.items()}
    lines += [
        "",
        f"`ivtrainer_abilities` ({args.abilities_limit} documents per task): {means['without']:.3f} without the "
        f"repair, {means['routed']:.3f} with it routed, {means['no gate']:.3f} routed without the router's gate "
        "(every prompt gets some task's IV).",
        "",
        "| ability | without | routed repair: score, routed to | without the gate: score, routed to |",
        "|---|---|---|---|",
    ]

    def routed_to(key: str, task: str) -> str:
        return ", ".join(
            f"{k.rsplit('/', 1)[1]} {v:.0%}"
            for k, v in abilities[key].items()
            if k.startswith(f"repair/{task}/")
        )

    for key in parts:
        task = key.removesuffix("/acc")
        lines.append(
            f"| {task} | {abilities['without'][key]:.3f} | {abilities['routed'][key]:.3f}: {routed_to('routed', task)} "
            f"| {abilities['no gate'][key]:.3f}: {routed_to('no gate', task)} |"
        )
    command = f"python benchmarks/lm_eval_repair.py --run RUN --abilities-limit {args.abilities_limit}"
    header = (
        f"`ivtrainer continual {'--quick ' if settings.get('n_test') == 16 else ''}--repair --out RUN` "
        f"({settings['method']}, seed {settings['seed']}, {settings['model']} model), then `{command}` "
        f"(the sequence tasks' three evaluations took {seconds:.0f} s). lm-eval "
        f"{'agrees with' if agree else 'DIFFERS FROM'} the run's own scores on every task."
    )
    text = header + "\n\n" + "\n".join(lines)
    print(text)
    if args.write_docs:
        replace_block("lm-eval-repair", text)
    if not agree:
        raise SystemExit("lm-eval's scores differ from the run's own")


if __name__ == "__main__":
    main()
