"""General-ability evaluation during training with lm-evaluation-harness."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from transformers import TrainerCallback

from ivtrainer.errors import InvalidInputError, MissingDependencyError
from ivtrainer.evaluation.lm_eval_harness import check_model, check_tasks, evaluate_lm, task_manager
from ivtrainer.utils.outputs import atomic_file

__all__ = ["LMEvalCallback"]

logger = logging.getLogger(__name__)

RESULTS_JSON, RESULTS_MD = "lm_eval.json", "lm_eval.md"


class LMEvalCallback(TrainerCallback):
    """Run lm-evaluation-harness on the model being trained: before training (``at_start``) and at
    every epoch's end (``every="epoch"``) or every ``every`` optimizer steps.

    The model is evaluated as it is in memory (lm-eval's ``HFLM`` around it, PEFT models included,
    no copy; its train/eval mode is restored). Scores are logged as ``lm_eval/<task>/<metric>``:
    through ``trainer.log`` when the callback is given the ``trainer`` (trl's convention for
    callbacks that log; ``report_to`` then sees them), else into ``state.log_history``. After every
    evaluation ``<output_dir>/lm_eval.json`` (every evaluation) and ``lm_eval.md`` (a table with the
    change from the start: the forgetting) are rewritten atomically; a resumed run continues them.

    Multi-process runs (DDP, ZeRO-1/2): the main process evaluates the whole model while the others
    wait (lm-eval's own multi-process mode needs a model it loads itself). ZeRO-3 is refused: each
    process holds only a shard.

    Args:
        tasks: lm-eval task or group names (a list or ``"a,b"``); the package's own
            (``ivtrainer_abilities``, ...) are always available, more with ``include_path``.
        num_fewshot: as ``lm_eval.simple_evaluate``.
        limit: documents per task (``lm_eval.simple_evaluate``'s).
        batch_size: as ``lm_eval.simple_evaluate``.
        apply_chat_template: as ``lm_eval.simple_evaluate``.
        every: ``"epoch"`` or a number of optimizer steps.
        at_start: evaluate before the first step (the reference the change is measured from).
        trainer: the Trainer, to log through ``trainer.log``.
    """

    def __init__(
        self,
        tasks: str | Sequence[str],
        *,
        num_fewshot: int | None = None,
        limit: int | float | None = None,
        every: Literal["epoch"] | int = "epoch",
        at_start: bool = True,
        batch_size: int = 8,
        apply_chat_template: bool = False,
        include_path: str | Path | Sequence[str | Path] | None = None,
        trainer: Any = None,
    ) -> None:
        if every != "epoch" and not (isinstance(every, int) and not isinstance(every, bool) and every > 0):
            raise InvalidInputError(f"every must be 'epoch' or a positive number of steps, not {every!r}")
        if limit is not None and not limit > 0:
            raise InvalidInputError(f"limit must be > 0 (documents per task, or a fraction), not {limit!r}")
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise MissingDependencyError(
                "LMEvalCallback needs lm-eval: pip install 'ivtrainer[eval]'"
            ) from None
        self.manager = task_manager(include_path)
        self.tasks = check_tasks(tasks, self.manager)
        self.num_fewshot, self.limit, self.every, self.at_start = num_fewshot, limit, every, at_start
        self.batch_size, self.apply_chat_template, self.trainer = batch_size, apply_chat_template, trainer
        self.history: list[dict[str, Any]] = []  # {"step", "epoch", "seconds", "scores"} per evaluation
        self._tokenizer: Any = None

    # -- training events ---------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        check_model(model)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds one
        if tokenizer is None or not callable(getattr(tokenizer, "encode", None)):
            raise InvalidInputError(
                "LMEvalCallback needs the tokenizer: pass processing_class=tokenizer to the Trainer"
            )
        if isinstance(self.every, int) and state.max_steps and self.every > state.max_steps:
            raise InvalidInputError(
                f"LMEvalCallback(every={self.every}) would never run: training has {state.max_steps} steps"
            )
        self._tokenizer = tokenizer
        saved = Path(args.output_dir) / RESULTS_JSON
        if state.global_step > 0 and not self.history and saved.is_file():  # a resumed run: continue
            self.history = _earlier_evaluations(saved, state.global_step)
        if self.at_start and state.global_step == 0:
            self._evaluate(args, state, control, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if isinstance(self.every, int) and state.global_step % self.every == 0:
            self._evaluate(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.every == "epoch":
            self._evaluate(args, state, control, model)

    # -- evaluation --------------------------------------------------------------------------------

    def _evaluate(self, args, state, control, model) -> None:
        import time

        from accelerate import PartialState

        scores: dict[str, float] = {}
        if state.is_world_process_zero:
            start = time.perf_counter()
            scores = evaluate_lm(
                model,
                self._tokenizer,
                self.tasks,
                num_fewshot=self.num_fewshot,
                limit=self.limit,
                batch_size=self.batch_size,
                apply_chat_template=self.apply_chat_template,
                manager=self.manager,
            )
            entry = {
                "step": state.global_step,
                "epoch": state.epoch or 0.0,
                "seconds": round(time.perf_counter() - start, 2),
                "scores": scores,
            }
            self.history = [e for e in self.history if e["step"] != state.global_step] + [entry]
            self._write(Path(args.output_dir))
            logs = {f"lm_eval/{k}": v for k, v in scores.items()}
            if self.trainer is not None:
                should_log = control.should_log  # Trainer.log clears it: the step's own log must still happen
                self.trainer.log(logs)
                control.should_log = should_log
            else:
                state.log_history.append({**logs, "step": state.global_step, "epoch": state.epoch or 0.0})
        PartialState().wait_for_everyone()  # the other processes wait for the main one

    def _write(self, output_dir: Path) -> None:
        settings = {
            "tasks": self.tasks,
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "apply_chat_template": self.apply_chat_template,
        }
        with atomic_file(output_dir / RESULTS_JSON) as tmp:
            tmp.write_text(json.dumps({"settings": settings, "evaluations": self.history}, indent=1))
        with atomic_file(output_dir / RESULTS_MD) as tmp:
            tmp.write_text(results_table(self.history))


def _earlier_evaluations(saved: Path, step: int) -> list[dict[str, Any]]:
    """The evaluations a resumed run continues (those up to its step), refused with the fix when
    the file is not what this callback writes."""
    try:
        entries = json.loads(saved.read_text())["evaluations"]
        kept = [e for e in entries if e["step"] <= step]
        if not all(isinstance(e["scores"], dict) and isinstance(e["epoch"], (int, float)) for e in kept):
            raise ValueError("an evaluation without its scores or epoch")
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(
            f"{saved} is not LMEvalCallback's record of this run ({type(exc).__name__}: {exc}): delete it to start "
            "the record over, or restore it"
        ) from None
    return kept


def results_table(history: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per score, one column per evaluation, and the change since the first."""
    if not history:
        return ""
    names = sorted({k for e in history for k in e["scores"]})
    head = [f"step {e['step']}" for e in history]
    lines = [
        "| lm-eval | " + " | ".join(head) + " | change |",
        "|---|" + "---:|" * (len(head) + 1),
    ]
    for name in names:
        values = [e["scores"].get(name) for e in history]
        first, last = values[0], values[-1]
        change = f"{last - first:+.4f}" if first is not None and last is not None else "-"
        cells = ["-" if v is None else f"{v:.4f}" for v in values]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {change} |")
    return "\n".join(lines) + "\n"
