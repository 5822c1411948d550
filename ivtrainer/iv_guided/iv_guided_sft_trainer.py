"""IV-guided training on trl's ``SFTTrainer``: its data handling (chat, prompt/completion,
packing, completion-only loss), with the IV intervention and KL term of IVGuidedTrainer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback
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
    """``SFTTrainer`` with IV-guided training: SFTTrainer's arguments, in its order, plus
    ``instruction_vectors`` (as :class:`~ivtrainer.IVGuidedTrainer`'s); ``args`` is an
    :class:`IVGuidedSFTConfig`. ``model`` may be a name (``"default"``, a Hub id, a folder or a
    ``.gguf`` file: loaded with its tokenizer); ``peft_config`` is SFTTrainer's.

    The KL needs the student's logits, which SFTTrainer's fused LM head never builds: the training
    loss is the model's own (``Trainer.compute_loss``) plus the guidance's, so SFTTrainer's extra
    training metrics (entropy, token accuracy) are not logged.
    """

    def __init__(
        self,
        model: nn.Module | str,
        args: IVGuidedSFTConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: Any = None,
        formatting_func: Callable | None = None,
        instruction_vectors: IVLike | Sequence[IVLike] | None = None,
    ) -> None:
        args = self._checked_args(args, IVGuidedSFTConfig, "IVGuidedSFTTrainer", "IV and KL")
        loaded, processing_class = self._model_from(model, processing_class)
        kwargs: dict[str, Any] = dict(
            data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics, peft_config=peft_config,
            formatting_func=formatting_func,
        )  # fmt: skip
        self._setup_iv(loaded, args, instruction_vectors, kwargs)
        super().__init__(model=loaded, args=args, **kwargs)
        check_deepspeed_config(self.accelerator)

    _not_model_inputs = _SFT_ONLY  # the SFT collators' masks are already in the labels

    def _model_loss(self, model, inputs, num_items_in_batch):
        # the model's own loss (with logits), not SFTTrainer's fused one
        return Trainer.compute_loss(
            self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
