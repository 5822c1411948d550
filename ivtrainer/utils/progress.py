"""One progress bar for a Trainer's run instead of its printed log lines."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm
from transformers import PrinterCallback, TrainerCallback

__all__ = ["with_progress_bar"]


class _Bar(TrainerCallback):
    def __init__(self, desc: str, disable: bool) -> None:
        self.desc, self.disable = desc, disable

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", leave=False, disable=self.disable)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def with_progress_bar(trainer: Any, desc: str, *, disable: bool = False) -> Any:
    """Replace ``trainer``'s log printer by one progress bar named ``desc`` showing the loss
    (``disable``: neither bar nor printed logs). Returns the trainer."""
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_Bar(desc, disable))
    return trainer
