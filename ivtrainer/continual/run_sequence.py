"""Continual instruction tuning: train a sequence of tasks in turn and score every task after
every stage (what the IV papers evaluate).

LoRA (the public FvForgetting code's setting): each task trains a new adapter (r 8 on q_proj and
v_proj) on the model with the earlier tasks' adapters merged in. Full fine-tuning trains the
weights themselves. Methods, all behind the same loop:

- ``plain``: sequential fine-tuning;
- ``replay``: plus ``replay_fraction`` of each earlier task's training rows mixed in;
- ``kl-anchor``: ``IVGuidedConfig.recipe("kl-anchor")``, the KL terms towards the model before this
  task, no IV;
- ``iv-guided``: ``IVGuidedConfig.recipe("fvforgetting")`` with the task's own IV, extracted from
  its training rows on the model before it is trained;
- ``iv-guided-replay``: ``iv-guided`` on ``replay``'s rows.

Every stage writes ``stages/<s>/`` (scores, the adapter or the IV) before the next begins, so a
run killed in stage 3 and started again with the same settings continues from stage 3 and ends
with the same numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ivtrainer.continual.continual_config import (
    _GUIDED,
    _OWN_IV,
    _REPLAY,
    LORA_TARGETS,
    METHODS,
    QUICK,
    ContinualSettings,
    Method,
    _name,
)
from ivtrainer.continual.metrics import continual_scores
from ivtrainer.continual.sequence_tasks import ORDERS, SEQUENCE_TASKS, load_sequence_task
from ivtrainer.datasets.tasks import load_examples
from ivtrainer.errors import InvalidInputError
from ivtrainer.utils.outputs import atomic_dir, atomic_file
from ivtrainer.utils.progress import with_progress_bar

__all__ = ["METHODS", "QUICK", "ContinualSettings", "load_final_model", "run_sequence", "task_rows"]

logger = logging.getLogger(__name__)


def task_rows(task: str, split: str) -> list[dict[str, str]]:
    """Rows of a built-in sequence task, or of a JSON/JSONL file of ``{"input", "output"}`` pairs
    (prompt = the input, completion = a space and the output; 20% test, 10% validation, fixed)."""
    if task in SEQUENCE_TASKS:
        return load_sequence_task(task, split)  # type: ignore[arg-type]  # checked there
    path = Path(task).expanduser()
    if not path.is_file():
        raise InvalidInputError(
            f"unknown task {task!r}: name a built-in sequence task ({sorted(SEQUENCE_TASKS)}) or a JSON/JSONL file"
        )
    pairs = load_examples(path)
    random.Random(f"sequence/{path.name}").shuffle(pairs)
    n_test, n_val = max(1, len(pairs) // 5), max(1, len(pairs) // 10)
    if len(pairs) - n_test - n_val < 1:
        raise InvalidInputError(f"{task}: {len(pairs)} pairs leave nothing to train on; give at least 3")
    chosen = {
        "test": pairs[:n_test],
        "validation": pairs[n_test : n_test + n_val],
        "train": pairs[n_test + n_val :],
    }
    return [
        {"prompt": p["input"], "completion": " " + p["output"], "input": p["input"], "output": p["output"]}
        for p in chosen[split]
    ]


def run_sequence(
    tasks: Sequence[str] | None = None,
    *,
    out: str | os.PathLike,
    method: Method = "iv-guided",
    model: str = "default",
    lora: bool = True,
    seed: int = 0,
    progress: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Train ``tasks`` in order with ``method`` and score every task (test split) and the held-out
    abilities (5-shot ICL on the built-in word tasks) after every stage; write ``out/results.json``,
    ``results.md`` and two plots, and return the results. ``tasks`` default to ``ORDERS["order1"]``;
    ``settings`` are further :class:`ContinualSettings` fields. Started again on the same ``out``
    with the same settings, it continues after the last finished stage."""
    config = ContinualSettings(
        tasks=tuple(tasks) if tasks is not None else tuple(ORDERS["order1"]),
        method=method, model=model, lora=lora, seed=seed, **settings,
    )  # fmt: skip
    splits = ("train", "test", "validation")
    rows = {t: {s: task_rows(t, s) for s in splits} for t in config.tasks}  # every task checked now
    _check_sizes(config, rows)
    out = Path(out).expanduser()
    # every check that needs no model, before it loads: the folder, a resumed run's inputs and stages
    resuming = _check_out(out, config)
    # the rows the stages train and score on (--repair's validation rows are computed anew)
    inputs: dict[str, Any] = {
        "tasks": {
            _name(t): _digest({s: rows[t][s] for s in ("train", config.eval_split)}) for t in config.tasks
        }
    }
    folder = _model_folder(config.model)
    if folder is not None:
        inputs["model_files"] = _files_digest(folder)
    if resuming:
        _check_inputs(out, inputs)
        _check_stages(out, config)
    heads = _head_set(config)
    if folder is not None and (folder / "config.json").is_file():  # from its config: no weights read
        _check_model(_empty_model(folder), config, heads)
    from transformers import set_seed

    from ivtrainer.iv_guided.precomputed_teacher import model_fingerprint
    from ivtrainer.modeling.loading import load_model

    set_seed(config.seed)
    current, tokenizer = load_model(config.model)
    if torch.cuda.is_available():  # every stage's evaluation and IV too, not only the Trainer's steps
        current = current.to("cuda")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    _check_model(current, config, heads)  # again: a .gguf file has no config to check it from
    inputs["model"] = model_fingerprint(current)
    if resuming:
        _check_inputs(out, inputs)
    # written once every check has passed: a refused run leaves nothing that blocks its corrected rerun
    for name, values in (("settings.json", dataclasses.asdict(config)), ("inputs.json", inputs)):
        if not (out / name).is_file():
            out.mkdir(parents=True, exist_ok=True)
            with atomic_file(out / name) as tmp:
                tmp.write_text(json.dumps(json.loads(json.dumps(values)), indent=1))
    stages: list[dict[str, Any]] = []
    for stage in range(len(config.tasks) + 1):
        folder = out / "stages" / str(stage)
        if (folder / "scores.json").is_file():  # finished in an earlier run: rebuild its model
            stages.append(json.loads((folder / "scores.json").read_text()))
            if stage > 0:
                current = _restore(current, folder, config)
                if config.repair and not (folder / TASK_IV).is_dir():  # a run made without --repair
                    with atomic_dir(folder / TASK_IV) as tmp:
                        _capture_task_iv(current, tokenizer, config, stage, rows, progress).save_pretrained(
                            tmp
                        )
            continue
        times = {"train": 0.0, "evaluate": 0.0, "iv": 0.0}  # this stage's, kept with its scores
        if stage > 0:
            task = config.tasks[stage - 1]
            logger.warning("stage %d of %d: %s (%s)", stage, len(config.tasks), _name(task), config.method)
            with atomic_dir(folder) as tmp:
                record: dict[str, Any] = {}
                current = _train_stage(current, tokenizer, config, stage, rows, tmp, times, record, progress)
                if config.repair:  # the task's IV on the model that has just learnt it
                    _capture_task_iv(current, tokenizer, config, stage, rows, progress).save_pretrained(
                        tmp / TASK_IV
                    )
                start = time.perf_counter()
                scores = _evaluate(current, tokenizer, config, rows)
                times["evaluate"] += time.perf_counter() - start
                scores["seconds"] = times
                scores.update(record)
                (tmp / "scores.json").write_text(json.dumps(scores, indent=1))
            if not config.lora and stage > 1:  # only the latest full model is needed to continue
                shutil.rmtree(out / "stages" / str(stage - 1) / "model", ignore_errors=True)
        else:
            start = time.perf_counter()
            scores = _evaluate(current, tokenizer, config, rows)
            times["evaluate"] += time.perf_counter() - start
            scores["seconds"] = times
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_file(folder / "scores.json") as tmp_file:
                tmp_file.write_text(json.dumps(scores, indent=1))
        stages.append(scores)
    repair = _repair(current, tokenizer, config, rows, out, stages) if config.repair else None
    return _write_results(out, config, stages, repair, final_model=model_fingerprint(current))


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


