"""The CLI against hostile input: one-line errors with exit code 2, before any work, and nothing
outside ``--out`` touched or half-written (the rules of ``ivtrainer.utils.outputs``)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ivtrainer.cli import main
from ivtrainer.testing import tiny_model

MARKER = ".ivtrainer-output.json"  # spelled out: the tests pin the file name users may see


@pytest.fixture(scope="module")
def project(tmp_path_factory, tokenizer):
    """proj/base (a tiny Llama folder), proj/adapter (a LoRA adapter trained on it), proj/notes.txt."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("proj")
    tiny_model("llama").save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(root / "adapter")
    (root / "notes.txt").write_text("the user's own file")
    return root


def _tree(root: Path, skip: Path | None = None) -> dict[str, tuple]:
    """Every path under ``root`` (outside ``skip``) with its size and modification time."""
    out = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        st = path.lstat()
        out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(capsys, args, match: str, watch: Path) -> str:
    before = _tree(watch)
    code, _, err = _run(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and match in lines[0], err
    assert _tree(watch) == before  # nothing created, changed or deleted
    return lines[0]


def _forget(project, out, *extra):
    return [
        "forget",
        "--base",
        project / "base",
        "--adapter",
        project / "adapter",
        "--lam",
        "1",
        "--out",
        out,
        *extra,
    ]


@pytest.mark.parametrize(
    ("where", "match"),
    [
        ("proj", "contains the input"),  # the folder holding the base model and the user's files
        ("base", "is the input"),
        ("adapter", "is the input"),
        ("base/edited", "lies inside the input"),
        ("cwd", "is the current directory"),
        ("dot", "is the current directory"),
        ("parent-of-cwd", "contains the current directory"),
        ("home", "is the home directory"),
        ("root", "filesystem root"),
    ],
)
def test_forget_overwrite_never_destroys_inputs_or_home(project, tmp_path, capsys, monkeypatch, where, match):
    home = tmp_path / "home"
    work = home / "code" / "work"
    work.mkdir(parents=True)
    (work / "thesis.tex").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    out = {
        "proj": project,
        "base": project / "base",
        "adapter": project / "adapter",
        "base/edited": project / "base" / "edited",
        "cwd": work,
        "dot": ".",
        "parent-of-cwd": "..",
        "home": "~",
        "root": "/",
    }[where]
    for watch in (project, home):
        _refused(capsys, _forget(project, out, "--overwrite"), match, watch)


def test_overwrite_replaces_only_what_ivtrainer_wrote(project, tmp_path, capsys):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "paper.pdf").write_text("not ivtrainer's")
    line = _refused(
        capsys, _forget(project, foreign, "--overwrite"), "was not written by ivtrainer", tmp_path
    )
    assert str(foreign) in line
    _refused(capsys, _forget(project, foreign), "not empty", tmp_path)

    out = tmp_path / "edited"
    code, printed, _ = _run(capsys, *_forget(project, out))
    assert code == 0 and "of the norm of the 6 weight tensors it changed" in printed  # q, v in 3 layers
    assert (
        (out / MARKER).is_file() and (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    )
    (out / "stale.txt").write_text("from the first run")
    assert _run(capsys, *_forget(project, out, "--overwrite"))[0] == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited", "results"]  # no temporaries left


def test_empty_folder_needs_no_flag_and_file_is_refused(project, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(capsys, *_forget(project, empty))[0] == 0
    (tmp_path / "file").write_text("x")
    _refused(capsys, _forget(project, tmp_path / "file", "--overwrite"), "is a file", tmp_path)
    _refused(capsys, _forget(project, ""), "--out is empty", tmp_path)


def test_symlinked_out_keeps_its_link(project, tmp_path, capsys):
    real = tmp_path / "disk" / "edited"
    assert _run(capsys, *_forget(project, real))[0] == 0
    link = tmp_path / "edited"
    link.symlink_to(real, target_is_directory=True)
    assert _run(capsys, *_forget(project, link, "--overwrite"))[0] == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["edited"]


def test_stale_temporaries_of_killed_runs_are_swept(project, tmp_path, capsys):
    out = tmp_path / "edited"
    dead = 2**22 + 12345  # above any pid_max default: no such process
    for name in (f".edited.tmp-{dead}-abc", f".edited.old-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text("half-written")
    alive = tmp_path / f".edited.tmp-{os.getpid()}-xyz"  # a running process's: kept
    alive.mkdir()
    assert _run(capsys, *_forget(project, out))[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "edited"]


def test_outputs_follow_the_umask(project, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert _run(capsys, *_forget(project, tmp_path / "edited"))[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "edited").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "edited" / "model.safetensors").stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--lam", "-1"], "--lam must be >= 0"),
        (["--lam", "nan"], "finite"),
        (["--lam", "1", "--lam", "2"], "got 2 lambdas for 1 adapters"),
    ],
)
def test_forget_bad_lambda_is_refused_before_work(project, tmp_path, capsys, args, match):
    argv = [
        "forget",
        "--base",
        project / "base",
        "--adapter",
        project / "adapter",
        *args,
        "--out",
        tmp_path / "o",
    ]
    _refused(capsys, argv, match, tmp_path)


def test_forget_adapter_of_another_base_model(project, tmp_path, capsys):
    """The base-name check says what the CLI can do about it."""
    other = tmp_path / "other"
    tiny_model("llama").save_pretrained(other)
    capsys.readouterr()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((project / "base" / name).read_bytes())
    args = [
        "forget",
        "--base",
        other,
        "--adapter",
        project / "adapter",
        "--lam",
        "1",
        "--out",
        tmp_path / "o",
    ]
    _refused(capsys, args, "--no-check-base-model", tmp_path)
    assert _run(capsys, *args, "--no-check-base-model")[0] == 0


def test_extract_iv_overwrite_means_replace(project, tmp_path, capsys):
    """extract-iv follows the same rule: an unmarked non-empty folder is never merged into."""
    out = tmp_path / "iv"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["extract-iv", "--model", project / "base", "--task", "antonym", "--out", out, "--overwrite"]
    _refused(capsys, argv, "was not written by ivtrainer", tmp_path)


def test_analyze_out_may_not_be_the_iv_folder(project, tmp_path, capsys):
    iv = tmp_path / "iv"
    iv.mkdir()
    (iv / "instruction_vector.json").write_text("{}")
    argv = ["analyze", "--model", project / "base", "--iv", iv, "--out", iv, "--overwrite"]
    _refused(capsys, argv, "is the input", tmp_path)


def test_demo_out_may_not_be_home(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.txt").write_text("x")
    _refused(capsys, ["demo", "--out", "~", "--overwrite"], "is the home directory", tmp_path)


# -- task files -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('[["hot", "cold"], "xy"]', "row 1 in"),
        ('[["hot", "cold"], 7]', "row 1 in"),
        ('[["hot", "cold"], ["a", "b", "c"]]', "row 1 in"),
        ('[["hot", "cold"], [["deep", "er"], "x"]]', "row 1 in"),
        (
            '{"input": "a", "output": "b"}\n{"input": "c", "output": "d"}\n{"input": "e" "output": "f"}\n',
            "line 3",
        ),
        (b'[{"input": "caf\xe9", "output": "x"}]', "is not UTF-8"),
        (
            json.dumps([{"input": f"w{i}", "output": "same"} for i in range(20)]),
            "have the output 'same'",
        ),
        (
            json.dumps(
                [{"input": "x" * 20000, "output": "y"}]
                + [{"input": f"w{i}", "output": f"v{i}"} for i in range(20)]
            ),
            "20000 characters",
        ),
        (json.dumps([{"input": f"w{i}", "output": f"v{i}"} for i in range(5)]), "are too few for 10-shot"),
    ],
)
def test_extract_iv_bad_task_file_before_loading(tmp_path, capsys, content, match):
    task = tmp_path / "task.json"
    task.write_bytes(content.encode() if isinstance(content, str) else content)
    missing_model = tmp_path / "no-model"  # were the file read after loading, this would fail first
    argv = ["extract-iv", "--model", missing_model, "--task", task, "--out", tmp_path / "iv"]
    line = _refused(capsys, argv, match, tmp_path)
    assert "task.json" in line


