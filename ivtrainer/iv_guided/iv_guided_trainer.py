"""IV-guided training (Jiang et al. 2024) as a drop-in ``Trainer``: the KL terms and head term
(:class:`~ivtrainer.iv_guided.guidance.IVGuidance`) added to the loss in ``compute_loss``, the
student's annealed IV and the guidance's lifecycle kept by the callbacks of
:mod:`ivtrainer.callbacks`, their metrics logged through ``Trainer.log``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, default_data_collator

from ivtrainer.base_trainer import BaseTrainerMixin
from ivtrainer.callbacks import IVCallback, IVInterventionCallback, IVKLCallback
from ivtrainer.callbacks.iv_intervention import IVLike, check_labels_reach_the_model
from ivtrainer.datasets.formats import EDITS, DataFormat, detect_format, tokenize_rows
from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.guidance import IVGuidance
from ivtrainer.iv_guided.iv_guided_config import IVGuidedConfig
from ivtrainer.iv_guided.own_task_iv import AUTO, own_task_iv
from ivtrainer.steering.instruction_vector import load_vectors
from ivtrainer.utils.distributed import check_deepspeed_config

__all__ = ["IVGuidedMixin", "IVGuidedTrainer", "answer_uses", "check_answer_marked", "iv_guided_callbacks"]


def iv_guided_callbacks(args: IVGuidedConfig, instruction_vectors, *, in_forward: bool = True) -> list:
    """The callbacks an :class:`IVGuidedConfig` describes; add them to a plain ``Trainer`` or
    ``SFTTrainer`` for the same training as IVGuidedTrainer: an
    :class:`~ivtrainer.callbacks.IVInterventionCallback` when the student's IV strength is ever
    non-zero (not in FvForgetting's recipe), and the :class:`~ivtrainer.callbacks.IVKLCallback`
    (``in_forward=False``: its loss is left to the trainer's ``compute_loss``, as IVGuidedTrainer's)."""
    callbacks: list = []
    schedule = args.iv_schedule_obj()
    if schedule.start != 0 or schedule.end != 0:
        callbacks.append(
            IVInterventionCallback(
                instruction_vectors, schedule, positions=args.iv_positions, weights=args.iv_weights
            )
        )
    callbacks.append(
        IVKLCallback(
            instruction_vectors,
            terms=args.kl_terms(),
            teacher_strength=args.teacher_iv_strength,
            direction=args.kl_direction,
            temperature=args.kl_temperature,
            head_mse_weight=args.head_mse_weight,
            head_mse_threshold=args.head_mse_threshold,
            head_mse_reference=args.head_mse_reference,
            iv_weights=args.iv_weights,
            teacher="precomputed" if args.teacher == "precomputed" else "auto",
            teacher_top_k=args.teacher_top_k,
            teacher_cache_dir=args.teacher_cache_dir,
            in_forward=in_forward,
        )
    )
    return callbacks


class IVGuidedMixin(BaseTrainerMixin):
    """What IVGuidedTrainer and IVGuidedSFTTrainer add to their base trainer: the guidance's loss
    in ``compute_loss``, the IV callbacks built from the config (the student's IV; the guidance's
    lifecycle and checkpoint state), their metrics merged into ``Trainer.log``, hooks removed after
    ``train()`` whatever happens."""

    args: IVGuidedConfig
    _not_model_inputs: tuple[str, ...] = ()  # batch keys the model's forward does not take

    def _setup_iv(self, model: nn.Module, args, instruction_vectors, kwargs: dict) -> None:
        schedule = args.iv_schedule_obj()
        if schedule.start != 0 or schedule.end != 0:  # the student's IV goes before the first label
            check_labels_reach_the_model(args, kwargs.get("compute_loss_func"))
        given = instruction_vectors if instruction_vectors is not None else args.instruction_vectors
        if given == AUTO or given == [AUTO]:  # FvForgetting's recipe: the training data's own IV
            given = own_task_iv(
                model,
                kwargs.get("processing_class"),
                kwargs.get("train_dataset"),
                heads=args.auto_iv_heads,
                seed=args.seed,
                progress=not args.disable_tqdm,
            )
        if given is None and args.uses_instruction_vectors():
            raise InvalidInputError(
                "no instruction vector given: pass instruction_vectors='auto' (the training data's own IV, "
                "FvForgetting's recipe), IV folders written by `ivtrainer extract-iv`, or InstructionVector objects; "
                "or use IVGuidedConfig.recipe('kl-anchor', ...) for a KL anchor without IV"
            )
        vectors = load_vectors(given) if given is not None else []
        for iv in vectors:
            iv.check_compatible(model)  # before any work
        self.iv_callbacks = iv_guided_callbacks(args, vectors, in_forward=False)
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), *self.iv_callbacks]

    @property
    def instruction_vectors(self):
        return self.iv_callbacks[-1].vectors

    def _guidance(self) -> IVGuidance:
        """The guidance of the KL callback in use (a resumed run may have replaced the one built
        with the trainer by one restored from the checkpoint)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, IVKLCallback):
                return callback.guidance
        raise InvalidInputError("IVGuidedTrainer's IVKLCallback was removed from its callbacks: add it back")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The base trainer's loss plus, in training, the KL terms and head term towards the
        IV-intervened model before training."""
        if not model.training or not torch.is_grad_enabled():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        guidance = self._guidance()
        inputs = {k: v for k, v in inputs.items() if k not in self._not_model_inputs}
        batch = dict(inputs)  # with its labels, which Trainer pops for label smoothing or compute_loss_func
        loss, outputs = self._model_loss(model, inputs, num_items_in_batch)
        # normalised as the CE is: by the batch's token count where the CE is, else per micro-batch
        counted = self.model_accepts_loss_kwargs or self.compute_loss_func is not None
        items = num_items_in_batch if counted else None
        scale = self._loss_scale(items)
        logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
        # the teacher pass runs on the model itself (a PEFT model with its adapters off), not on
        # its DDP or DeepSpeed wrapper
        unwrapped = self.accelerator.unwrap_model(model)
        loss = loss + scale * guidance(unwrapped, batch, logits, loss.detach() / scale, items)
        return (loss, outputs) if return_outputs else loss

    def _model_loss(self, model, inputs, num_items_in_batch):
        """The base trainer's own loss and the model's outputs."""
        return super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)

    def _loss_scale(self, num_items_in_batch) -> int:
        """What ``Trainer.compute_loss`` multiplies a loss normalised by the global token count by
        (``average_tokens_across_devices``), so that the extra terms are scaled as the CE is."""
        if not self.args.average_tokens_across_devices or num_items_in_batch is None:
            return 1
        if self.args.n_gpu > 1:
            return self.args.n_gpu
        get_tp_size = getattr(self, "get_tp_size", None)  # transformers >= 5.x: TP ranks share a batch
        return self.accelerator.num_processes // (get_tp_size() if get_tp_size is not None else 1)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: ce, kl, iv_strength, kl_weight, through report_to
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, IVCallback):
                    logs = {**logs, **callback.metrics()}
        super().log(logs, *args, **kwargs)

    def create_model_card(  # type: ignore[override]  # dataset_name instead of transformers' list of tags
        self, model_name: str | None = None, dataset_name: str | None = None, **kwargs: Any
    ):
        """Write ``README.md`` in ``output_dir``: method, IVs, schedule, weights, base model and the
        last training log (what ``push_to_hub`` uploads)."""
        from ivtrainer.hub.model_cards import adapter_description, write_trainer_card

        args = self.args
        iv_schedule = args.iv_schedule_obj()
        kl = ", ".join(
            f"{t.positions} x{t.weight.start:g}"
            + (f" -> {t.weight.end:g} ({t.weight.kind})" if t.weight.start != t.weight.end else "")
            + (f" above {t.threshold:g}" if t.threshold else "")
            for t in args.kl_terms()
        )
        parameters = {
            "student IV strength": f"{iv_schedule.kind} {iv_schedule.start:g} -> {iv_schedule.end:g} over "
            f"{iv_schedule.fraction:.0%} of the steps",
            "IV positions": args.iv_positions,
            "teacher IV strength": args.teacher_iv_strength,
            "KL terms": f"{kl}; {args.kl_direction}, temperature {args.kl_temperature:g}",
            "head MSE": f"weight {args.head_mse_weight:g}, counted above {args.head_mse_threshold:g}, against the "
            f"teacher {args.head_mse_reference.replace('_', ' ')}",
            "trained": adapter_description(self.model),
            "learning rate": args.learning_rate,
            "optimizer steps": self.state.global_step,
            "batch size": f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} "
            f"accumulation x {args.world_size} processes",
        }
        rows = [
            f"| {i} | {iv.task or '-'} | `{iv.model_name}` | {iv.edit_layer} | "
            + ", ".join(f"L{layer}H{head}" for layer, head in iv.heads)
            + f" | {w:g} |"
            for i, (iv, w) in enumerate(
                zip(self.instruction_vectors, args.iv_weights or [1.0] * 99, strict=False)
            )
        ]
        ivs = "| # | task | extracted on | edit layer | heads | weight |\n| --- | --- | --- | --- | --- | --- |\n"
        ivs += "\n".join(rows) + "\n\nThe vectors are in `instruction_vectors/` next to the weights."
        if not rows:
            ivs = "None: the teacher is the model before training, unchanged (a KL anchor)."
        write_trainer_card(self, "iv-guided", parameters, dataset_name, {"Instruction vectors": ivs})

    def train(self, *args: Any, **kwargs: Any):
        try:
            return super().train(*args, **kwargs)
        finally:  # hooks never outlive training, even when it fails
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, IVCallback):
                    callback.close()


class IVGuidedTrainer(IVGuidedMixin, Trainer):
    """A ``Trainer`` whose loss keeps the model close to its IV-intervened original self.

    The arguments are ``transformers.Trainer``'s, in its order, plus trl's ``peft_config`` and the
    instruction vectors:

    Args:
        model: the model to fine-tune, or its name: ``"default"``, a Hub id, a local folder or a
            ``.gguf`` file (loaded with its tokenizer, the ``processing_class`` unless one is given).
            A PEFT model trains adapters and uses its own base, adapters disabled, as the teacher; a
            plain model gets a frozen copy as the teacher.
        args: an :class:`~ivtrainer.IVGuidedConfig`.
        data_collator: default: pads ``labels`` with -100 (``DataCollatorForSeq2Seq``) when a
            ``processing_class`` is given.
        train_dataset: tokenised with ``labels`` (-100 on the prompt), or text rows tokenised here
            with the ``processing_class`` (:func:`~ivtrainer.datasets.formats.tokenize_rows`):
            ``prompt``/``completion`` (text or message lists; the loss covers the completion),
            ``input``/``output``, or ``messages`` chats rendered with the chat template (the loss
            covers the assistant turns, found by rendering each turn's prefix: any template whose
            renderings extend each other, ``{% generation %}`` markers or not).
        eval_dataset: as ``train_dataset`` (or a dict of them).
        peft_config: a ``peft.PeftConfig`` (e.g. ``LoraConfig``): the model is wrapped with it, as
            trl's trainers do.
        instruction_vectors: InstructionVectors, folders or Hub ids (default:
            ``args.instruction_vectors``); several are added together, each at its own layer.
            ``"auto"``: the IV of the training data itself, extracted from ``model`` before training
            (FvForgetting's recipe; from the head set ``args.auto_iv_heads`` when given).

    ``processing_class``, ``compute_loss_func``, ``compute_metrics``, ``callbacks``, ``optimizers``,
    ``optimizer_cls_and_kwargs`` and ``preprocess_logits_for_metrics`` are ``transformers.Trainer``'s.
    """

    def __init__(
        self,
        model: nn.Module | str,
        args: IVGuidedConfig | None = None,
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
        instruction_vectors: IVLike | Sequence[IVLike] | None = None,
    ) -> None:
        args = self._checked_args(args, IVGuidedConfig, "IVGuidedTrainer", "IV and KL")
        loaded, processing_class = self._model_from(model, processing_class)
        module: nn.Module = self._with_peft(loaded, peft_config, args.seed)
        kwargs: dict[str, Any] = dict(
            data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )  # fmt: skip
        self._setup_iv(module, args, instruction_vectors, kwargs)
        tokenizer = kwargs.get("processing_class")
        # text rows (prompt/completion, input/output, chats), for training and evaluation alike
        # (eval_dataset may be a dict)
        for key in ("train_dataset", "eval_dataset"):
            given = kwargs.get(key)
            named = given if isinstance(given, dict) else {None: given}
            formats = {name: _text_format(d) for name, d in named.items()}
            if not any(formats.values()):
                continue
            if tokenizer is None:
                raise InvalidInputError(
                    f"text data ({key}) needs processing_class= (the tokenizer) to tokenise it"
                )
            for data_format in filter(None, formats.values()):
                check_answer_marked(args, data_format)
            named = {
                name: tokenize_rows(d, tokenizer, formats[name]) if formats[name] else d
                for name, d in named.items()
            }
            kwargs[key] = named if isinstance(given, dict) else named[None]
        if kwargs.get("data_collator") is None and tokenizer is not None:
            kwargs["data_collator"] = DataCollatorForSeq2Seq(tokenizer, padding=True)  # pads labels with -100
        if kwargs.get("train_dataset") is not None:
            _check_labels(kwargs["train_dataset"], kwargs.get("data_collator") or default_data_collator)
        super().__init__(model=module, args=args, **kwargs)
        check_deepspeed_config(self.accelerator)


def _text_format(dataset) -> DataFormat | None:
    """The format of a dataset of text rows (None: tokenised already, or not a ``datasets.Dataset``)."""
    if not getattr(dataset, "column_names", None) or "input_ids" in dataset.column_names:
        return None
    data_format = detect_format(dataset)
    if data_format is EDITS:
        raise InvalidInputError(
            "knowledge-edit records: tokenise them with ivtrainer.datasets.edits.edit_dataset(records, tokenizer)"
        )
    return data_format


def answer_uses(args: IVGuidedConfig) -> list[str]:
    """What in ``args`` works at the answer's first token (the IV's place): the ``last_prompt`` and
    ``answer`` KL terms, the student's IV at ``last_prompt``, the head term."""
    uses = [f"the {p} KL" for p in args.kl_positions if p != "all"]
    schedule = args.iv_schedule_obj()
    if (schedule.start or schedule.end) and args.iv_positions == "last_prompt":
        uses.append("the student's IV at last_prompt")
    if args.head_mse_weight > 0:
        uses.append("the head term")
    return uses


