"""What every ivtrainer trainer adds to its transformers or trl base class (trl keeps the same in
its ``BaseTrainer``): its config checked first, Hub pushes checked before anything is uploaded,
``training_args.bin`` without the Hub token, and no empty optimizer groups under DeepSpeed."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ivtrainer.hub.push import NoTokenInArgsMixin, check_trainer_push
from ivtrainer.modeling.loading import drop_gguf_marker
from ivtrainer.utils.distributed import NoEmptyParamGroupsMixin

__all__ = ["BaseTrainerMixin"]

if TYPE_CHECKING:  # the mixins are always combined with a Trainer: checked as one
    from transformers import Trainer as _TrainerBase
else:
    _TrainerBase = object


class BaseTrainerMixin(NoTokenInArgsMixin, NoEmptyParamGroupsMixin, _TrainerBase):
    """Mixed in before ``transformers.Trainer`` (or ``trl.SFTTrainer``) by IVGuidedTrainer,
    IVGuidedSFTTrainer and FLearningTrainer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("model") is not None:  # a model read from a .gguf file saves as the plain model it is
            drop_gguf_marker(kwargs["model"])
        super().__init__(*args, **kwargs)
        every = getattr(self.args, "forgetting_monitor_every", 0)
        if every:  # how far training moves the model on its own rows, logged (RL's Razor's predictor)
            from ivtrainer.callbacks.forgetting_monitor import ForgettingMonitorCallback

            rows = getattr(self.args, "forgetting_monitor_rows", 16)
            self.add_callback(ForgettingMonitorCallback(n_rows=rows, every=every, trainer=self))

    @staticmethod
    def _model_from(model: Any, processing_class: Any) -> tuple[Any, Any]:
        """A model given by name (``"default"``, a Hub id, a local folder or a ``.gguf`` file)
        loaded, with its tokenizer as the processing class unless one is given."""
        if isinstance(model, (str, os.PathLike)):
            from ivtrainer.modeling.loading import load_model

            model, tokenizer = load_model(model)
            processing_class = processing_class if processing_class is not None else tokenizer
        return model, processing_class

    @staticmethod
    def _check_peft_config(model: Any, peft_config: Any) -> None:
        """Refuse a ``peft_config`` that is not one, or one given with a model that already has adapters."""
        from peft import PeftConfig

        from ivtrainer.errors import InvalidInputError
        from ivtrainer.modeling.hooks import is_peft_model

        if not isinstance(peft_config, PeftConfig):
            raise InvalidInputError(
                f"peft_config must be a peft.PeftConfig (e.g. LoraConfig(r=8, task_type='CAUSAL_LM')), got "
                f"{type(peft_config).__name__}"
            )
        if is_peft_model(model):
            raise InvalidInputError(
                "model is already a PeftModel and peft_config was given: pass the base model with peft_config, "
                "or the PeftModel alone"
            )

    @classmethod
    def _with_peft(cls, model: Any, peft_config: Any, seed: int) -> Any:
        """``model`` wrapped with ``peft_config`` (trl's ``peft_config=``), the adapter's
        initialisation seeded like the run."""
        if peft_config is None:
            return model
        from peft import get_peft_model
        from transformers import set_seed

        cls._check_peft_config(model, peft_config)
        set_seed(seed)
        return get_peft_model(model, peft_config)

    @staticmethod
    def _checked_args(args: Any, config_class: Any, trainer: str, settings: str) -> Any:
        """``args``, or a default ``config_class``; refused if it is another TrainingArguments, and
        checked for pushing (repo id, token) before any work when ``push_to_hub`` is set."""
        args = config_class(output_dir="trainer_output") if args is None else args
        if not isinstance(args, config_class):
            raise TypeError(
                f"args is a {type(args).__name__}; {trainer} needs an {config_class.__name__} "
                f"(a TrainingArguments subclass with the {settings} settings)"
            )
        if args.push_to_hub:
            check_trainer_push(args)
        return args

    def push_to_hub(self, *args: Any, token: str | None = None, **kwargs: Any):
        check_trainer_push(self.args, token)  # a clear error before anything is uploaded
        return super().push_to_hub(*args, token=token, **kwargs)  # type: ignore[misc]
