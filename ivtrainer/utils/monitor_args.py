"""The forgetting monitor's settings, shared by every ivtrainer config (a TrainingArguments mixin)."""

from __future__ import annotations

import dataclasses

__all__ = ["ForgettingMonitorArguments"]


@dataclasses.dataclass
class ForgettingMonitorArguments:
    """Mixed in before ``TrainingArguments`` (its fields come after the inherited ones): the
    trainers log ``forgetting/kl_forward`` and ``forgetting/kl_reverse`` (see
    ``ForgettingMonitorCallback``) unless ``forgetting_monitor_every`` is 0."""

    forgetting_monitor_every: int = dataclasses.field(
        default=50,
        metadata={
            "help": "Log the KL between the model before training and now on a fixed sample of the training rows "
            "every N optimizer steps and at the end (the forgetting monitor; ~2% of training time at 50); 0: off."
        },
    )
    forgetting_monitor_rows: int = dataclasses.field(
        default=16, metadata={"help": "Training rows in the forgetting monitor's fixed sample."}
    )
