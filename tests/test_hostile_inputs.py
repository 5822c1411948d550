"""``ivtrainer continual`` (and the other newest surfaces) against what a hostile or careless user
gives them: exit code 2 and one line naming the problem and the fix, before any work; nothing
written outside ``--out``; no ``settings.json`` left by a refused run, so the corrected command
runs on the same ``--out``."""

from __future__ import annotations

import json
import shutil

import pytest

from ivtrainer.testing import tiny_model
from tests.test_cli import CONTINUAL_FAST, _refused, _run, _tree, project  # noqa: F401  # project: a fixture


def _pairs(n: int, tag: str = "") -> str:
    return "\n".join(json.dumps({"input": f"word {tag}{i}", "output": f"w{tag}{i}"}) for i in range(n)) + "\n"


def _refused_fresh(capsys, args, match, watch, out):
    """Refused, and the ``--out`` it named holds no settings.json afterwards."""
    line = _refused(capsys, args, match, watch)
    assert not (out / "settings.json").exists(), line
    return line


# -- item 9: two tasks, one column ----------------------------------------------------------------------


def test_tasks_that_would_share_a_column_are_refused(project, tmp_path, capsys, monkeypatch):  # noqa: F811
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for path in (tmp_path / "a" / "x.jsonl", tmp_path / "b" / "x.jsonl", tmp_path / "brackets.jsonl"):
        path.write_text(_pairs(40))
    monkeypatch.chdir(tmp_path)
    base = ["continual", "--model", project / "base", *CONTINUAL_FAST, "--out", tmp_path / "o"]
    for tasks, match in [
        ("a/x.jsonl,b/x.jsonl", "would share the name 'x'"),
        ("brackets,brackets.jsonl", "would share the name 'brackets'"),
        ("a/x.jsonl,./a/../a/x.jsonl", "are the same task file"),
    ]:
        _refused_fresh(capsys, [*base, "--tasks", tasks], match, tmp_path, tmp_path / "o")


# -- items 14, 15: arguments checked before the model loads ------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--n-test", "0"], "n_test must be a whole number >= 1"),
        (["--n-train", "0"], "n_train must be a whole number >= 1"),
        (["--n-train", "-3"], "n_train must be a whole number >= 1"),
        (["--epochs", "0"], "epochs must be > 0"),
        (["--epochs", "-1"], "epochs must be > 0"),
        (["--learning-rate", "nan"], "learning_rate must be a finite number"),
        (["--learning-rate", "-1"], "learning_rate must be > 0"),
        (["--replay-fraction", "nan"], "replay_fraction must be a finite number"),
        (["--method", "iv-guided", "--n-train", "5"], "too few for 10-shot prompts"),
        (["--lm-eval-tasks", "arc_easy"], "their data cannot be loaded"),
    ],
)
def test_bad_numbers_and_unloadable_data_are_refused_before_the_model_loads(
    project,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
    flags,
    match,
):
    from ivtrainer.modeling import loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    out = tmp_path / "o"
    args = ["continual", "--model", project / "base", "--tasks", "brackets,plural", *CONTINUAL_FAST, *flags]
    _refused_fresh(capsys, [*args, "--out", out], match, tmp_path, out)


def test_checks_that_need_the_model_leave_nothing_that_blocks_the_corrected_rerun(
    project,  # noqa: F811
    tmp_path,
    capsys,
):
    from ivtrainer.steering.head_set import extract_head_set
    from ivtrainer.testing import tiny_tokenizer

    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    tiny_tokenizer().save_pretrained(gpt2)
    capsys.readouterr()
    out = tmp_path / "o"
    base = ["continual", "--tasks", "brackets,plural", *CONTINUAL_FAST, "--out", out]
    _refused_fresh(capsys, [*base, "--model", gpt2], "has no module named q_proj: use --full", tmp_path, out)
    # a head set of another architecture with the same layers x heads (a tiny Qwen2, 3 x 4)
    heads = tmp_path / "heads"
    cheap = {"n_shots": 2, "n_mean_prompts": 4, "n_cie_prompts": 2, "progress": False}
    extract_head_set(tiny_model("qwen2"), tiny_tokenizer(), ["antonym"], **cheap).save_pretrained(heads)
    capsys.readouterr()
    iv_args = [*base, "--model", project / "base", "--method", "iv-guided", "--n-train", "24"]
    _refused_fresh(
        capsys, [*iv_args, "--iv-heads", heads], "cannot rank the heads of a llama model", tmp_path, out
    )
    _refused_fresh(capsys, [*iv_args, "--iv-heads", tmp_path / "nope"], "nope", tmp_path, out)
    # the head set's own folder may not take the output
    _refused(
        capsys,
        ["continual", "--tasks", "brackets", "--model", project / "base", *CONTINUAL_FAST, "--iv-heads", heads,
         "--out", heads / "run"],
        "lies inside",
        tmp_path,
    )  # fmt: skip
    # the corrected command runs on the same --out
    code, _, err = _run(capsys, *base, "--model", project / "base")
    assert code == 0, err