def _check_sizes(config: ContinualSettings, rows) -> None:
    """Enough rows for what the method does with them, before any work."""
    from ivtrainer.steering.icl import check_extraction_sizes

    for task in config.tasks:
        train = rows[task]["train"][: config.n_train]
        if config.method in _OWN_IV:  # the own-task IV: 10-shot prompts from the training rows
            check_extraction_sizes(train, n_shots=10, source=_name(task))


def _head_set(config: ContinualSettings):
    """The saved head set for the own-task IVs (read before the model loads), or None."""
    if config.iv_heads is None:
        return None
    from ivtrainer.steering.head_set import HeadSet

    return HeadSet.from_pretrained(config.iv_heads)


def _check_model(model: nn.Module, config: ContinualSettings, heads) -> None:
    """What depends on the model, checked right after it loads, before any stage."""
    if config.lora:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in LORA_TARGETS if t not in present]
        if missing:
            raise InvalidInputError(
                f"LoRA trains {' and '.join(LORA_TARGETS)} (FvForgetting's setting), but the model "
                f"({getattr(model.config, 'model_type', '?')}) has no module named {missing[0]}: use --full, or a "
                "Llama-family model"
            )
    if heads is not None:
        heads.check_compatible(model)


def _training_args(
    cls, config: ContinualSettings, output_dir: Path, stage: int, progress: bool, **extra: Any
):
    return cls(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,  # with_progress_bar shows one bar per stage
        seed=config.seed + stage,
        data_seed=config.seed + stage,
        use_cpu=not torch.cuda.is_available(),
        **extra,
    )