def check_answer_marked(args: IVGuidedConfig, data_format: DataFormat) -> None:
    """Rows that mark no answer (``text``, chats labelled throughout) would leave what
    :func:`answer_uses` lists with no tokens, a silent no-op: refused before any work."""
    uses = answer_uses(args)
    if not data_format.has_answer and uses:
        raise InvalidInputError(
            f"{data_format} marks no answer, but {', '.join(uses)} work on the answer's first token: give "
            "prompt/completion or 'messages' data (on SFT with assistant_only_loss=True), or set "
            "kl_positions=['all'] and head_mse_weight=0"
        )


def _check_labels(dataset, collator) -> None:
    """One collated example must carry labels: the IV goes before the first label and the KL is
    masked by them."""
    if isinstance(dataset, torch.utils.data.IterableDataset):  # checked on the first batch instead
        return
    try:
        example = dataset[0]
    except Exception:  # no rows to index: checked on the first batch instead
        return
    batch = collator([example])
    if batch.get("labels") is None:
        raise InvalidInputError(
            "the training batches have no labels: IV-guided training places the IV before the first label and "
            "masks the KL with them. Tokenise with labels (-100 on the prompt), pass prompt/completion columns, "
            "or use DataCollatorForLanguageModeling(tokenizer, mlm=False)"
        )
