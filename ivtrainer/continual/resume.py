"""A continual run's folder: whether it can continue (the same settings, inputs and stages as
the run that wrote it), and the models it holds read back (each stage's, the final one)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ivtrainer.continual.continual_config import (
    ContinualSettings,
    _name,
)
from ivtrainer.continual.stage import TASK_IV
from ivtrainer.errors import InvalidInputError

logger = logging.getLogger(__name__)


# Settings that change only what is measured at the end, not the stages.
_NOT_IDENTITY = ("repair",)


# What a run made before a setting existed did instead of that setting's default.
_BEFORE_THE_FIELD: dict[str, Any] = {"icl_demos": "per-query"}


def _check_out(out: Path, config: ContinualSettings) -> bool:
    """Whether ``out`` holds a run of these settings to continue (True) or may take a new one
    (False); anything else is refused."""
    path = out / "settings.json"
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))  # as saved: tuples are lists
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict) or "tasks" not in saved:
                raise ValueError("not a continual run's settings")
        except ValueError as exc:
            raise InvalidInputError(
                f"{path} is not a continual run's settings ({exc}): give another --out, or delete it to start over"
            ) from None
        for field in dataclasses.fields(config):  # settings added since that run was made
            saved.setdefault(field.name, _BEFORE_THE_FIELD.get(field.name, field.default))
        saved = json.loads(json.dumps(saved))
        for name in _NOT_IDENTITY:  # evaluation-only settings: the same run may be scored with or without
            saved.pop(name, None)
            wanted.pop(name, None)
        if saved != wanted:
            diff = sorted(k for k in wanted if saved.get(k) != wanted[k])
            raise InvalidInputError(
                f"{out} holds a run with other settings ({', '.join(diff)} differ): give another --out, or the same "
                "settings to continue it"
            )
        return True
    from ivtrainer.utils.outputs import OutputExistsError, check_output_dir

    inputs = [
        t for t in (*config.tasks, config.model, config.iv_heads) if t and Path(t).expanduser().exists()
    ]
    try:  # the rules of every --out: not an input, the home or the current directory, not a file
        check_output_dir(out, inputs=inputs)
    except OutputExistsError:
        raise InvalidInputError(
            f"--out {out} is not empty and holds no continual run (no settings.json): give a new or empty folder"
        ) from None
    return False


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=16).hexdigest()


def _check_inputs(out: Path, inputs: dict[str, Any]) -> None:
    """Refuse to continue a run whose task rows or model weights are not those it began with."""
    path = out / "inputs.json"
    if not path.is_file():  # a run made before inputs were recorded: they are recorded now
        return
    try:
        saved = json.loads(path.read_text())
        saved_tasks, saved_model = dict(saved["tasks"]), saved.get("model")
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{path} is unreadable ({exc}): start over with a new --out") from None
    changed = [name for name, digest in inputs["tasks"].items() if saved_tasks.get(name) != digest]
    if changed:
        raise InvalidInputError(
            f"the rows of task {changed[0]!r} changed since {out} began (its file was edited): the stages already "
            "trained used the old rows; give a new --out to run with these, or restore the file"
        )
    if "iv_heads" in inputs and saved.get("iv_heads", inputs["iv_heads"]) != inputs["iv_heads"]:
        raise InvalidInputError(
            f"the own-task IVs of {out} took their heads from another head set (or per-task CIE) when it began: "
            "give a new --out, or the head set it began with (--iv_heads)"
        )
    files = inputs.get("model_files")
    if ("model" in inputs and saved_model is not None and inputs["model"] != saved_model) or (
        files is not None and saved.get("model_files") not in (None, files)
    ):
        raise InvalidInputError(
            f"the model at --model is not the one {out} began with (other weights at the same path): give a new "
            "--out, or point --model at the original weights"
        )


def _check_stages(out: Path, config: ContinualSettings) -> None:
    """The finished stages a resumed run builds on, checked before the model loads: each one's
    scores, its adapter (LoRA) or, with full fine-tuning, the latest model, which is the only one kept."""
    names = sorted(_name(t) for t in config.tasks)
    stages = out / "stages"
    finished = 0
    while (stages / str(finished) / "scores.json").is_file():
        finished += 1
    later = (
        [p.name for p in stages.iterdir() if p.name.isdigit() and int(p.name) > finished]
        if stages.is_dir()
        else []
    )

    def damaged(stage: int, why: str) -> InvalidInputError:
        fix = (
            f"delete {stages / str(stage)} and the stages after it, then run the same command to train them again"
            if config.lora or stage <= 1
            else "start over with a new --out (with --full only the latest stage's model is kept)"
        )
        return InvalidInputError(f"stage {stage} of {out} is damaged ({why}): {fix}")

    if later:
        raise damaged(finished, f"stages {sorted(later, key=int)} exist after it, but it has no scores.json")
    missing = [s for s in range(1, finished - 1) if not (stages / str(s) / TASK_IV).is_dir()]
    if config.repair and not config.lora and missing:
        raise InvalidInputError(
            f"--repair needs each task's IV from right after its stage, and stages {missing} of this --full run were "
            "trained without --repair (only the latest model is kept, so they cannot be captured now): start a new "
            "--out with --repair"
        )
    for stage in range(finished):
        folder = stages / str(stage)
        try:
            scores = json.loads((folder / "scores.json").read_text())
            if sorted(scores["tasks"]) != names or not isinstance(scores["abilities"], dict):
                raise ValueError(f"its scores are for tasks {sorted(scores['tasks'])}, not {names}")
        except (ValueError, KeyError, TypeError) as exc:
            raise damaged(stage, f"scores.json: {exc}") from None
        if stage == 0:
            continue
        weights = (folder / "adapter" / "adapter_model.safetensors") if config.lora else (folder / "model")
        if config.lora or stage == finished - 1:
            try:
                _check_weights(weights)
            except (OSError, ValueError) as exc:
                what = "the adapter" if config.lora else "the model (the only one kept with --full)"
                raise damaged(stage, f"{what}: {exc}") from None


def _check_weights(path: Path) -> None:
    """A LoRA adapter's safetensors file (with its config), or a model folder's files, present
    and whole: each file as long as its header says."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    config = path / "config.json" if path.is_dir() else path.parent / "adapter_config.json"
    if not config.is_file() or not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"{path if not config.is_file() or not files else files[0]} is missing")
    for file in files:
        with file.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if file.stat().st_size < 8 + length + end:
            raise ValueError(f"{file.name} is truncated ({file.stat().st_size} of {8 + length + end} bytes)")


