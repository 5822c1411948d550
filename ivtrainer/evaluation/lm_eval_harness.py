"""lm-evaluation-harness on a model in memory: the trained model itself (PEFT included), no
second copy, its train/eval mode and the tokenizer's padding restored afterwards.

:func:`evaluate_lm` runs ``lm_eval.simple_evaluate`` with lm-eval's ``HFLM`` wrapping the model and
returns flat scores (``<task>/<metric>``); :func:`task_manager` always includes the package's own
tasks (:mod:`ivtrainer.evaluation.lm_eval_tasks`); :func:`check_tasks` refuses unknown names with
close ones. ``LMEvalCallback`` runs it during training. With ``repair=`` the evaluation runs with
an IV repair on (:class:`~ivtrainer.evaluation.lm_eval_repair.RepairedHFLM`).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ivtrainer.errors import InvalidInputError, MissingDependencyError
from ivtrainer.evaluation.lm_eval_tasks import documents_for, lm_eval_tasks_path
from ivtrainer.modeling.architectures import unwrap_model

if TYPE_CHECKING:
    from ivtrainer.steering.repair import IVRepair

__all__ = ["check_tasks", "evaluate_lm", "flat_scores", "task_manager"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ivtrainer[eval]'"


def task_manager(include_path: str | Path | Sequence[str | Path] | None = None):
    """lm-eval's ``TaskManager`` over its own tasks, ivtrainer's and ``include_path``'s (built once
    per process and folder list: indexing lm-eval's ~15,000 task configs takes seconds)."""
    if include_path is None:
        extra: Sequence[str | Path] = []
    else:
        extra = [include_path] if isinstance(include_path, (str, Path)) else include_path
    return _task_manager((str(lm_eval_tasks_path()), *(str(Path(p).expanduser().resolve()) for p in extra)))


@functools.cache
def _task_manager(paths: tuple[str, ...]):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MissingDependencyError(f"lm-eval is not installed: {INSTALL_HINT}") from None
    for path in paths[1:]:
        if not Path(path).is_dir():
            raise InvalidInputError(f"include_path {path} is not a folder of lm-eval task configs")
    return TaskManager(include_path=list(paths))


