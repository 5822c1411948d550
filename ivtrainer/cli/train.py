"""``ivtrainer train``: fine-tune a model from a YAML recipe, as ``trl sft --config sft.yaml`` does.

The file (or flags) hold the chosen trainer's config fields (``IVGuidedSFTConfig`` for
``iv-guided``, trl's ``SFTConfig`` for ``sft``, ``TrainingArguments`` for ``plain``,
``FLearningConfig`` for ``f-learning``), trl's dataset fields (``dataset_name`` ...) and model
fields (``model_name_or_path``, ``use_peft``, ``lora_r`` ...), and this command's own
(:class:`TrainArguments`). The trainer is chosen first, so that the parser knows its fields; a
``recipe`` gives its values as defaults that the file and the flags override.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ivtrainer.cli.common import config_path, read_config
from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.recipes import RECIPES

__all__ = ["TRAINERS", "TrainArguments", "main", "make_parser"]

#: trainer name -> what it trains with
TRAINERS = {
    "iv-guided": "IVGuidedSFTTrainer: trl's SFT data handling with the IV-guided loss (IVGuidedSFTConfig)",
    "sft": "trl's SFTTrainer, plain supervised fine-tuning (SFTConfig)",
    "plain": "transformers' Trainer on the rows tokenised by ivtrainer (TrainingArguments)",
    "f-learning": "FLearningTrainer: forget the old data's knowledge, then learn the new (FLearningConfig)",
}
DEFAULT_TRAINER = "iv-guided"

HELP = "fine-tune from a YAML recipe (trl-style): IV-guided, F-Learning, SFT or plain"
DESCRIPTION = (
    "Train as `trl sft --config sft.yaml` does, on a Hub dataset, a local folder or local JSON/JSONL/CSV/parquet "
    "files in any of trl's formats (messages, prompt/completion, text) or ivtrainer's (input/output, CounterFact/ZsRE "
    "records). --trainer picks the config whose fields the command takes (`ivtrainer train --trainer f-learning "
    "--help` lists them). See docs/train.md."
)


def _flag(default: Any, help: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class TrainArguments:
    """The ``train`` command's own fields (trl's ``ScriptArguments`` and ``ModelConfig`` give the
    dataset and model fields)."""

    trainer: str = _flag(
        DEFAULT_TRAINER, "; ".join(f"{k}: {v}" for k, v in TRAINERS.items()), choices=list(TRAINERS)
    )
    recipe: str | None = _flag(
        None,
        "iv-guided: a named recipe, its values the defaults the file and flags override",
        choices=sorted(RECIPES),
    )
    model: str | None = _flag(
        None,
        "'default' (the embedded SmolLM2-135M-Instruct), a Hub id, a folder or a .gguf file; the same as "
        "model_name_or_path (default: 'default')",
    )
    data_files: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "local JSON/JSONL/CSV/parquet files of the training rows (instead of dataset_name)"
        },
    )
    old_dataset_name: str | None = _flag(
        None, "f-learning: the old knowledge's dataset (a Hub id or a folder)"
    )
    old_dataset_config: str | None = _flag(None, "f-learning: the old dataset's configuration")
    old_data_files: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "f-learning: local files of the old knowledge (not needed for CounterFact/ZsRE records)"
        },
    )


def _config_class(trainer: str) -> type:
    if trainer == "iv-guided":
        from ivtrainer.iv_guided.iv_guided_sft_trainer import IVGuidedSFTConfig

        return IVGuidedSFTConfig
    if trainer == "sft":
        from trl import SFTConfig

        return SFTConfig
    if trainer == "f-learning":
        from ivtrainer.f_learning.f_learning_config import FLearningConfig

        return FLearningConfig
    from transformers import TrainingArguments

    return TrainingArguments


# ModelConfig's fields the command uses to load the model (the others are refused when set)
_LOAD_FIELDS = ("model_name_or_path", "model_revision", "dtype", "attn_implementation")
_PEFT_FIELDS = (
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
    "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora",
)  # fmt: skip


def _model_class(trainer: str) -> type:
    """trl's ``ModelConfig``; for F-Learning without its LoRA fields (FLearningConfig has its own)."""
    from trl import ModelConfig

    if trainer != "f-learning":
        return ModelConfig
    fields = [(f.name, f.type, f) for f in dataclasses.fields(ModelConfig) if f.name in _LOAD_FIELDS]
    return dataclasses.make_dataclass("ModelLoadConfig", fields)


