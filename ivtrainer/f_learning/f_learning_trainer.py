"""F-Learning, forgetting before learning (Ni et al., ACL 2024), as a drop-in ``Trainer``.

``train()`` runs three phases:

1. *old*: fine-tune on the old knowledge (full, or a LoRA adapter named ``"forget"``), written to
   ``<output_dir>/_forget`` with its own checkpoints and ``trainer_state.json`` (the leading
   underscore keeps it out of ``push_to_hub``); its result, the delta's source, goes to
   ``<output_dir>/_forget/delta`` (skipped when ``old_adapter`` / ``old_model`` is given);
2. *forget*: ``theta' = theta - lambda * (theta_old - theta)``, in memory;
3. *learn*: this Trainer's own training loop on ``train_dataset``, from ``theta'``.

The subtraction is recomputed from ``<output_dir>/_forget/delta`` by a new trainer, so
``train(resume_from_checkpoint=True)`` resumes an interrupted run in either training phase; a
second ``train()`` on the same trainer does not subtract again (its model already forgot).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from ivtrainer.arithmetic.adapter_subtraction import save_adapter, subtract_adapter, unload_adapters
from ivtrainer.arithmetic.model_delta import subtract_model_delta
from ivtrainer.base_trainer import BaseTrainerMixin
from ivtrainer.errors import InvalidInputError
from ivtrainer.f_learning.f_learning_config import OLD_PHASE_DIR, FLearningConfig, variant_name
from ivtrainer.modeling.hooks import is_peft_model
from ivtrainer.utils.distributed import (
    NoEmptyParamGroupsMixin,
    check_deepspeed_config,
    deepspeed_enabled,
    is_zero3_partitioned,
    zero3_copy,
)
from ivtrainer.utils.outputs import atomic_dir

__all__ = ["FLearningTrainer"]

logger = logging.get_logger(__name__)

#: Below this ||lambda * delta|| / ||W|| a warning says the subtraction is close to a no-op (on
#: SmolLM2-135M a LoRA old phase at lr 5e-5 gave 1.8e-4 and kept 93% of the old targets; at 1e-3,
#: 2.7e-3 and 25%: `python benchmarks/f_learning_delta.py`).
SMALL_DELTA = 1e-3

_MARKER = "f_learning.json"


class FLearningTrainer(BaseTrainerMixin, Trainer):
    """A ``Trainer`` that forgets the old knowledge before learning the new.

    The arguments are ``transformers.Trainer``'s, in its order, plus trl's ``peft_config`` and,
    by keyword, one source of the old knowledge:

    Args:
        model: the model holding the old knowledge, or its name (``"default"``, a Hub id, a folder
            or a ``.gguf`` file: loaded with its tokenizer); a ``PeftModel`` when
            ``learn_method="lora"`` and you brought your own adapter.
        args: an :class:`~ivtrainer.FLearningConfig`.
        train_dataset: the new knowledge.
        peft_config: with ``learn_method="lora"``, the learning phase's adapter (default:
            ``args.lora_config()``).
        old_dataset: the old knowledge, to fine-tune on first (``args.forget_method``) ...
        old_adapter: ... or a LoRA adapter already trained on it (folder, Hub id or PeftModel) ...
        old_model: ... or a full fine-tune of ``model`` on it (module or folder).

    The other arguments are ``transformers.Trainer``'s; the old phase uses the same
    ``data_collator``, ``processing_class`` and ``callbacks``.
    """

    def __init__(
        self,
        model: nn.Module | str,
        args: FLearningConfig | None = None,
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
        *,
        old_dataset: Any = None,
        old_adapter: Any = None,
        old_model: nn.Module | str | os.PathLike | None = None,
    ) -> None:
        from peft import get_peft_model

        args = self._checked_args(args, FLearningConfig, "FLearningTrainer", "forget_*")
        if peft_config is not None and args.learn_method != "lora":
            raise InvalidInputError(
                "peft_config is the learning phase's adapter, but learn_method is 'full': set "
                "learn_method='lora' (FLearningConfig), or leave peft_config out"
            )
        given = [
            n
            for n, v in (("old_dataset", old_dataset), ("old_adapter", old_adapter), ("old_model", old_model))
            if v is not None
        ]
        if len(given) != 1:
            raise InvalidInputError(
                f"pass exactly one source of the old knowledge: old_dataset (to fine-tune on), old_adapter "
                f"or old_model (an existing fine-tune); got {given or 'none'}"
            )
        if train_dataset is None:
            raise InvalidInputError("pass train_dataset: the new knowledge to learn")
        module: Any
        module, processing_class = self._model_from(model, processing_class)
        if peft_config is not None:  # wrapped below, where args.lora_config() would be
            self._check_peft_config(module, peft_config)
        is_peft = is_peft_model(module)
        if args.learn_method == "full" and is_peft:
            raise InvalidInputError(
                "learn_method='full' but model is a PeftModel: pass the base model, or set learn_method='lora'"
            )
        if old_dataset is not None and args.forget_method == "full" and args.learn_method == "lora":
            raise InvalidInputError(
                "forget_method='full' with learn_method='lora' (FT->LoRA) is not supported with old_dataset: "
                "fine-tune on the old knowledge yourself and pass old_model=, or use forget_method='lora'"
            )
        if args.learn_method == "lora" and not is_peft:
            set_seed(args.seed)  # the adapter's initialisation, reproducible like the rest of the run
            module = get_peft_model(module, peft_config if peft_config is not None else args.lora_config())
        self.old_dataset, self.old_adapter, self.old_model = old_dataset, old_adapter, old_model
        self._old_kwargs: dict[str, Any] = {
            k: v
            for k, v in (
                ("data_collator", data_collator), ("processing_class", processing_class), ("callbacks", callbacks)
            )
            if v is not None
        }  # fmt: skip
        self._forget_logs: dict[str, float] = {}
        self._forgotten = False  # the subtraction is done once per model
        self._deepspeed_template = _deepspeed_template(args)  # before the Trainer fills it in
        super().__init__(
            model=module, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )  # fmt: skip
        check_deepspeed_config(self.accelerator)
        if old_dataset is not None and args.learn_method == "lora" and deepspeed_enabled():
            raise InvalidInputError(
                "F-Learning with learn_method='lora' and old_dataset is not supported under DeepSpeed yet: use "
                "learn_method='full' (FT or LoRA->FT), or the LoRA variant without DeepSpeed (it fits where LoRA "
                "training fits)"
            )

    args: FLearningConfig
    model: Any  # a transformers model, or a PeftModel (learn_method="lora"): their methods differ

    @property
    def forget_dir(self) -> Path:
        return Path(str(self.args.output_dir)) / OLD_PHASE_DIR

    # -- phases ------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):  # type: ignore[override]
        """Old-knowledge fine-tuning (unless a delta was given), subtraction, new-knowledge training.

        ``resume_from_checkpoint=True`` picks up wherever the last run stopped; a checkpoint path
        under ``<output_dir>/_forget`` resumes the old phase, any other the learning phase.
        """
        old_resume, new_resume = self._split_resume(resume_from_checkpoint)
        if not self._forgotten:
            delta, kind = self._old_delta(old_resume)
            self._forget(delta, kind)
        elif old_resume and old_resume is not True:  # an old-phase checkpoint, named explicitly
            raise InvalidInputError(
                "this trainer already finished the old-knowledge phase and subtracted its delta; resume the "
                "learning phase (resume_from_checkpoint=True or one of its checkpoints) or build a new trainer"
            )
        return super().train(resume_from_checkpoint=new_resume, **kwargs)

    def _split_resume(self, resume):
        if resume is True:
            return True, get_last_checkpoint(self.args.output_dir) if Path(
                self.args.output_dir
            ).is_dir() else None
        if resume and Path(resume).resolve().is_relative_to(self.forget_dir.resolve()):
            return resume, None
        return None, resume

    def _old_delta(self, resume) -> tuple[Any, str]:
        """(source, "lora" | "full") of the old-knowledge delta: given, saved by an earlier run, or
        trained now."""
        if self.old_adapter is not None:
            return self.old_adapter, "lora"
        if self.old_model is not None:
            return self.old_model, "full"
        marker = self.forget_dir / _MARKER
        if not marker.is_file():
            self._train_old(resume)
        saved = json.loads(marker.read_text())
        return self.forget_dir / saved["delta"], saved["forget_method"]

    def _train_old(self, resume) -> None:
        """Phase 1: fine-tune on the old knowledge, save the result as the delta's source, and put
        the model back as it was (the subtraction reads the saved delta, as a resumed run does)."""
        from peft import PeftModel, get_peft_model

        if deepspeed_enabled():
            return self._train_old_deepspeed(resume)
        args = self.args
        model = self.model
        snapshot: dict[str, torch.Tensor] = {}
        active = trainable = None
        if args.forget_method == "lora":
            if isinstance(model, PeftModel):
                active = model.active_adapter
                set_seed(args.seed)
                model.add_adapter("forget", args.lora_config())
                model.set_adapter("forget")
            else:
                trainable = {n: p.requires_grad for n, p in model.named_parameters()}
                set_seed(args.seed)
                model = get_peft_model(model, args.lora_config(), adapter_name="forget")
        else:  # the base weights, to subtract the delta from after training in place
            snapshot = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}
        if resume is True:
            resume = get_last_checkpoint(self.forget_dir) if self.forget_dir.is_dir() else None
        try:
            old = _OldPhaseTrainer(
                model=model,
                args=args.old_phase_arguments(),
                train_dataset=self.old_dataset,
                **self._old_kwargs,
            )
            old.train(resume_from_checkpoint=resume)
            if self.args.should_save:  # one writer in a multi-process run
                with atomic_dir(self.forget_dir / "delta") as tmp:
                    if args.forget_method == "lora":
                        folder = save_adapter(model, tmp / "adapter", "forget")
                        for item in folder.iterdir():
                            item.rename(tmp / item.name)
                        shutil.rmtree(tmp / "adapter")
                    else:
                        model.save_pretrained(tmp)
        finally:  # back to the model as it was, also when the old phase fails or is interrupted
            if args.forget_method == "lora":
                if active is not None:
                    self.model.set_adapter(active)
                    self.model.delete_adapter("forget")
                else:
                    unload_adapters(model, trainable)
            else:
                with torch.no_grad():
                    for n, p in model.named_parameters():
                        p.data.copy_(snapshot[n].to(p.device))
        del old, snapshot
        gc.collect()
        self._write_marker()

    def _write_marker(self) -> None:
        if self.args.should_save:
            marker = {"delta": "delta", "forget_method": self.args.forget_method, "complete": True}
            (self.forget_dir / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        self.accelerator.wait_for_everyone()  # every process reads the delta next

    def _train_old_deepspeed(self, resume) -> None:
        """Phase 1 under DeepSpeed: a copy of the model (partitioned like it under ZeRO-3) is
        fine-tuned by its own Trainer and saved; the model itself never changes, so nothing has to
        be put back. DeepSpeed's config is shared by the processes' Trainers: it is refilled from
        the template for each phase's arguments."""
        from peft import get_peft_model

        args = self.args
        model = (
            zero3_copy(self.model, "F-Learning's old-knowledge phase")
            if is_zero3_partitioned(self.model)
            else (copy.deepcopy(self.model))
        )
        if args.forget_method == "lora":
            set_seed(args.seed)
            model = get_peft_model(model, args.lora_config(), adapter_name="forget")
        if resume is True:
            resume = get_last_checkpoint(self.forget_dir) if self.forget_dir.is_dir() else None
        old_args = args.old_phase_arguments()
        old_args.deepspeed_plugin = None  # accelerate lets only the processes' first Accelerator bring one
        old = _OldPhaseTrainer(model=model, args=old_args, train_dataset=self.old_dataset, **self._old_kwargs)
        _refill_deepspeed_config(old.accelerator, self._deepspeed_template, old_args)
        try:
            old.train(resume_from_checkpoint=resume)
            staging = self.forget_dir / ".delta.staging"  # the same path on every process
            old.save_model(str(staging))  # gathers ZeRO-3 shards; the main process writes
            if args.should_save:
                saved = staging / "forget" if args.forget_method == "lora" else staging
                with atomic_dir(self.forget_dir / "delta") as tmp:
                    for item in saved.iterdir():
                        if item.is_file():
                            item.rename(tmp / item.name)
                shutil.rmtree(staging)
        finally:
            old.accelerator.free_memory()
            _refill_deepspeed_config(self.accelerator, self._deepspeed_template, args)
        del old, model
        gc.collect()
        self._write_marker()

    def _forget(self, delta, kind: str) -> None:
        """Phase 2: ``theta' = theta - lambda * delta``, in place on ``self.model``'s base weights."""
        lam = self.args.forget_lambda
        stats: dict[str, float] = {}
        if kind == "lora":
            subtract_adapter(self.model, delta, lam, check_base_model=False, stats=stats)
        else:
            subtract_model_delta(self.model, delta, lam, stats=stats)
        self._forgotten = True
        # logged with the learning phase's first log; the relative size shows a no-op
        self._forget_logs = {
            "forget_lambda": lam,
            "forget_delta_norm": stats["delta_norm"],
            "forget_relative_delta": stats["relative"],
        }
        message = (
            f"F-Learning subtracted lambda {lam:g} x the old-knowledge delta: ||lambda*delta|| = "
            f"{stats['delta_norm']:.4g}, {stats['relative']:.3g} of the changed weights' norm ({stats['tensors']} tensors)"
        )
        if lam > 0 and stats["relative"] < SMALL_DELTA:
            logger.warning(
                "%s. That is small enough to change little of what the model knows: train the old phase longer "
                "or with a higher old_learning_rate, or raise forget_lambda",
                message,
            )
        else:
            logger.info(message)

    def create_model_card(  # type: ignore[override]  # dataset_name instead of transformers' list of tags
        self, model_name: str | None = None, dataset_name: str | None = None, **kwargs: Any
    ):
        """Write ``README.md`` in ``output_dir``: variant, lambda, both phases' settings, base model
        and the last training log (what ``push_to_hub`` uploads)."""
        from ivtrainer.hub.model_cards import adapter_description, write_trainer_card

        args = self.args
        delta = (
            f"given adapter `{self.old_adapter}`"
            if self.old_adapter is not None and not isinstance(self.old_adapter, nn.Module)
            else f"given fine-tune `{self.old_model}`"
            if isinstance(self.old_model, (str, os.PathLike))
            else "given"
            if self.old_dataset is None
            else f"{args.forget_method} fine-tuning on the old knowledge, {args.old_num_train_epochs:g} epochs at "
            f"learning rate {args.old_learning_rate:g}"
        )
        parameters = {
            "variant": variant_name(
                args.forget_method
                if self.old_dataset is not None
                else "lora"
                if self.old_adapter is not None
                else "full",
                args.learn_method,
            ),
            "lambda": args.forget_lambda,
            "old-knowledge delta": delta,
            "learning phase": adapter_description(self.model),
            "learning rate": args.learning_rate,
            "optimizer steps": self.state.global_step,
        }
        write_trainer_card(self, "f-learning", parameters, dataset_name)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._forget_logs:  # once, with the learning phase's first log
            logs = {**logs, **self._forget_logs}
            self._forget_logs = {}
        super().log(logs, *args, **kwargs)


