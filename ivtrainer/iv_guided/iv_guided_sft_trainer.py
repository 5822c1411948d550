"""IV-guided training on trl's ``SFTTrainer``: its data handling (chat, prompt/completion,
packing, completion-only loss), with the IV intervention and KL term of IVGuidedTrainer."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from ivtrainer.callbacks.iv_intervention import IVLike
from ivtrainer.datasets.formats import (
    INPUT_OUTPUT,
    MESSAGES,
    as_prompt_completion,
    detect_format,
    tokenize_rows,
)
from ivtrainer.iv_guided.iv_guided_config import IVGuidedConfig
from ivtrainer.iv_guided.iv_guided_trainer import IVGuidedMixin, check_answer_marked
from ivtrainer.utils.distributed import check_deepspeed_config

__all__ = ["IVGuidedSFTConfig", "IVGuidedSFTTrainer", "trl_masks_assistant_turns"]

logger = logging.get_logger(__name__)

# what SFTTrainer's collators add besides the model's own inputs
_SFT_ONLY = ("completion_mask", "assistant_masks")

# chats labelled on every token (assistant_only_loss=False): no answer marked
_CHAT_LABELLED_THROUGHOUT = dataclasses.replace(
    MESSAGES,
    has_answer=False,
    description="'messages' chats with the loss on every token: assistant_only_loss=False",
)


def trl_masks_assistant_turns(tokenizer: Any) -> bool:
    """Whether trl can label a chat's assistant turns with this tokenizer's template: it has
    ``{% generation %}`` markers, or trl has a training version of it."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    if has_generation_markers(template):
        return True
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return False
    return True


def _prepared(args: IVGuidedSFTConfig, tokenizer: Any, dataset: Any) -> tuple[Any, bool]:
    """``dataset`` as SFTTrainer takes it, refused where it marks no answer for the IV; and whether
    its chats' assistant turns were masked here (``assistant_only_loss`` with a template trl cannot
    mask, such as SmolLM2's: each turn's prefix rendered, as IVGuidedTrainer does)."""
    if not getattr(dataset, "column_names", None) or "input_ids" in dataset.column_names:
        return dataset, False
    data_format = detect_format(dataset)
    if data_format is INPUT_OUTPUT:  # ivtrainer's task files: trained as prompt/completion
        return as_prompt_completion(dataset), False
    if data_format is MESSAGES and not args.assistant_only_loss:
        check_answer_marked(args, _CHAT_LABELLED_THROUGHOUT)
    elif data_format is MESSAGES and not trl_masks_assistant_turns(tokenizer):
        logger.warning(
            "the chat template has no {% generation %} markers trl can use: ivtrainer labels the assistant "
            "turns itself (each turn's prefix rendered with the template)"
        )
        return tokenize_rows(dataset, tokenizer, MESSAGES), True
    elif data_format.name.endswith("prompt-completion") and args.completion_only_loss is False:
        check_answer_marked(args, dataclasses.replace(data_format, has_answer=False))
    else:
        check_answer_marked(args, data_format)
    return dataset, False


@contextlib.contextmanager
def _assistant_masks_made(args: IVGuidedSFTConfig, masked_here: bool) -> Iterator[None]:
    """While SFTTrainer prepares the data, ``assistant_only_loss`` off when the chats were
    labelled here already (trl would otherwise refuse tokenised rows, or re-mask them with a
    template it cannot use); the config keeps the value the user gave."""
    if not masked_here:
        yield
        return
    given, args.assistant_only_loss = args.assistant_only_loss, False
    try:
        yield
    finally:
        args.assistant_only_loss = given


@dataclasses.dataclass
class IVGuidedSFTConfig(SFTConfig, IVGuidedConfig):
    """``SFTConfig`` with the IV and KL settings of :class:`~ivtrainer.IVGuidedConfig`."""


class IVGuidedSFTTrainer(IVGuidedMixin, SFTTrainer):  # type: ignore[misc]  # create_model_card differs
    """``SFTTrainer`` with IV-guided training: SFTTrainer's arguments, in its order, plus
    ``instruction_vectors`` (as :class:`~ivtrainer.IVGuidedTrainer`'s); ``args`` is an
    :class:`IVGuidedSFTConfig`. ``model`` may be a name (``"default"``, a Hub id, a folder or a
    ``.gguf`` file: loaded with its tokenizer); ``peft_config`` is SFTTrainer's.

    On ``messages`` chats the IV-guided terms need ``assistant_only_loss=True`` (a chat labelled
    throughout marks no answer, and is refused when the recipe works at the answer's first token).
    trl masks the assistant turns of templates with ``{% generation %}`` markers; for others (such
    as SmolLM2's) the turns are labelled here, by rendering each turn's prefix
    (:func:`~ivtrainer.datasets.prompt_completion.encode_conversation`): the same labels.

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
        self._setup_iv(loaded, args, instruction_vectors, kwargs)  # 'auto' reads the rows as given
        masked_here = False
        for key in ("train_dataset", "eval_dataset"):
            given = kwargs[key]
            named = given if isinstance(given, dict) else {None: given}
            for name, dataset in named.items():
                named[name], masked = _prepared(args, processing_class, dataset)
                masked_here |= masked
            kwargs[key] = named if isinstance(given, dict) else named[None]
        with _assistant_masks_made(args, masked_here):
            super().__init__(model=loaded, args=args, **kwargs)
        check_deepspeed_config(self.accelerator)

    _not_model_inputs = _SFT_ONLY  # the SFT collators' masks are already in the labels

    def _model_loss(self, model, inputs, num_items_in_batch):
        # the model's own loss (with logits), not SFTTrainer's fused one
        return Trainer.compute_loss(
            self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
