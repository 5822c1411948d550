"""IV-guided training on trl's ``SFTTrainer``: its data handling (chat, prompt/completion,
packing, completion-only loss), with the IV intervention and KL term of IVGuidedTrainer."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from ivtrainer.callbacks.iv_intervention import IVLike
from ivtrainer.iv_guided.iv_guided_config import IVGuidedConfig
from ivtrainer.iv_guided.iv_guided_trainer import IVGuidedMixin
from ivtrainer.utils.distributed import check_deepspeed_config

__all__ = ["IVGuidedSFTConfig", "IVGuidedSFTTrainer"]

# what SFTTrainer's collators add besides the model's own inputs
_SFT_ONLY = ("completion_mask", "assistant_masks")


@dataclasses.dataclass
class IVGuidedSFTConfig(SFTConfig, IVGuidedConfig):
    """``SFTConfig`` with the IV and KL settings of :class:`~ivtrainer.IVGuidedConfig`."""


class IVGuidedSFTTrainer(IVGuidedMixin, SFTTrainer):  # type: ignore[misc]  # create_model_card differs
    """``SFTTrainer`` with IV-guided training. Takes the same arguments as ``SFTTrainer`` plus
    ``instruction_vectors``; ``args`` is an :class:`IVGuidedSFTConfig`.

    The KL needs the student's logits, which SFTTrainer's fused LM head never builds: the training
    loss is the model's own (``Trainer.compute_loss``) plus the guidance's, so SFTTrainer's extra
    training metrics (entropy, token accuracy) are not logged.
    """

    def __init__(
        self,
        model: nn.Module | str,
        args: IVGuidedSFTConfig | None = None,
        *,
        instruction_vectors: IVLike | Sequence[IVLike] | None = None,
        **kwargs: Any,
    ) -> None:
        args = self._checked_args(args, IVGuidedSFTConfig, "IVGuidedSFTTrainer", "IV and KL")
        if isinstance(model, str):
            raise TypeError(
                "pass the model object (IV compatibility is checked before any work), not its name"
            )
        self._setup_iv(model, args, instruction_vectors, kwargs)
        super().__init__(model=model, args=args, **kwargs)
        check_deepspeed_config(self.accelerator)

    _not_model_inputs = _SFT_ONLY  # the SFT collators' masks are already in the labels

    def _model_loss(self, model, inputs, num_items_in_batch):
        # the model's own loss (with logits), not SFTTrainer's fused one
        return Trainer.compute_loss(
            self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