def _model_folder(model: str) -> Path | None:
    """The local folder or .gguf file ``--model`` names (the default model's converted folder, a
    Hub id's cached snapshot), or None when there is none yet."""
    from ivtrainer.modeling.loading import DEFAULT_MODEL, default_model_path

    if model == DEFAULT_MODEL:
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model.split("@", 1)[0], "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _files_digest(path: Path) -> str:
    """The model's identity on disk: config.json's content and each weights file's name, size and
    modification time (a weights file rewritten in place changes them; cheap for 7B weights)."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    parts: list[list[Any]] = []
    for f in files:
        if f.name == "config.json":
            parts.append(["config.json", f.read_text()])
        elif f.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
            st = f.stat()
            parts.append([f.name, st.st_size, st.st_mtime_ns])
    return _digest(parts)


def _empty_model(folder: Path) -> nn.Module:
    """The model's modules from its config, on the meta device: no weights read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"--model {folder}: cannot read its config ({exc})") from None


def load_final_model(out: str | os.PathLike) -> tuple[nn.Module, Any]:
    """The model at the end of a finished run in ``out`` and its tokenizer: the run's model with
    every stage restored in turn (LoRA: each stage's adapter merged), the model its results and
    ``<out>/repair`` were measured on."""
    from ivtrainer.modeling.loading import load_model

    out = Path(out).expanduser()
    try:
        saved = json.loads((out / "settings.json").read_text())
        config = ContinualSettings(
            **{f.name: saved[f.name] for f in dataclasses.fields(ContinualSettings) if f.name in saved}
        )
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(
            f"{out} holds no continual run ({type(exc).__name__}: settings.json missing or unreadable): give the "
            "--out of `ivtrainer continual`"
        ) from None
    folders = [out / "stages" / str(stage) for stage in range(1, len(config.tasks) + 1)]
    unfinished = [f.name for f in folders if not (f / "scores.json").is_file()]
    if unfinished:
        raise InvalidInputError(
            f"{out}: stages {unfinished} are not finished; run the same `ivtrainer continual` command again to finish them"
        )
    model, tokenizer = load_model(config.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not config.lora:  # only the latest full model is kept
        folders = folders[-1:]
    for folder in folders:
        model = _restore(model, folder, config)
    from ivtrainer.iv_guided.precomputed_teacher import model_fingerprint

    try:
        recorded = json.loads((out / "results.json").read_text()).get("final_model")
    except (OSError, ValueError):
        recorded = None
    if recorded and model_fingerprint(model) != recorded:  # other base weights, or merged on another device
        logger.warning(
            "%s: the rebuilt model's weights differ from those the run ended with (the model %r changed since, or "
            "the run merged its adapters on another device): its results may not hold for this model",
            out,
            config.model,
        )
    return model.eval(), tokenizer


def _restore(current: nn.Module, folder: Path, config: ContinualSettings) -> nn.Module:
    """The model after a finished stage, from ``current`` (the model before it)."""
    if config.lora:
        from peft import PeftModel

        return PeftModel.from_pretrained(current, folder / "adapter").merge_and_unload()
    if (folder / "model").is_dir():  # only the latest full model is kept
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder / "model")
    return current