def _train_stage(
    current: nn.Module, tokenizer, config, stage: int, rows, folder: Path, times, record, progress
) -> nn.Module:
    """Train the stage's task on ``current``; the model after it (LoRA: the adapter merged in)."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from ivtrainer.callbacks.forgetting_monitor import ForgettingMonitorCallback
    from ivtrainer.iv_guided.iv_guided_config import IVGuidedConfig
    from ivtrainer.iv_guided.iv_guided_trainer import IVGuidedTrainer, tokenize_prompt_completion
    from ivtrainer.iv_guided.own_task_iv import own_task_iv

    task = config.tasks[stage - 1]
    train = rows[task]["train"][: config.n_train]
    if config.method in _REPLAY:
        rng = random.Random(config.seed + stage)
        for earlier in config.tasks[: stage - 1]:
            pool = rows[earlier]["train"][: config.n_train]
            train = train + rng.sample(pool, round(config.replay_fraction * len(pool)))
    pairs = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train])
    data = tokenize_prompt_completion(pairs, tokenizer)
    vectors = []
    if config.method in _OWN_IV:  # on the model before this task, as the public code does
        start = time.perf_counter()
        iv = own_task_iv(
            current, tokenizer, pairs, name=_name(task), seed=config.seed, progress=progress,
            heads=config.iv_heads, n_mean_prompts=config.iv_mean_prompts, n_cie_prompts=config.iv_cie_prompts,
            n_calibration_prompts=config.iv_calibration_prompts,
        )  # fmt: skip
        times["iv"] += time.perf_counter() - start
        iv.save_pretrained(folder / "instruction_vector")
        vectors = [iv]
    set_seed(config.seed + stage)
    student: Any = current  # a PeftModel with LoRA
    if config.lora:  # a new adapter over the earlier ones, merged (FvForgetting's --create_new_adapter)
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, lora_alpha=16, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
        student = get_peft_model(current, lora)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    scratch = folder / "trainer"
    if config.method not in _GUIDED:
        args = _training_args(TrainingArguments, config, scratch, stage, progress)
        trainer = Trainer(student, args, train_dataset=data, data_collator=collator)
    else:
        args = _training_args(
            IVGuidedConfig, config, scratch, stage, progress, **config.guided_values(),
            teacher=config.teacher, teacher_top_k=config.teacher_top_k,
            forgetting_monitor_every=0,  # the stage's own monitor below measures once, at its end
        )  # fmt: skip
        trainer = IVGuidedTrainer(
            student, args, instruction_vectors=vectors or None, train_dataset=data, data_collator=collator
        )
    # how far the stage moves the model on its own rows (RL's Razor's predictor of forgetting): at
    # the end of the stage only, so the training itself is untouched
    monitor = ForgettingMonitorCallback(n_rows=MONITOR_ROWS, every=0)
    trainer.add_callback(monitor)
    start = time.perf_counter()
    with_progress_bar(trainer, f"stage {stage}: {_name(task)}", disable=not progress).train()
    times["train"] += time.perf_counter() - start
    record["forgetting_kl"] = {k: monitor.history[-1][f"kl_{k}"] for k in ("forward", "reverse")}
    shutil.rmtree(scratch, ignore_errors=True)
    if config.lora:
        student.save_pretrained(folder / "adapter")
        return student.merge_and_unload()
    student.save_pretrained(folder / "model")
    return student


TASK_IV = "task_iv"
MONITOR_ROWS = 16


def _capture_task_iv(model: nn.Module, tokenizer, config: ContinualSettings, stage: int, rows, progress):
    """The IV of stage ``stage``'s task, extracted from its training rows on ``model`` (the model
    right after the stage), as the own-task IVs are (``iv_heads``, sizes)."""
    from datasets import Dataset

    from ivtrainer.iv_guided.own_task_iv import own_task_iv

    task = config.tasks[stage - 1]
    train = rows[task]["train"][: config.n_train]
    pairs = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train])
    return own_task_iv(
        model, tokenizer, pairs, name=_name(task), seed=config.seed, progress=progress, heads=config.iv_heads,
        n_mean_prompts=config.iv_mean_prompts, n_cie_prompts=config.iv_cie_prompts,
        n_calibration_prompts=config.iv_calibration_prompts,
    )  # fmt: skip


def _repair(
    model: nn.Module, tokenizer, config: ContinualSettings, rows, out: Path, stages
) -> dict[str, Any]:
    """IV repair on the final model: each task's IV (captured after its stage) added to its test
    prompts, the task given or routed from the prompt; strengths and the router's layer chosen on
    the validation rows only."""
    from ivtrainer.steering.instruction_vector import InstructionVector
    from ivtrainer.steering.repair import (
        IVRepair,
        NearestTaskRouter,
        TaskVectors,
        choose_strengths,
        exact_match,
    )

    start = time.perf_counter()
    names = [_name(t) for t in config.tasks]
    vectors = {
        _name(t): InstructionVector.from_pretrained(out / "stages" / str(s) / TASK_IV)
        for s, t in enumerate(config.tasks, start=1)
    }
    repair = TaskVectors(vectors)
    validation = {_name(t): rows[t]["validation"] for t in config.tasks}
    tried = choose_strengths(model, tokenizer, repair, validation)
    router = NearestTaskRouter.fit(
        model, tokenizer, {n: [r["prompt"] for r in v] for n, v in validation.items()}
    )
    # what a user loads to repair the final model around generate (IVRepair.from_pretrained)
    IVRepair(repair, router).save_pretrained(out / "repair")
    test = {_name(t): rows[t]["test"][: config.n_test] for t in config.tasks}
    given, routed, correct, total, unrouted = {}, {}, 0, 0, 0
    for name in names:
        prompts = [r["prompt"] for r in test[name]]
        hits = exact_match(model, tokenizer, test[name], repair=repair, tasks=[name] * len(prompts))
        given[name] = sum(hits) / len(hits)
        route = router.route(model, tokenizer, prompts)
        hits = exact_match(model, tokenizer, test[name], repair=repair, tasks=route)
        routed[name] = sum(hits) / len(hits)
        correct, total = correct + sum(r == name for r in route), total + len(route)
        unrouted += sum(r is None for r in route)
    final = stages[-1]["tasks"]
    learnt = [stages[i + 1]["tasks"][n] for i, n in enumerate(names)]  # right after each task's stage

    def summary(accuracy: dict[str, float]) -> dict[str, float]:
        ap = sum(accuracy.values()) / len(names)
        bwt = sum(accuracy[n] - learnt[i] for i, n in enumerate(names[:-1])) / max(len(names) - 1, 1)
        return {"AP": ap, "BWT": bwt if len(names) > 1 else 0.0}

    return {
        "strengths": dict(repair.strengths),
        "validation_accuracy": {n: {str(k): v for k, v in t.items()} for n, t in tried.items()},
        "router_layer": router.layer,
        "routing_accuracy": correct / total,
        # the task prompts the router's gate took for prompts of no known task (wrong routes too)
        "unrouted": unrouted / total,
        "task_given": given,
        "routed": routed,
        "without": {n: final[n] for n in names},
        "task_given_scores": summary(given),
        "routed_scores": summary(routed),
        "seconds": round(time.perf_counter() - start, 1),
    }


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


def _evaluate(model: nn.Module, tokenizer, config: ContinualSettings, rows) -> dict[str, Any]:
    """Exact-match accuracy (every answer token the argmax, teacher-forced: greedy decoding's
    answer) on each task's test rows; and the held-out abilities."""
    from ivtrainer.evaluation.forgetting import icl_abilities
    from ivtrainer.evaluation.predictions import target_predictions

    tasks = {}
    for t in config.tasks:  # a task's prompts share their instruction: computed once
        test = rows[t][config.eval_split][: config.n_test]
        predictions = target_predictions(
            model, tokenizer, [r["prompt"] for r in test], [r["output"] for r in test], shared_prefix=True
        )
        tasks[_name(t)] = sum(pred == target for pred, target in predictions) / len(test)
    fixed = config.icl_demos == "fixed"
    scores = {
        "tasks": tasks,
        "abilities": icl_abilities(model, tokenizer, n_icl=config.n_icl, fixed_demos=fixed),
    }
    if config.lm_eval_tasks:
        from ivtrainer.evaluation.lm_eval_harness import evaluate_lm

        scores["lm_eval"] = evaluate_lm(model, tokenizer, config.lm_eval_tasks, limit=config.lm_eval_limit)
    return scores