class _OldPhaseTrainer(NoEmptyParamGroupsMixin, Trainer):
    """The old-knowledge phase's plain Trainer."""


def _deepspeed_template(args) -> dict | None:
    """The DeepSpeed config as given (its "auto" values unfilled), or None without DeepSpeed."""
    if args.deepspeed:
        if isinstance(args.deepspeed, dict):
            return copy.deepcopy(args.deepspeed)
        return json.loads(Path(args.deepspeed).read_text())
    plugin = getattr(args, "deepspeed_plugin", None)  # accelerate launch --use_deepspeed / a DeepSpeed YAML
    return copy.deepcopy(plugin.deepspeed_config) if plugin is not None else None


def _refill_deepspeed_config(accelerator, template: dict | None, args) -> None:
    """Make the processes' shared DeepSpeed config the template filled from ``args`` (what
    transformers does once per process; F-Learning's two phases have different arguments)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or template is None:
        return
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    # what transformers' propagate_args_to_deepspeed does (a module function only since 5.x minor
    # releases; a Trainer method in 5.0), from the template instead of the already-filled config
    plugin.hf_ds_config = HfTrainerDeepSpeedConfig(copy.deepcopy(template))
    plugin.deepspeed_config = plugin.hf_ds_config.config
    plugin.hf_ds_config.trainer_config_process(args)