def _peek(tokens: Sequence[str], key: str) -> str | None:
    """``--key``'s value from the command line, else from its ``--config`` file."""
    flags = {f"--{key}", f"--{key.replace('_', '-')}"}
    for i, token in enumerate(tokens):
        name, _, value = token.partition("=")
        if name in flags:
            return value if value else (tokens[i + 1] if i + 1 < len(tokens) else None)
    config = config_path(tokens)
    if config is None:
        return None
    values = read_config(config)
    found = values.get(key, values.get(key.replace("_", "-")))
    return None if found is None else str(found)


def make_parser(subparsers, tokens: Sequence[str] | None = None):
    """The ``train`` parser for the trainer ``tokens`` choose; with no tokens (another command
    runs), its name and help only: the training stack is not imported."""
    if tokens is None:
        return subparsers.add_parser("train", dataclass_types=(), help=HELP, description=DESCRIPTION)
    trainer = _peek(tokens, "trainer") or DEFAULT_TRAINER
    if trainer not in TRAINERS:
        raise InvalidInputError(f"unknown trainer {trainer!r}: choose one of {', '.join(TRAINERS)}")
    from trl import ScriptArguments

    gloo = _gloo_on_cpu_processes()  # before the config: TrainingArguments sets up the distributed state
    parser = subparsers.add_parser(
        "train",
        dataclass_types=(TrainArguments, ScriptArguments, _config_class(trainer), _model_class(trainer)),
        help=HELP,
        description=DESCRIPTION,
    )
    recipe = _peek(tokens, "recipe")
    if recipe is not None:
        if trainer != "iv-guided":
            raise InvalidInputError(f"recipe {recipe!r} is for the iv-guided trainer, not {trainer!r}")
        if recipe not in RECIPES:
            raise InvalidInputError(f"unknown recipe {recipe!r}: choose one of {sorted(RECIPES)}")
        parser.set_defaults(**RECIPES[recipe])
    if gloo:  # the Trainer reuses the gloo state
        parser.set_defaults(accelerator_config={"use_configured_state": True})
    if trainer == "iv-guided":  # None: decided by the data (true for chats, which need the answer's start)
        parser.set_defaults(assistant_only_loss=None)
    return parser


def checked_model_name(args: TrainArguments, model_args: Any) -> str:
    """The model to train: ``model`` or ``model_name_or_path`` (not two different ones)."""
    given = getattr(model_args, "model_name_or_path", None)
    if args.model and given and args.model != given:
        raise InvalidInputError(
            f"model {args.model!r} and model_name_or_path {given!r} conflict: give one of them"
        )
    return args.model or given or "default"


def check_model_fields(model_args: Any) -> None:
    """ModelConfig fields the command does not use, refused when set (a flag that does nothing is a
    bug): quantisation, for one."""
    from trl import ModelConfig

    defaults = ModelConfig()
    used = {*_LOAD_FIELDS, *_PEFT_FIELDS}
    for f in dataclasses.fields(model_args):
        if f.name not in used and getattr(model_args, f.name) != getattr(defaults, f.name):
            raise InvalidInputError(f"{f.name} is not supported by ivtrainer train; leave it unset")
    peft_set = [
        name for name in _PEFT_FIELDS[1:]
        if hasattr(model_args, name) and getattr(model_args, name) != getattr(defaults, name)
    ]  # fmt: skip
    if peft_set and not getattr(model_args, "use_peft", False):
        raise InvalidInputError(f"{', '.join(peft_set)} set without use_peft: true; add it, or drop them")


def _check_output_folder(output_dir: str, inputs: Sequence[str | None]) -> None:
    """The output folder is not a file, and not an input folder (the model's, the dataset's), whose
    files saving would replace."""
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"output_dir {output_dir} is a file; choose a folder")
    for given in inputs:
        if given and Path(given).expanduser().is_dir() and Path(given).expanduser().resolve() == out:
            raise InvalidInputError(
                f"output_dir {output_dir} is the input folder {given}; choose another folder"
            )