# -- evaluate-edits -------------------------------------------------------------------------------


ZSRE = {
    "subject": "land 0",
    "src": "The capital of land 0 is",
    "answers": ["Paris"],
    "alt": "Rome",
    "rephrase": "Land 0 has its capital in",
    "loc": "The river of place 0 is the",
    "loc_ans": "Nile",
}


def test_evaluate_edits_bare_json_prints_json_and_skips_empty_records(project, tmp_path, capsys):
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps([ZSRE, {**ZSRE, "alt": ""}, ZSRE]))  # as in the public MEND split
    code, out, err = _run(capsys, "evaluate-edits", "--model", project / "base", "--data", data, "--json")
    assert code == 0, err
    scores = json.loads(out)  # stdout is the JSON alone
    assert scores["n_edits"] == 2 and 0 <= scores["reliability"] <= 1
    assert "skipped 1 of 3 edit records" in err and "record 1" in err and "empty 'alt'" in err


def test_evaluate_edits_json_may_not_overwrite_the_data(project, tmp_path, capsys):
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps([ZSRE]))
    argv = ["evaluate-edits", "--model", project / "base", "--data", data, "--json", data, "--overwrite"]
    _refused(capsys, argv, "would overwrite the input", tmp_path)


# -- errors and bugs ------------------------------------------------------------------------------