def _write_results(
    out: Path,
    config: ContinualSettings,
    stages: list[dict[str, Any]],
    repair: dict[str, Any] | None = None,
    final_model: str | None = None,
) -> dict[str, Any]:
    from ivtrainer.continual.report import write_report

    names = [_name(t) for t in config.tasks]
    matrix = [[s["tasks"][n] for n in names] for s in stages]
    abilities = sorted(stages[0]["abilities"])
    before = sum(stages[0]["abilities"].values()) / len(abilities)
    after = sum(stages[-1]["abilities"].values()) / len(abilities)
    results = {
        "settings": {**dataclasses.asdict(config), "tasks": names},
        "tasks": names,
        "accuracy_matrix": matrix,
        **continual_scores(matrix),
        "abilities": {a: [s["abilities"][a] for s in stages] for a in abilities},
        "abilities_mean": [sum(s["abilities"].values()) / len(abilities) for s in stages],
        "ability_retention": after - before,
        # each stage's KL from the model before it, on 16 of its training rows (None: not measured)
        "forgetting_kl": [s.get("forgetting_kl") for s in stages[1:]],
        # lm-eval's scores after every stage, and their change from before to after
        **(
            {
                "lm_eval": {k: [s["lm_eval"][k] for s in stages] for k in sorted(stages[0]["lm_eval"])},
                "lm_eval_retention": {
                    k: stages[-1]["lm_eval"][k] - stages[0]["lm_eval"][k]
                    for k in sorted(stages[0]["lm_eval"])
                },
            }
            if config.lm_eval_tasks
            else {}
        ),
        **({"repair": repair} if repair is not None else {}),
        # the weights the run ended with (load_final_model checks the model it rebuilds against it)
        "final_model": final_model,
        # every stage's own times, whichever run it ran in (None: a stage written before they were kept)
        "seconds": (
            {k: round(sum(st["seconds"][k] for st in stages), 1) for k in ("train", "evaluate", "iv")}
            if all("seconds" in st for st in stages)
            else None
        ),
    }
    with atomic_file(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    write_report(out, results)
    return results