def check_tasks(tasks: str | Sequence[str], manager) -> list[str]:
    """The task names as a list; unknown ones refused with the closest known names."""
    names = (
        [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    )
    names = [n for n in names if n]
    if not names:
        raise InvalidInputError("no lm-eval task given: name at least one, e.g. ivtrainer_abilities")
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; `lm_eval ls tasks` lists them"
            raise InvalidInputError(f"unknown lm-eval task {name!r}{hint}")
    _check_data(names, manager)
    return names


def _check_data(names: list[str], manager) -> None:
    """Load the tasks (their documents) now, so that data that cannot be had (offline, not in the
    local cache) is refused in one line before any work, not at the first evaluation."""
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    lm_logger.setLevel(logging.ERROR)
    try:
        load = getattr(manager, "load", None)
        if callable(load):
            load(names)
        else:  # lm-eval before TaskManager.load
            from lm_eval.tasks import get_task_dict

            get_task_dict(names, manager)
    except (ConnectionError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidInputError(
            f"lm-eval tasks {', '.join(names)}: their data cannot be loaded ({reason}); download it while online "
            "first (it is then read from the local cache), or name tasks whose data ships with ivtrainer "
            "(ivtrainer_abilities, ivtrainer_facts_*)"
        ) from None
    finally:
        lm_logger.setLevel(level)


def check_model(model: nn.Module) -> None:
    """Refuse what lm-eval's ``HFLM`` cannot wrap in memory."""
    from transformers import PreTrainedModel

    from ivtrainer.utils.distributed import is_zero3_partitioned

    bare = unwrap_model(model)
    if not isinstance(bare, PreTrainedModel) or not hasattr(bare, "generate"):
        raise InvalidInputError(
            f"lm-eval can only evaluate a transformers causal LM (or a PEFT model of one), not {type(bare).__name__}"
        )
    if is_zero3_partitioned(model):
        raise InvalidInputError(
            "lm-eval cannot evaluate a ZeRO-3-partitioned model in memory (each process holds a shard): use ZeRO-2 "
            "for runs with an lm-eval callback, or run `lm_eval` on the saved model afterwards"
        )


def evaluate_lm(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = False,
    manager=None,
    repair: IVRepair | None = None,
    repair_tasks: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """``lm_eval.simple_evaluate`` on ``model`` as it is in memory; flat ``<task>/<metric>`` scores
    (see :func:`flat_scores`). ``limit``: documents per task (lm-eval's ``--limit``).

    ``repair``: an IV repair on every request (:class:`~ivtrainer.evaluation.lm_eval_repair.RepairedHFLM`),
    each request's task routed from its prompt, or given by ``repair_tasks`` (lm-eval task name ->
    the repair's task; lm-eval tasks not named get no IV). The scores then also hold
    ``repair/<lm-eval task>/<repair task or none>``: the share of the task's requests that got
    each IV (how the routing went)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    check_model(model)
    manager = manager or task_manager()
    if repair_tasks is not None:
        if repair is None:
            raise InvalidInputError("repair_tasks names each lm-eval task's repair task: give the repair too")
        check_tasks(list(repair_tasks), manager)
        groups = sorted(set(repair_tasks) - set(manager.all_subtasks))
        if groups:  # a request carries its task's name, never its group's: the IV would go nowhere
            raise InvalidInputError(
                f"repair_tasks names groups {groups}: name each of their tasks instead (e.g. ivtrainer_sequence_plural)"
            )
    # what HFLM and simple_evaluate change (eval mode, the pad token, the global random generators:
    # lm-eval seeds them) is put back: the model is being trained, and training must go on as if
    # nothing had run
    training = model.training
    pad_token, padding_side = tokenizer.pad_token, tokenizer.padding_side
    generators = _random_states()
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    lm_logger.setLevel(logging.ERROR)  # HFLM warns that a model instance skips its loading options
    try:
        if repair is None:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        else:
            from ivtrainer.evaluation.lm_eval_repair import RepairedHFLM

            lm = RepairedHFLM(
                pretrained=model,
                tokenizer=tokenizer,
                batch_size=batch_size,
                repair=repair,
                tasks=repair_tasks,
            )
        with documents_for(tokenizer), _no_run_metadata():
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                apply_chat_template=apply_chat_template,
                log_samples=False,
                bootstrap_iters=0,
                verbosity="ERROR",
            )
    finally:
        lm_logger.setLevel(level)
        model.train(training)
        tokenizer.pad_token, tokenizer.padding_side = pad_token, padding_side
        _set_random_states(generators)
    scores = flat_scores(results)
    if repair is not None:
        scores |= _route_shares(lm.routes)
    return scores


def _route_shares(routes: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """``repair/<lm-eval task>/<repair task>``: the share of each task's requests per IV, logged."""
    out: dict[str, float] = {}
    for name, counts in sorted(routes.items()):
        total = sum(counts.values())
        shares = {task: n / total for task, n in sorted(counts.items(), key=lambda kv: -kv[1])}
        logger.info("IV repair on %s: %s", name, ", ".join(f"{t} {v:.0%}" for t, v in shares.items()))
        out |= {f"repair/{name}/{task}": share for task, share in shares.items()}
    return out


@contextlib.contextmanager
def _no_run_metadata() -> Iterator[None]:
    """Skip the environment report ``simple_evaluate`` attaches to its results: only the scores are
    read here, and the report costs ~1 s of subprocesses per evaluation (``pip list``, ``git``; the
    latter prints "fatal: not a git repository" into a training log outside a checkout)."""
    import lm_eval.evaluator as evaluator

    names = [n for n in ("get_git_commit_hash", "add_env_info") if hasattr(evaluator, n)]
    saved = {n: getattr(evaluator, n) for n in names}
    try:
        for name in names:
            setattr(evaluator, name, lambda *args, **kwargs: None)
        yield
    finally:
        for name, function in saved.items():
            setattr(evaluator, name, function)


def _random_states() -> tuple[Any, ...]:
    import random

    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_random_states(states: tuple[Any, ...]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    if states[3] is not None:
        torch.cuda.set_rng_state_all(states[3])


def flat_scores(results: dict[str, Any]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` from ``simple_evaluate``'s output (tasks and groups; the
    filter is added when it is not ``none``; standard errors left out)."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            skipped = "stderr" in metric or metric == "sample_len" or isinstance(value, bool)
            if skipped or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name = f"{task}/{metric}" + (f"/{filter_name}" if filter_name and filter_name != "none" else "")
            out[name] = float(value)
    return out
