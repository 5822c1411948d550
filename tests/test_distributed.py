"""The real thing: ``accelerate launch`` with 2 CPU processes (gloo) and DeepSpeed ZeRO-2 / ZeRO-3
from the repository's own ``ds_configs``, against one process with the same global batch (the
script is tests/scripts/distributed_train.py): IVGuidedTrainer (LoRA, full) and FLearningTrainer (FT,
LoRA->FT). Losses must agree to 1e-5 (relative), and the saved model must reload with plain
transformers and give the single-process model's logits."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ivtrainer import extract_instruction_vector
from ivtrainer.testing import tiny_model

pytestmark = pytest.mark.slow  # multi-process launches / real-model scripts

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (
    ROOT / "tests" / "scripts" / "distributed_train.py"
)  # its own folder: run as a script, tests/ would shadow packages (tests/datasets)
SMALL = {"n_heads": 3, "n_shots": 2, "n_mean_prompts": 6, "n_cie_prompts": 2, "progress": False}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("distributed")
    model = tiny_model("llama", seed=1)
    model.save_pretrained(folder / "model")
    extract_instruction_vector(model, tokenizer, "antonym", **SMALL).save_pretrained(folder / "iv")
    return folder


@pytest.fixture(scope="module")
def single(assets):
    """One-process runs, by trainer (made once per module)."""
    cache: dict[tuple, Path] = {}

    def run(trainer: str, extra: tuple[str, ...] = ()) -> Path:
        if (trainer, extra) not in cache:
            cache[trainer, extra] = _run(
                assets, trainer, assets / f"single-{trainer}{'-'.join(extra)}", extra=extra
            )
        return cache[trainer, extra]

    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(assets: Path, trainer: str, out: Path, zero: str | Path | None = None, fail: bool = False, extra=()):
    script = [str(SCRIPT), "--trainer", trainer, "--model", str(assets / "model"), "--iv", str(assets / "iv")]
    script += list(extra)
    if zero is None:
        command = [sys.executable, *script, "--batch", "4", "--out", str(out)]
    else:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(zero) if isinstance(zero, Path) else f"ds_configs/accelerate_{zero}.yaml",
            "--num_processes",
            "2",
            "--main_process_port",
            str(_free_port()),
            *script,
            "--batch",
            "2",
            "--out",
            str(out),
        ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if fail:
        assert done.returncode != 0, done.stdout[-3000:]
        return done.stderr
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return out


def _logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # an adapter folder loads its base too
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 40).view(1, -1)).logits


@pytest.mark.parametrize(
    ("trainer", "zero"),
    [
        ("iv-lora", "zero2"),
        ("iv-lora", "zero3"),
        ("iv-full", "zero2"),
        ("iv-full", "zero3"),  # with the reference model sharded
        ("f-learning", "zero2"),
        ("f-learning", "zero3"),  # the old phase trains a sharded copy; the subtraction gathers
        ("f-learning-lora-ft", "zero3"),  # LoRA forgetting subtracted from a sharded model
    ],
)
def test_training_under_deepspeed_matches_one_process(assets, single, trainer, zero):
    reference = single(trainer)
    out = _run(assets, trainer, assets / f"{zero}-{trainer}", zero)
    got, want = (json.loads((f / "losses.json").read_text()) for f in (out, reference))
    keys = ("loss", "ce", "kl") if trainer.startswith("iv") else ("loss",)
    for key in keys:
        assert len(got[key]) == 3
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), rtol=1e-5, atol=1e-7)
    if trainer.startswith("iv"):
        assert want["kl"][-1] > 0  # the KL term is really there
    expected_teacher = {
        "iv-lora": "adapters disabled",  # no second model, under any stage
        "iv-full": "zero3 shard" if zero == "zero3" else "full copy",
    }.get(trainer)
    assert got["teacher"] == expected_teacher
    torch.testing.assert_close(_logits(out / "model"), _logits(reference / "model"), rtol=1e-4, atol=1e-5)


def test_a_deepspeed_config_contradicting_the_arguments_fails_when_the_trainer_is_built(assets, tmp_path):
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    config.update(train_micro_batch_size_per_gpu=16, gradient_clipping=0.5)  # the script says 2 and 1.0
    (tmp_path / "ds.json").write_text(json.dumps(config))
    yaml = (ROOT / "ds_configs" / "accelerate_zero2.yaml").read_text()
    (tmp_path / "launch.yaml").write_text(yaml.replace("ds_configs/zero2.json", str(tmp_path / "ds.json")))
    stderr = _run(assets, "iv-lora", tmp_path / "out", tmp_path / "launch.yaml", fail=True)
    assert "the DeepSpeed config contradicts the training arguments" in stderr
    assert "train_micro_batch_size_per_gpu=16" in stderr and "gradient_clipping=0.5" in stderr
    assert 'set these DeepSpeed values to "auto"' in stderr
    assert (
        "trainer.train()" not in stderr.split("contradicts")[0].rsplit("Traceback", 1)[-1]
    )  # at construction


def test_a_model_that_cannot_be_copied_under_zero3_gets_a_clear_error():
    from torch import nn

    from ivtrainer.utils.distributed import zero3_copy

    with pytest.raises(ValueError, match="can only copy a transformers model"):
        zero3_copy(nn.Sequential(nn.Linear(2, 2)), "the KL teacher; or pass teacher=")


def test_lm_eval_callback_under_zero2_and_refused_under_zero3(assets, single):
    """The main process evaluates while the other waits: training goes on exactly as without the
    callback; under ZeRO-3 (the model sharded) it is refused before the first step."""
    out = _run(assets, "iv-lora", assets / "zero2-lm-eval", "zero2", extra=["--lm-eval"])
    got, want = (json.loads((f / "losses.json").read_text()) for f in (out, single("iv-lora")))
    torch.testing.assert_close(torch.tensor(got["loss"]), torch.tensor(want["loss"]), rtol=1e-5, atol=1e-7)
    saved = json.loads((out / "run" / "lm_eval.json").read_text())
    assert [e["step"] for e in saved["evaluations"]] == [0, 2]
    stderr = _run(assets, "iv-full", assets / "zero3-lm-eval", "zero3", fail=True, extra=["--lm-eval"])
    assert "lm-eval cannot evaluate a ZeRO-3-partitioned model in memory" in stderr


# ZeRO-2 LoRA stores the top 319 of 320 tokens; ZeRO-3 full fine-tuning the hidden states and the
# LM head (gathered from its shards)
@pytest.mark.parametrize(
    ("trainer", "zero", "top_k"), [("iv-lora", "zero2", "319"), ("iv-full", "zero3", "0")]
)
def test_the_precomputed_teacher_under_deepspeed(assets, single, trainer, zero, top_k):
    """Each process stores its share of the rows, both read the whole store: the losses of one
    process, no reference model or engine under any stage (full fine-tuning under ZeRO-3
    included), and the live teacher's KL."""
    extra = ("--teacher", "precomputed", "--top-k", top_k)
    out = _run(assets, trainer, assets / f"{zero}-{trainer}-stored", zero, extra=extra)
    got, want = (json.loads((f / "losses.json").read_text()) for f in (out, single(trainer, extra)))
    for key in ("loss", "ce", "kl"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), rtol=1e-5, atol=1e-7)
    assert got["teacher"] == want["teacher"] == "stored"
    meta = json.loads(next((out / "run" / "_ivtrainer_teacher").glob("*/meta.json")).read_text())
    assert len(meta["parts"]) == 2 and meta["rows"] == 16  # written by both processes
    if top_k == "0":  # the whole head, once
        assert (
            meta["parts"][0]["shapes"]["head_weight"] == [320, 64]
            and "head_weight" not in meta["parts"][1]["shapes"]
        )
    live = json.loads((single(trainer) / "losses.json").read_text())
    torch.testing.assert_close(torch.tensor(got["kl"]), torch.tensor(live["kl"]), rtol=1e-3, atol=1e-6)


