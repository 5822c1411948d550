"""``ivtrainer train --config recipe.yaml``: trl-style recipes on the data users have (chats,
prompt/completion, CounterFact records), the shipped example configs, and hostile input refused in
one line with exit code 2 before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import ivtrainer.modeling.loading
from ivtrainer.cli import main
from ivtrainer.testing import intercept_hub_upload, tiny_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "configs"


def _chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Task: brix\nInput: w{i}"},
            {"role": "assistant", "content": f"[w{i}]"},
        ]
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer):
    """A tiny Llama folder with a chat template, and data in several formats."""
    root = tmp_path_factory.mktemp("train")
    tiny_model("llama").save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    rows = [_chat(i) for i in range(24)]
    rows.append(
        {"messages": [{"role": "user", "content": "a chat that ends on the user"}]}
    )  # as public sets have
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompt_completion = [{"prompt": f"Q: w{i}\nA:", "completion": f" [w{i}]"} for i in range(24)]
    (root / "pc.json").write_text(json.dumps(prompt_completion))
    (root / "text.jsonl").write_text("".join(json.dumps({"text": f"w{i} [w{i}]"}) + "\n" for i in range(8)))
    (root / "empty.jsonl").write_text("")
    (root / "odd.csv").write_text("question,answer\nhot,cold\n")
    return root


def _recipe(assets: Path, tmp_path: Path, **values) -> Path:
    """A trl ``sft`` YAML with ``trainer: iv-guided`` and ``instruction_vectors: auto`` added."""
    recipe = {
        "model_name_or_path": str(assets / "tiny"),
        "data_files": [str(assets / "chat.jsonl")],
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "max_steps": 2,
        "learning_rate": 1.0e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "use_peft": True,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "trainer": "iv-guided",
        "instruction_vectors": "auto",
    }
    recipe.update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in recipe.items() if v is not None}))
    return path


def _losses(out: Path) -> list[dict]:
    return [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]


def test_a_trl_sft_recipe_with_the_iv_trains_on_local_chats(assets, tmp_path, capsys):
    assert main(["train", "--config", str(_recipe(assets, tmp_path))]) == 0
    printed = capsys.readouterr().out
    assert "conversational" in printed and "1 of 25 rows dropped" in printed
    assert "assistant_only_loss: true" in printed
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    logs = _losses(out)
    assert len(logs) == 2 and all("kl_last_prompt" in e and "head_mse" in e for e in logs)
    iv = json.loads(next((out / "instruction_vectors").rglob("instruction_vector.json")).read_text())
    assert iv["settings"]["chat_template"] is True  # read at the chat template's generation prompt


def test_flags_override_the_file_and_a_recipe_gives_defaults(assets, tmp_path, capsys):
    from ivtrainer.cli import parse
    from ivtrainer.iv_guided.recipes import RECIPES

    path = _recipe(assets, tmp_path, recipe="kl-anchor", learning_rate=0.5, kl_temperature=3.0)
    _, (args, _, config, model) = parse(["train", "--config", str(path), "--learning_rate", "0.25"])
    assert args.trainer == "iv-guided" and type(config).__name__ == "IVGuidedSFTConfig"
    assert config.learning_rate == 0.25  # the flag wins over the file
    assert config.kl_temperature == 3.0  # the file wins over the recipe
    assert config.teacher_iv_strength == RECIPES["kl-anchor"]["teacher_iv_strength"] == 0.0  # the recipe's
    assert model.use_peft and model.lora_target_modules == ["q_proj", "v_proj"]


def _refused(capsys, monkeypatch, argv, match: str) -> str:
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(ivtrainer.modeling.loading, "load_model", no_model)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.mark.parametrize(
    ("values", "flags", "match"),
    [
        ({"learnig_rate": 1.0}, [], "unknown key 'learnig_rate'; did you mean 'learning_rate'?"),
        ({"max_steps": "ten"}, [], "invalid int value: 'ten'"),
        ({}, ["--max_steps", "ten"], "invalid int value: 'ten'"),
        (
            {},
            ["--learnig_rate", "0.1"],
            "unrecognized argument '--learnig_rate'; did you mean '--learning_rate'?",
        ),
        ({"data_files": ["missing.jsonl"]}, [], "'missing.jsonl': no such file"),
        ({"data_files": ["."]}, [], "is a folder"),
        ({"data_files": None, "dataset_name": "someone/no-such-set"}, [], "cannot load it"),
        ({}, ["--dataset_name", "someone/set"], "both given"),
        ({"model": "default"}, [], "conflict"),
        ({"trainer": "dpo"}, [], "unknown trainer 'dpo'"),
        (
            {"recipe": "kl-anchor", "trainer": "sft", "instruction_vectors": None},
            [],
            "is for the iv-guided trainer",
        ),
        ({"use_peft": False}, [], "lora_r, lora_alpha, lora_target_modules set without use_peft"),
        ({"load_in_4bit": True}, [], "load_in_4bit is not supported"),
        ({"old_data_files": ["x.json"]}, [], "are for the f-learning trainer"),
        ({"dataset_train_split": "validation"}, [], "hold one split, 'train'"),
        ({"kl_positions": ["last_prompt"], "kl_weight": [1.0, 2.0]}, [], "kl_weight"),
        ({"eval_strategy": "steps", "load_best_model_at_end": True, "save_strategy": "epoch"}, [], "strateg"),
    ],
)
def test_hostile_recipes_are_one_line_before_any_model_loads(
    assets, tmp_path, capsys, monkeypatch, values, flags, match
):
    monkeypatch.chdir(assets)
    argv = ["train", "--config", str(_recipe(assets, tmp_path, **values)), *flags]
    _refused(capsys, monkeypatch, argv, match)


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ("empty.jsonl", "is empty: it has no rows"),
        ("odd.csv", "cannot tell the dataset's format from its columns ['answer', 'question']"),
        (
            "text.jsonl",
            "marks no answer, but the last_prompt KL, the head term work on the answer's first token",
        ),
    ],
)
def test_data_that_cannot_train_is_refused(assets, tmp_path, capsys, monkeypatch, files, match):
    argv = ["train", "--config", str(_recipe(assets, tmp_path, data_files=[str(assets / files)]))]
    _refused(capsys, monkeypatch, argv, match)


def test_the_config_file_as_a_folder_a_parent_or_a_link(assets, tmp_path, capsys, monkeypatch):
    recipe = _recipe(assets, tmp_path)
    for given in (tmp_path, tmp_path.parent, Path(".")):
        _refused(capsys, monkeypatch, ["train", "--config", str(given)], "is a folder")
    link = tmp_path / "link.yaml"
    link.symlink_to(recipe)
    from ivtrainer.cli import parse

    assert parse(["train", "--config", str(link)])[0].trainer == "iv-guided"
    _refused(
        capsys,
        monkeypatch,
        ["train", "--config", str(assets / "chat.jsonl")],
        "not a readable YAML or JSON file",
    )


def test_data_files_through_a_symlink_the_working_directory_or_a_parent(
    assets, tmp_path, capsys, monkeypatch
):
    (tmp_path / "chats.jsonl").symlink_to(assets / "chat.jsonl")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(_recipe(assets, tmp_path, data_files=["chats.jsonl"]))]) == 0
    capsys.readouterr()
    for folder in (".", "..", str(assets)):
        _refused(
            capsys,
            monkeypatch,
            ["train", "--config", str(_recipe(assets, tmp_path, data_files=[folder]))],
            "is a folder",
        )


def test_output_dir_may_not_be_the_model_folder(assets, tmp_path, capsys, monkeypatch):
    path = _recipe(assets, tmp_path, output_dir=str(assets / "tiny"))
    _refused(capsys, monkeypatch, ["train", "--config", str(path)], "is the input folder")
    path = _recipe(assets, tmp_path, output_dir=str(assets / "pc.json"))
    _refused(capsys, monkeypatch, ["train", "--config", str(path)], "is a file")


@pytest.mark.parametrize("trainer", ["sft", "plain"])
def test_sft_and_plain_train_on_prompt_completion(assets, tmp_path, trainer):
    path = _recipe(
        assets, tmp_path, trainer=trainer, instruction_vectors=None, data_files=[str(assets / "pc.json")]
    )
    assert main(["train", "--config", str(path)]) == 0
    assert len(_losses(tmp_path / "out")) == 2


def test_push_to_hub_goes_through_the_upload_checks(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_test")
    path = _recipe(assets, tmp_path, push_to_hub=True, hub_model_id="someone/tiny-iv")
    with intercept_hub_upload("someone/tiny-iv") as sent:
        assert main(["train", "--config", str(path)]) == 0
    assert sent["repo_id"] == "someone/tiny-iv"
    assert {"adapter_model.safetensors", "README.md", "instruction_vectors"} <= {
        f.split("/")[0] for f in sent["files"]
    }
    assert "iv-guided" in sent["card"] and "hf_secret_for_test" not in sent["card"] + json.dumps(
        sent["texts"]
    )
    args = (tmp_path / "out" / "training_args.bin").read_bytes()
    assert b"hf_secret_for_test" not in args


def _example(name: str, tmp_path: Path, **values) -> Path:
    """An example config with its model and data replaced by tiny local ones of the same shape."""
    config = yaml.safe_load((EXAMPLES / name).read_text())
    for key in ("dataset_name", "dataset_train_split", "data_files"):
        config.pop(key, None)
    config.update(output_dir=str(tmp_path / "out"), max_steps=2, **values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_example_iv_guided_lora_chat(assets, tmp_path):
    path = _example(
        "iv_guided_lora_chat.yaml",
        tmp_path,
        model_name_or_path=str(assets / "tiny"),
        data_files=[str(assets / "chat.jsonl")],
        max_length=64,
    )
    assert main(["train", "--config", str(path)]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_example_f_learning_counterfact(assets, tmp_path, capsys):
    data = ROOT / "examples" / "data" / "counterfact.json"  # the example's own file
    path = _example(
        "f_learning_counterfact.yaml",
        tmp_path,
        model_name_or_path=str(assets / "tiny"),
        data_files=[str(data)],
    )
    assert main(["train", "--config", str(path)]) == 0
    assert "knowledge edits" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_example_7b_zero3_on_a_tiny_model(assets, tmp_path, tokenizer):
    from ivtrainer import extract_instruction_vector

    model = tiny_model("llama")
    iv = extract_instruction_vector(
        model,
        tokenizer,
        "antonym",
        n_heads=3,
        n_shots=2,
        n_mean_prompts=6,
        n_cie_prompts=2,
        calibrate=False,
        progress=False,
    )
    iv.save_pretrained(tmp_path / "iv")
    path = _example(
        "iv_guided_7b_zero3.yaml", tmp_path, model_name_or_path=str(assets / "tiny"), data_files=[str(assets / "chat.jsonl")],
        instruction_vectors=[str(tmp_path / "iv")], dtype="float32", bf16=False, save_strategy="no",
    )  # fmt: skip
    assert main(["train", "--config", str(path)]) == 0