# -- items 10, 14: a resumed run -------------------------------------------------------------------------


def test_a_resumed_run_refuses_changed_inputs_and_damaged_stages(project, tmp_path, capsys):  # noqa: F811
    task = tmp_path / "words.jsonl"
    task.write_text(_pairs(40))
    model = tmp_path / "model"
    shutil.copytree(project / "base", model)
    out = tmp_path / "run"
    args = ["continual", "--tasks", f"brackets,{task}", "--model", model, *CONTINUAL_FAST, "--out", out]
    code, _, err = _run(capsys, *args)
    assert code == 0, err
    assert _run(capsys, *args)[0] == 0  # unchanged: continues (nothing left to do)

    task.write_text(_pairs(40, tag="x"))
    _refused(capsys, args, "the rows of task 'words' changed", tmp_path)
    task.write_text(_pairs(40))
    tiny_model("llama", seed=7).save_pretrained(model)
    capsys.readouterr()
    _refused(capsys, args, "is not the one", tmp_path)
    shutil.rmtree(model)
    shutil.copytree(project / "base", model)
    assert _run(capsys, *args)[0] == 0

    stage = out / "stages" / "1"
    saved = tmp_path / "saved-stage"
    shutil.copytree(stage, saved)
    adapter = stage / "adapter" / "adapter_model.safetensors"
    damage = [
        (lambda: adapter.write_bytes(adapter.read_bytes()[:-100]), "adapter_model.safetensors is truncated"),
        (lambda: adapter.unlink(), "is missing"),
        (lambda: (stage / "scores.json").write_text("{not json"), "scores.json"),
        (
            lambda: (stage / "scores.json").write_text(
                json.dumps({"tasks": {"other": 1.0}, "abilities": {}})
            ),
            "its scores are for tasks ['other']",
        ),
        (lambda: (stage / "scores.json").unlink(), "stages ['2'] exist after it"),
    ]
    for make, match in damage:
        make()
        line = _refused(capsys, args, match, tmp_path)
        assert "delete" in line and "stages" in line
        shutil.rmtree(stage)
        shutil.copytree(saved, stage)
    assert _run(capsys, *args)[0] == 0

    (out / "settings.json").write_text("{broken")
    _refused(capsys, args, "is not a continual run's settings", tmp_path)


def test_full_fine_tuning_refuses_to_continue_from_a_pruned_model(project, tmp_path, capsys):  # noqa: F811
    """With --full only the latest stage's model is kept: when it is gone (the last stage deleted
    to retrain it, or its model folder damaged), the run is refused, not silently continued from
    the base model."""
    out = tmp_path / "run"
    args = ["continual", "--tasks", "brackets,plural", "--model", project / "base", "--full", *CONTINUAL_FAST,
            "--out", out]  # fmt: skip
    assert _run(capsys, *args)[0] == 0
    assert not (out / "stages" / "1" / "model").exists() and (out / "stages" / "2" / "model").is_dir()
    weights = out / "stages" / "2" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _refused(capsys, args, "start over with a new --out", tmp_path)
    shutil.rmtree(out / "stages" / "2")
    _refused(capsys, args, "stage 1 of", tmp_path)


# -- item 16: the other surfaces ---------------------------------------------------------------------------


def test_extract_iv_batch_size_zero(project, tmp_path, capsys):  # noqa: F811
    args = ["extract-iv", "--model", project / "base", "--task", "antonym", "--out", tmp_path / "iv"]
    _refused(capsys, [*args, "--batch-size", "0"], "batch_size must be an integer >= 1", tmp_path)


def test_lm_eval_callback_resumed_with_an_edited_record(tmp_path):
    from types import SimpleNamespace

    from ivtrainer.callbacks import LMEvalCallback
    from ivtrainer.errors import InvalidInputError
    from ivtrainer.testing import tiny_tokenizer

    callback = LMEvalCallback("ivtrainer_abilities", limit=2)
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=3, max_steps=10)
    for text in ["{not json", json.dumps({"evaluations": [{"step": 1}]}), json.dumps({"other": 1})]:
        (tmp_path / "lm_eval.json").write_text(text)
        with pytest.raises(InvalidInputError, match="is not LMEvalCallback's record of this run"):
            callback.on_train_begin(
                args, state, None, model=tiny_model("llama"), processing_class=tiny_tokenizer()
            )


def test_lm_eval_data_that_cannot_be_had_offline_is_refused_at_construction():
    from ivtrainer.callbacks import LMEvalCallback
    from ivtrainer.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="arc_easy: their data cannot be loaded"):
        LMEvalCallback("arc_easy")