def _usable(rows: Any, data_format: Any, what: str, say: Any) -> Any:
    """The rows that can train; the others (empty fields, chats without an answer) dropped and
    counted, all of them an error."""
    from ivtrainer.datasets.formats import usable_rows

    keep = usable_rows(rows, data_format)
    if not keep:
        raise InvalidInputError(f"{what}: none of its {len(rows)} rows can train ({data_format})")
    if len(keep) < len(rows):
        say(f"{what}: {len(rows) - len(keep)} of {len(rows)} rows dropped (empty answer or text)")
        rows = rows.select(keep)
    return rows


def _edits_as_prompt_completion(rows: Any) -> Any:
    """Knowledge-edit records as prompt/completion text: the prompt and its new target."""
    from datasets import Dataset

    from ivtrainer.datasets.edits import load_edits

    return Dataset.from_list(
        [{"prompt": e["prompt"], "completion": " " + e["target_new"]} for e in load_edits(rows)]
    )


def _gloo_on_cpu_processes() -> bool:
    """Under ``accelerate launch`` without GPUs (DeepSpeed on CPU processes), the gloo backend,
    made before the Trainer, which then reuses it (``use_configured_state``)."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.cuda.is_available():
        return False
    from accelerate import PartialState

    PartialState(backend="gloo")
    return True


def main(args: TrainArguments, script: Any, config: Any, model_args: Any) -> int:
    from accelerate import PartialState

    from ivtrainer.datasets.formats import EDITS, INPUT_OUTPUT, MESSAGES, as_prompt_completion, detect_format
    from ivtrainer.datasets.loading import load_split

    say = PartialState().print  # once, on the main process
    # Everything checked before any model loads.
    model_name = checked_model_name(args, model_args)
    check_model_fields(model_args)
    for name in (
        "dataset_streaming",
        "ignore_bias_buffers",
    ):  # trl's script fields this command has no use for
        if getattr(script, name):
            raise InvalidInputError(f"{name} is not supported by ivtrainer train; leave it unset")
    old_given = args.old_dataset_name or args.old_data_files
    if old_given and args.trainer != "f-learning":
        raise InvalidInputError(
            f"old_dataset_name / old_data_files are for the f-learning trainer, not {args.trainer!r}"
        )
    _check_output_folder(config.output_dir, [model_name, script.dataset_name])
    if config.push_to_hub:
        from ivtrainer.hub.push import check_trainer_push

        check_trainer_push(config)
    source = dict(config=script.dataset_config)
    train_rows = load_split(script.dataset_name, args.data_files, split=script.dataset_train_split, **source)
    eval_rows = None
    if str(getattr(config.eval_strategy, "value", config.eval_strategy)) != "no":
        eval_rows = load_split(
            script.dataset_name, args.data_files, split=script.dataset_test_split, **source
        )
    data_format = detect_format(train_rows)
    train_rows = _usable(train_rows, data_format, "train data", say)
    say(f"train data: {len(train_rows)} rows, {data_format}")
    old_rows = old_format = None
    if args.trainer == "f-learning":
        if data_format is EDITS and old_given:
            raise InvalidInputError(
                "knowledge-edit records hold the old knowledge: drop old_dataset_name / old_data_files"
            )
        if data_format is not EDITS:
            old_rows = load_split(
                args.old_dataset_name, args.old_data_files, config=args.old_dataset_config,
                split=script.dataset_train_split, what="old_dataset",
            )  # fmt: skip
            old_format = detect_format(old_rows)
            old_rows = _usable(old_rows, old_format, "old data", say)
            say(f"old data: {len(old_rows)} rows, {old_format}")
    elif data_format is EDITS:  # the new targets, as prompt/completion text
        train_rows = _edits_as_prompt_completion(train_rows)
        data_format = detect_format(train_rows)
        eval_rows = _edits_as_prompt_completion(eval_rows) if eval_rows is not None else None
    vectors = None
    if args.trainer == "iv-guided":
        from ivtrainer.iv_guided.iv_guided_trainer import answer_uses
        from ivtrainer.iv_guided.own_task_iv import AUTO
        from ivtrainer.steering.instruction_vector import load_vectors

        given = config.instruction_vectors
        if given and given not in (AUTO, [AUTO]):
            vectors = load_vectors(given)  # read (and checked) before the model loads
        from ivtrainer.iv_guided.iv_guided_trainer import check_answer_marked

        check_answer_marked(config, data_format)  # 'text' rows leave the IV no place
        if config.assistant_only_loss is None:
            config.assistant_only_loss = data_format is MESSAGES and bool(answer_uses(config))
            if config.assistant_only_loss:
                say(
                    "assistant_only_loss: true ('messages' data: the IV-guided terms work at the assistant's answer)"
                )
    if data_format is INPUT_OUTPUT and args.trainer in ("sft", "iv-guided"):
        train_rows = as_prompt_completion(train_rows)
        eval_rows = as_prompt_completion(eval_rows) if eval_rows is not None else None

    from ivtrainer.modeling.loading import load_model

    kwargs = {"dtype": model_args.dtype}
    if model_args.model_revision not in (None, "main"):
        kwargs["revision"] = model_args.model_revision
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    model, tokenizer = load_model(model_name, **kwargs)
    say(
        f"model: {model_name} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)"
    )
    from transformers import set_seed

    set_seed(config.seed)  # new adapters' weights: the same on every process and in every run
    trainer = _trainer(args, config, model_args, model, tokenizer, train_rows, eval_rows, old_rows, vectors)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    trainer.save_state()  # trainer_state.json: the log history
    say(f"saved to {config.output_dir}")
    if config.push_to_hub:
        dataset = script.dataset_name or ", ".join(args.data_files or [])
        # the model card names the data: trl's and ivtrainer's cards take dataset_name, Trainer's dataset
        trainer.push_to_hub(**{"dataset" if args.trainer == "plain" else "dataset_name": dataset})
        say(f"pushed to the Hub: {trainer.hub_model_id}")
    trainer.end()  # the trackers and the process group, closed before the interpreter exits
    return 0


def _trainer(args, config, model_args, model, tokenizer, train_rows, eval_rows, old_rows, vectors):
    """The chosen trainer, its data tokenised as it takes it."""
    from transformers import DataCollatorForSeq2Seq

    from ivtrainer.datasets.formats import EDITS, detect_format, tokenize_rows

    if args.trainer == "iv-guided":
        from trl import get_peft_config

        from ivtrainer.iv_guided.iv_guided_sft_trainer import IVGuidedSFTTrainer

        return IVGuidedSFTTrainer(
            model, config, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=tokenizer,
            peft_config=get_peft_config(model_args), instruction_vectors=vectors,
        )  # fmt: skip
    if args.trainer == "sft":
        from trl import SFTTrainer, get_peft_config

        return SFTTrainer(
            model, config, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
        )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)  # pads labels with -100
    if args.trainer == "f-learning":
        from ivtrainer.datasets.edits import edit_dataset, load_edits
        from ivtrainer.f_learning.f_learning_trainer import FLearningTrainer

        if detect_format(train_rows) is EDITS:
            edits = load_edits(train_rows)
            new, old = edit_dataset(edits, tokenizer, "new"), edit_dataset(edits, tokenizer, "old")
        else:
            new, old = tokenize_rows(train_rows, tokenizer), tokenize_rows(old_rows, tokenizer)
        return FLearningTrainer(
            model,
            config,
            data_collator=collator,
            train_dataset=new,
            old_dataset=old,
            processing_class=tokenizer,
        )
    from transformers import Trainer

    if model_args.use_peft:
        from peft import get_peft_model
        from trl import get_peft_config

        model = get_peft_model(model, get_peft_config(model_args))
    evaluation = tokenize_rows(eval_rows, tokenizer) if eval_rows is not None else None
    return Trainer(
        model, config, data_collator=collator, train_dataset=tokenize_rows(train_rows, tokenizer),
        eval_dataset=evaluation, processing_class=tokenizer,
    )  # fmt: skip
