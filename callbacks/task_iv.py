"""TaskIVCallback: capture the instruction vector of the task just trained, for IV repair later."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ivtrainer.errors import InvalidInputError

__all__ = ["TaskIVCallback"]

logger = logging.getLogger(__name__)

TASK_IV_DIR = "task_iv"


class TaskIVCallback(TrainerCallback):
    """When training ends, extracts the IV of the task the model was trained on, on the trained
    model (it now knows the task), from the training rows, and saves it to
    ``<output_dir>/task_iv``: the IV that :class:`~ivtrainer.steering.repair.IVRepair` adds back
    when later fine-tuning has suppressed the task.

    The pairs come from ``dataset`` or else the trainer's own training rows (prompt/completion or
    input/output text, or tokenised rows whose labels mark the answer, decoded with the
    tokenizer), as ``instruction_vectors="auto"`` reads them. With a saved head set (``heads=``,
    FvForgetting's universal heads) the capture costs only the mean activations. The main process
    extracts while the others wait; a ZeRO-3-partitioned model is refused before training (each
    process holds a shard).

    Args:
        name: the task's name, kept in the IV (and the key it has in an ``IVRepair``).
        dataset: the task's rows, if not the trainer's training set.
        heads: a saved head set (folder or Hub id), or None for the exact per-task extraction.
        seed: the extraction's seed.
        extraction: more ``extract_instruction_vector`` arguments (``n_mean_prompts``, ...).
    """

    def __init__(
        self,
        name: str,
        *,
        dataset: Any = None,
        heads: str | os.PathLike | None = None,
        seed: int = 0,
        **extraction: Any,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise InvalidInputError("TaskIVCallback needs the task's name (a non-empty string)")
        self.name, self.dataset, self.heads, self.seed, self.extraction = (
            name,
            dataset,
            heads,
            seed,
            extraction,
        )
        self.instruction_vector: Any = None  # the captured IV, once training has ended

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        from ivtrainer.iv_guided.own_task_iv import training_pairs
        from ivtrainer.utils.distributed import is_zero3_partitioned

        if is_zero3_partitioned(model):
            raise InvalidInputError(
                "TaskIVCallback cannot extract an IV from a ZeRO-3-partitioned model: save the model and run "
                "`ivtrainer extract-iv` on it after training"
            )
        tokenizer = kwargs.get("processing_class")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        if tokenizer is None:
            raise InvalidInputError(
                "TaskIVCallback needs the tokenizer: pass processing_class=tokenizer to the Trainer"
            )
        self._tokenizer = tokenizer
        data = self.dataset if self.dataset is not None else getattr(train_dataloader, "dataset", None)
        self._pairs = training_pairs(data, tokenizer)  # checked now, not after hours of training
        if len(self._pairs) < 2:
            raise InvalidInputError(
                f"TaskIVCallback: {len(self._pairs)} usable prompt/answer pairs in the training rows; an IV needs "
                "several (rows with an empty prompt or answer are skipped)"
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from accelerate import PartialState

        from ivtrainer.iv_guided.own_task_iv import own_task_iv

        if state.is_world_process_zero:
            iv = own_task_iv(
                model, self._tokenizer, self._pairs, heads=self.heads, name=self.name, seed=self.seed,
                **self.extraction,
            )  # fmt: skip
            folder = Path(args.output_dir) / TASK_IV_DIR
            iv.save_pretrained(folder)
            self.instruction_vector = iv
            logger.warning("TaskIVCallback: the IV of %r after training saved to %s", self.name, folder)
        PartialState().wait_for_everyone()