def _torchrun(assets: Path, out: Path, processes: int, extra=(), fail: bool = False):
    script = [str(ROOT / "tests" / "scripts" / "fsdp_train.py"), "--model", str(assets / "model")]
    script += ["--iv", str(assets / "iv"), "--batch", str(4 // processes), "--out", str(out), *extra]
    command = [sys.executable, *script]
    if processes > 1:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(_free_port()), *script,
        ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if fail:
        assert done.returncode != 0, done.stdout[-3000:]
        return done.stderr
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads((out / "losses.json").read_text())


def test_the_precomputed_teacher_on_fsdp2_shards(assets):
    """torch's FSDP2 (fully_shard per decoder layer) over 2 CPU processes: the callback's losses
    with the precomputed teacher (hidden states, the LM head gathered from its shards; two KL terms
    and the head term) equal one process's. accelerate
    enables FSDP only on accelerators, so the loop is the script's (as the Trainer runs it); the
    live teacher is refused under FSDP."""
    one = _torchrun(assets, assets / "fsdp-1", 1)
    two = _torchrun(assets, assets / "fsdp-2", 2)
    assert two["teacher"] == one["teacher"] == "stored"
    torch.testing.assert_close(torch.tensor(two["loss"]), torch.tensor(one["loss"]), rtol=1e-5, atol=1e-7)
    assert len(set(one["loss"])) == len(one["loss"])  # it trained
    stderr = _torchrun(assets, assets / "fsdp-live", 2, extra=["--teacher", "auto"], fail=True)
    assert "live teacher does not support FSDP" in stderr and "teacher='precomputed'" in stderr


def test_the_train_command_under_accelerate_matches_one_process(tmp_path, tokenizer):
    """``accelerate launch --config_file ds_configs/accelerate_zero2.yaml -m ivtrainer train`` with 2
    processes trains a chat recipe (IV-guided, the own-task IV, LoRA) to the losses of one process.
    LoRA dropout and the per-micro-batch head threshold are off: each draws per process."""
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    chats = [
        {"messages": [{"role": "user", "content": f"Task: brix\nInput: word {i}"}, {"role": "assistant", "content": f"[word {i}]"}]}
        for i in range(24)
    ]  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    recipe = {
        "trainer": "iv-guided", "instruction_vectors": "auto", "model_name_or_path": str(tmp_path / "tiny"),
        "data_files": [str(tmp_path / "chat.jsonl")], "max_steps": 3, "learning_rate": 1e-2,
        "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "bf16": False, "seed": 0, "disable_tqdm": True, "use_peft": True, "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "lora_target_modules": ["q_proj", "v_proj"], "kl_threshold": [0.0, 0.0],
        "head_mse_threshold": 0.0,
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    train = ["-m", "ivtrainer", "train", "--config", str(tmp_path / "recipe.yaml")]
    runs = {
        "one": [sys.executable, *train, "--per_device_train_batch_size", "4", "--use_cpu", "true"],
        "two": [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", "ds_configs/accelerate_zero2.yaml",
            "--num_processes", "2", "--main_process_port", str(_free_port()), *train,
            "--per_device_train_batch_size", "2",
        ],
    }  # fmt: skip
    logs = {}
    for name, command in runs.items():
        out = tmp_path / name
        done = subprocess.run(
            [*command, "--output_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, done.stderr[-4000:]
        said = [line for line in done.stderr.splitlines() if "instruction_vectors='auto'" in line]
        assert len(said) == 1, said  # extracted once, on the main process, and sent to the other
        assert ("extracted on the main process for all 2" in said[0]) == (name == "two")
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        logs[name] = [e for e in history if "loss" in e]
    for key in ("loss", "ce", "kl_last_prompt", "kl_all", "head_mse"):
        got, want = ([e[key] for e in logs[name]] for name in ("two", "one"))
        assert len(want) == 3
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-7)
    assert logs["one"][-1]["kl_last_prompt"] > 0 and logs["one"][-1]["head_mse"] > 0


def test_an_auto_iv_that_fails_on_the_main_process_fails_every_process(tmp_path, tokenizer):
    """The own-task IV is extracted on the main process only: its error reaches the other process
    (which would otherwise wait for the IV forever) and both exit with it."""
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    chats = [
        {"messages": [{"role": "user", "content": f"w{i}"}, {"role": "assistant", "content": f"[w{i}]"}]}
        for i in range(5)
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "ds_configs/accelerate_zero2.yaml",
        "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "ivtrainer", "train",
        "--model", str(tmp_path / "tiny"), "--data_files", str(tmp_path / "chat.jsonl"), "--bf16", "false",
        "--instruction_vectors", "auto", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("ivtrainer train: error:")]
    assert len(errors) == 2 and all("too few for 10-shot prompts" in line for line in errors), done.stderr[
        -3000:
    ]
