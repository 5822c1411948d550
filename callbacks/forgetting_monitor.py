"""ForgettingMonitorCallback: how far training has moved the model from itself on its own data,
the quantity "RL's Razor" (Shenfeld et al. 2025, arXiv 2509.04259) reports as predicting forgetting."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.kl_loss import token_kl
from ivtrainer.utils.outputs import atomic_file

__all__ = ["ForgettingMonitorCallback", "answer_log_probs"]

logger = logging.getLogger(__name__)

# its leading underscore keeps it out of Trainer.push_to_hub's uploads (which skip "_*")
REFERENCE = "_forgetting_monitor_reference.safetensors"
# what the model's forward must not get (the monitor computes no loss)
_NOT_MODEL_INPUTS = ("labels", "num_items_in_batch", "use_cache", "logits_to_keep", "return_dict")


@torch.no_grad()
def answer_log_probs(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """``(positions, vocab)`` float32 log-probabilities of the next token at every position whose
    next token is a label (the answer tokens under teacher forcing), rows in order."""
    device = next(model.parameters()).device
    inputs = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
        if k not in _NOT_MODEL_INPUTS
    }
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    targets = batch["labels"][:, 1:].to(device) != -100
    return torch.log_softmax(logits[targets].float(), dim=-1).cpu()


class ForgettingMonitorCallback(TrainerCallback):
    """Logs the per-token KL between the model before training and the model now, on a fixed
    sample of the training rows, every ``every`` optimizer steps and when training ends.

    Both directions are logged: ``forgetting/kl_forward`` = KL(before || now), the direction
    "RL's Razor" measures on the new task's data, and ``forgetting/kl_reverse`` = KL(now || before).
    Each is the mean over the sample's answer tokens (positions with a label, teacher-forced), in
    eval mode, with no gradient: one forward of ``n_rows`` rows per measurement. The reference
    (the model's log-probabilities before the first step, ``answer tokens x vocabulary`` float32
    values: 16 rows of 10 answer tokens with a 49k vocabulary, 31 MB) is written to
    ``<output_dir>/_forgetting_monitor_reference.safetensors``, so a resumed run measures from the
    same model, and read back from there at each measurement by the process that wrote it (not
    held in memory through training; the other processes of a multi-process run keep theirs).

    Values go through ``trainer.log`` when the callback is given the ``trainer`` (``report_to``
    sees them; ivtrainer's trainers pass themselves), else into ``state.log_history``;
    :attr:`history` keeps ``{"step", "kl_forward", "kl_reverse"}`` per measurement.

    Args:
        n_rows: training rows in the fixed sample (drawn with ``args.seed``; the first rows of an
            iterable dataset).
        every: optimizer steps between measurements (0: only at the end of training).
        trainer: the Trainer, to log through ``trainer.log``.
    """

    def __init__(self, n_rows: int = 16, every: int = 50, *, trainer: Any = None) -> None:
        for name, value, low in (("n_rows", n_rows, 1), ("every", every, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidInputError(
                    f"ForgettingMonitorCallback: {name} must be a whole number >= {low}, not {value!r}"
                )
        self.n_rows, self.every, self.trainer = n_rows, every, trainer
        self.history: list[dict[str, float]] = []
        self._batches: list[dict[str, Any]] = []
        # the reference log-probabilities, or the file they were written to (read at each measurement)
        self._reference: list[torch.Tensor] | Path | None = None

    # -- training events ---------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._batches = _fixed_batches(
            train_dataloader, self.n_rows, args.seed, args.per_device_train_batch_size
        )
        if not any((b["labels"] != -100).any() for b in self._batches):
            raise InvalidInputError(
                "ForgettingMonitorCallback: the sampled training rows have no label tokens to measure the KL on "
                "(every label is -100): train on rows with a completion"
            )
        saved = Path(args.output_dir) / REFERENCE
        if state.global_step == 0:
            reference = self._log_probs(model)
            self._reference = reference
            if state.is_world_process_zero:
                from safetensors.torch import save_file

                with atomic_file(saved) as tmp:
                    save_file({str(i): r.contiguous() for i, r in enumerate(reference)}, str(tmp))
                self._reference = saved
            self.history = []
        elif saved.is_file():  # a resumed run: measure from the model the run began with
            self._reference = saved
        else:
            logger.warning(
                "ForgettingMonitorCallback: resumed at step %d without %s (the model before training): the "
                "monitor is off for this run",
                state.global_step,
                saved,
            )
            self._reference = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._measure(state, control, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.history or self.history[-1]["step"] != state.global_step:
            self._measure(state, control, model)

    # -- measurement -------------------------------------------------------------------------------

    def _log_probs(self, model) -> list[torch.Tensor]:
        training = model.training
        model.eval()  # no dropout, and no training-only intervention: the model itself
        try:
            return [answer_log_probs(model, batch) for batch in self._batches]
        finally:
            model.train(training)

    def _measure(self, state, control, model) -> None:
        if self._reference is None:
            return
        now = self._log_probs(model)
        reference = self._reference_log_probs()
        if [n.shape for n in now] != [r.shape for r in reference]:
            raise InvalidInputError(
                "ForgettingMonitorCallback: the saved reference does not match the training rows of this run "
                f"(another dataset or tokenizer): delete {REFERENCE} from the output_dir to measure from here"
            )
        kl = {
            direction: torch.cat([token_kl(n, r, direction) for n, r in zip(now, reference, strict=True)])
            .mean()
            .item()
            for direction in ("forward", "reverse")
        }
        self.history.append(
            {"step": state.global_step, "kl_forward": kl["forward"], "kl_reverse": kl["reverse"]}
        )
        logs = {"forgetting/kl_forward": kl["forward"], "forgetting/kl_reverse": kl["reverse"]}
        if self.trainer is not None:
            should_log = control.should_log  # Trainer.log clears it: the step's own log must still happen
            self.trainer.log(logs)
            control.should_log = should_log
        else:
            state.log_history.append({**logs, "step": state.global_step})

    def _reference_log_probs(self) -> list[torch.Tensor]:
        if not isinstance(self._reference, Path):
            return self._reference or []
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self._reference))
        except (OSError, ValueError) as exc:
            raise InvalidInputError(
                f"ForgettingMonitorCallback: cannot read the model's log-probabilities before training from "
                f"{self._reference} ({exc}): keep the output_dir while training, or set forgetting_monitor_every=0"
            ) from exc
        return [tensors[str(i)] for i in range(len(tensors))]


def _fixed_batches(dataloader, n_rows: int, seed: int, batch_size: int) -> list[dict[str, Any]]:
    """``n_rows`` training rows (a seeded sample; the first rows of an iterable dataset) in
    batches the trainer's own collator makes."""
    if dataloader is None:
        raise InvalidInputError("ForgettingMonitorCallback needs a Trainer with a train_dataset")
    dataset, collate = dataloader.dataset, dataloader.collate_fn
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        index = sorted(random.Random(seed).sample(range(len(dataset)), min(n_rows, len(dataset))))
        rows: list[Any] = [dataset[i] for i in index]
    else:
        rows = list(islice(iter(dataset), n_rows))
    batches = [collate(chunk) for chunk in _chunks(rows, batch_size)]
    if not batches or any("labels" not in b for b in batches):
        raise InvalidInputError(
            "ForgettingMonitorCallback: the training batches have no 'labels' (nothing says which tokens are "
            "the answer): use a collator that sets them"
        )
    return batches


def _chunks(rows: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