def test_bugs_show_a_traceback_and_input_errors_one_line(tmp_path, capsys, monkeypatch):
    import ivtrainer.modeling.loading

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(ivtrainer.modeling.loading, "load_model", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["info", "--model", "anything"])
    from ivtrainer.errors import IVTrainerError

    argv = ["forget", "--base", "b", "--adapter", "a", "--lam", "-1", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    with pytest.raises(IVTrainerError, match="--lam must be >= 0"):
        main(["--debug", *argv])


# -- Hub ids ----------------------------------------------------------------------------------------


def test_hub_ids_take_a_revision_and_paths_never_download(tmp_path, monkeypatch):
    import huggingface_hub

    import ivtrainer.modeling.loading
    from ivtrainer.arithmetic.adapter_subtraction import _adapter_folder
    from ivtrainer.arithmetic.safetensors_files import model_folder as _model_folder
    from ivtrainer.hub.push import split_revision

    assert split_revision("org/name@v1.0") == ("org/name", "v1.0")
    assert split_revision("org/name") == ("org/name", None)
    (tmp_path / "run@2").mkdir()
    assert split_revision(str(tmp_path / "run@2")) == (str(tmp_path / "run@2"), None)  # a folder stays whole
    assert split_revision("./models/x@y") == ("./models/x@y", None)

    seen = {}
    monkeypatch.setattr(
        ivtrainer.modeling.loading, "_load_hub", lambda name, kwargs: seen.update(name=name, **kwargs)
    )
    ivtrainer.modeling.loading.load_model("org/name@abc123")
    assert seen == {"name": "org/name", "revision": "abc123"}

    calls = []

    def snapshot(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    _adapter_folder("me/forget-adapter@v2")
    _model_folder("me/finetuned@main")
    assert calls == [("me/forget-adapter", "v2"), ("me/finetuned", "main")]
    for missing in ("./adapter", str(tmp_path / "nope"), "a/b/c"):
        with pytest.raises(FileNotFoundError, match="not an existing folder"):
            _adapter_folder(missing)
        with pytest.raises(FileNotFoundError, match="not an existing folder"):
            _model_folder(missing)
    assert len(calls) == 2


def test_scratch_folders_of_killed_runs_are_swept(tmp_path, monkeypatch):
    import tempfile

    from ivtrainer.utils.outputs import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"ivtrainer-scratch-{2**22 + 12345}-abc"
    dead.mkdir()
    mine = tmp_path / f"ivtrainer-scratch-{os.getpid()}-running"
    mine.mkdir()
    with scratch_dir() as scratch:
        assert scratch.parent == tmp_path and scratch.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]


# -- continual --------------------------------------------------------------------------------------

CONTINUAL_FAST = ["--n-train", "24", "--n-test", "4", "--n-icl", "2", "--epochs", "1", "--method", "plain"]


def test_continual_runs_then_continues_and_refuses_bad_input(project, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = [
        "continual",
        "--tasks",
        "brackets,plural",
        "--model",
        project / "base",
        "--out",
        out,
        *CONTINUAL_FAST,
    ]
    code, printed, _ = _run(capsys, *args)
    assert code == 0 and "**AP**" in printed and "| 2: plural |" in printed
    results = json.loads((out / "results.json").read_text())
    assert _run(capsys, *args)[0] == 0  # every stage finished: nothing retrained, the same results
    assert json.loads((out / "results.json").read_text())["accuracy_matrix"] == results["accuracy_matrix"]

    assert (results["settings"]["n_icl"], results["settings"]["icl_demos"]) == (2, "fixed")
    other = [a if a != "plain" else "replay" for a in args]
    _refused(capsys, other, "holds a run with other settings (method differ)", tmp_path)
    _refused(capsys, [*args, "--icl-demos", "per-query"], "other settings (icl_demos differ)", tmp_path)
    base = ["continual", "--model", project / "base", *CONTINUAL_FAST]
    _refused(
        capsys, [*base, "--tasks", "brackets,nope", "--out", tmp_path / "n"], "unknown task 'nope'", tmp_path
    )
    _refused(capsys, [*base, "--tasks", ",", "--out", tmp_path / "n"], "the task list is empty", tmp_path)
    _refused(capsys, [*base, "--tasks", "brackets", "--out", project], "contains the input", project)
    _refused(capsys, [*base, "--tasks", "brackets", "--out", project / "notes.txt"], "is a file", project)
    monkeypatch.chdir(tmp_path)
    _refused(capsys, [*base, "--tasks", "brackets", "--out", "."], "is the current directory", tmp_path)


def _command(name: str):
    import argparse

    from ivtrainer.cli import make_parser

    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_a_default_changed_in_the_config_shows_in_the_cli(monkeypatch):
    """The flags are made from the dataclasses (HfArgumentParser), not typed again: a default
    changed in ExtractionConfig is extract-iv's default, in its help and in what it parses."""
    import dataclasses

    from ivtrainer.steering.extraction_config import ExtractionConfig

    field = {f.name: f for f in dataclasses.fields(ExtractionConfig)}["n_cie_prompts"]
    monkeypatch.setattr(field, "default", 7)
    parser = _command("extract-iv")
    assert "measured on (default: 7)" in " ".join(parser.format_help().split())
    config = parser.parse_args_into_dataclasses(["--task", "antonym", "--out", "x"])[2]
    assert isinstance(config, ExtractionConfig) and config.n_cie_prompts == 7


def test_every_flag_default_is_the_librarys():
    """Each command's defaults are the library's own: ExtractionConfig for extract-iv and
    extract-heads, ContinualSettings for continual, DemoPlan for the demo, the functions' own
    defaults elsewhere."""
    import dataclasses

    from ivtrainer.cli.common import default_of
    from ivtrainer.continual.continual_config import ContinualSettings
    from ivtrainer.demo.plan import DemoPlan
    from ivtrainer.evaluation.edit_metrics import evaluate_edits
    from ivtrainer.steering.dynamics import analyze_iv
    from ivtrainer.steering.extraction_config import HEAD_SET_FIELDS, ExtractionConfig

    def defaults(name: str) -> dict:
        found: dict = {}
        for action in _command(name)._actions:  # --calibrate before its --no_calibrate switch
            found.setdefault(action.dest, action.default)
        return found

    extraction = {f.name: f.default for f in dataclasses.fields(ExtractionConfig)}
    assert {k: defaults("extract-iv")[k] for k in extraction} == extraction
    assert {k: defaults("extract-heads")[k] for k in HEAD_SET_FIELDS} == {
        k: extraction[k] for k in HEAD_SET_FIELDS
    }
    assert "calibrate" not in defaults("extract-heads")  # a head set forms no vector
    settings = {f.name: f.default for f in dataclasses.fields(ContinualSettings)}
    continual = defaults("continual")
    shared = [k for k in settings if continual.get(k) is not None]
    assert len(shared) >= 9 and {k: continual[k] for k in shared} == {k: settings[k] for k in shared}
    plan = DemoPlan()
    demo = defaults("demo")
    assert (demo["task"], demo["seed"], demo["recipe"], demo["lm_eval_limit"]) == (
        plan.iv_task, plan.seed, plan.recipe, plan.lm_eval_limit,
    )  # fmt: skip
    assert defaults("evaluate-edits")["batch_size"] == default_of(evaluate_edits, "batch_size")
    assert defaults("analyze")["n_prompts"] == default_of(analyze_iv, "n_prompts")


def test_recipes_are_named_on_the_commands_that_train(capsys):
    for command in ("demo", "continual"):
        assert "--recipe {fvforgetting,iv-paper,kl-all,kl-anchor}" in _command(command).format_help()
    code, _, err = _run(capsys, "continual", "--out", "x", "--method", "plain", "--recipe", "kl-all")
    assert code == 2 and "a recipe sets the KL terms of the guided methods" in err
    code, _, err = _run(capsys, "continual", "--out", "x", "--method", "kl-anchor", "--recipe", "iv-paper")
    assert code == 2 and "adds an instruction vector, which kl-anchor does not have" in err


def test_a_config_file_gives_the_flags_and_the_command_line_wins(tmp_path):
    """``--config FILE`` (YAML or JSON, keys named as the flags) on every command; flags given on
    the command line override it; the values go through argparse as flags do."""
    from ivtrainer.cli import parse

    (tmp_path / "c.yaml").write_text(
        "out: run\nmethod: kl-anchor\nn_train: 5\nquick: true\nteacher_top_k: 0\n"
    )
    _, (_, args) = parse(["continual", "--config", str(tmp_path / "c.yaml"), "--n-train", "7"])
    assert (args.out, args.method, args.n_train, args.quick, args.teacher_top_k) == (
        "run",
        "kl-anchor",
        7,
        True,
        0,
    )
    (tmp_path / "e.json").write_text(
        json.dumps({"task": "antonym", "out": "iv", "n_heads": 3, "calibrate": False})
    )
    _, (_, script, extraction, *_) = parse(["extract-iv", f"--config={tmp_path / 'e.json'}"])
    assert (script.task, extraction.n_heads, extraction.calibrate) == ("antonym", 3, False)
    _, (_, _, extraction, *_) = parse(["extract-iv", "--config", str(tmp_path / "e.json"), "--calibrate"])
    assert extraction.calibrate is True


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("n_trian: 5\nout: x\n", "unknown key 'n_trian'; did you mean 'n_train'?"),
        ("- out\n", "expected a mapping of flag names to values, got list"),
        ("out: {a: 1}\n", "'out' is a mapping"),
        ("out: [x\n", "not a readable YAML or JSON file"),
    ],
)
def test_a_bad_config_file_is_one_line_before_any_work(tmp_path, capsys, text, match):
    (tmp_path / "c.yaml").write_text(text)
    code, _, err = _run(capsys, "continual", "--config", tmp_path / "c.yaml")
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
    code, _, err = _run(capsys, "continual", "--config", tmp_path / "missing.yaml")
    assert code == 2 and "no such file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # nothing written


def test_config_paths_as_users_give_them(tmp_path, capsys, monkeypatch):
    """The folder itself, its parent, the working directory are refused in one line; a symlink to the
    file and a path relative to the working directory read the file."""
    from ivtrainer.cli import parse

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "c.yaml").write_text("out: run\nn_train: 5\n")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "cfg" / "c.yaml")
    monkeypatch.chdir(tmp_path / "cfg")
    for folder in (tmp_path / "cfg", tmp_path, "."):
        code, _, err = _run(capsys, "continual", "--config", folder)
        assert code == 2 and "is a folder: give the YAML or JSON file in it" in err, err
    for path in (tmp_path / "link.yaml", "c.yaml"):
        assert parse(["continual", "--config", str(path)])[1][1].n_train == 5
