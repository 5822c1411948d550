"""`ivtrainer demo`: bad input refused before any work; `--quick` end to end on the default model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ivtrainer.cli import main
from ivtrainer.demo import DemoPlan, estimate_seconds, knowledge_table, new_task_table, run_demo
from ivtrainer.demo.report import lm_eval_table, repair_line, write_results
from ivtrainer.errors import IVTrainerError
from ivtrainer.testing import tiny_model
from ivtrainer.utils.outputs import MARKER

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_existing_folder_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["demo", "--out", str(out), "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_file_as_output_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_unknown_task_refused_before_loading(tmp_path, capsys):
    # the model path does not exist either: the task is checked first, without loading anything
    code = main(["demo", "--task", "nope", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "m")])
    assert code == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_lm_eval_task_refused_before_loading(tmp_path, capsys):
    out, model = str(tmp_path / "o"), str(tmp_path / "m")
    assert (
        main(["demo", "--lm-eval-tasks", "ivtrainer_abilities,hellaswg", "--out", out, "--model", model]) == 2
    )
    assert "unknown lm-eval task 'hellaswg'; did you mean hellaswag" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_model_that_knows_no_facts(tmp_path, tokenizer):
    """A model the demo cannot use says why, and leaves neither --out nor a temporary folder."""
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(IVTrainerError, match="facts"):
        run_demo(str(folder), tmp_path / "out", plan=DemoPlan.quick(), echo=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_estimate_counts_the_plan():
    """The estimate grows with each stage's work and with the probed costs."""
    quick, full = (estimate_seconds(p, 0.1, 0.002, 30, 9) for p in (DemoPlan.quick(), DemoPlan()))
    assert quick.keys() == full.keys()
    assert all(0 < quick[k] < full[k] for k in quick)
    slower = estimate_seconds(DemoPlan(), 0.2, 0.004, 30, 9)
    assert all(slower[k] > full[k] for k in full)
    more_cie = estimate_seconds(DemoPlan(n_cie_prompts=20), 0.1, 0.002, 30, 9)
    assert more_cie["instruction vector"] > full["instruction vector"]


@pytest.mark.real
def test_quick_demo_end_to_end(tmp_path, default_model):
    """`ivtrainer demo --quick` through the installed entry point: every artifact written, and the
    printed numbers are the run's (recomputed here from the saved adapters and records)."""
    from peft import PeftModel

    from ivtrainer import InstructionVector, evaluate_edits
    from ivtrainer.evaluation.edit_metrics import locality_reference
    from ivtrainer.evaluation.forgetting import evaluate_abilities, new_task_words

    out = tmp_path / "demo"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    (out / MARKER).write_text('{"command": "demo"}')  # an earlier run's folder: --overwrite replaces it
    command = [
        str(Path(sys.executable).parent / "ivtrainer"),
        "demo",
        "--quick",
        "--out",
        str(out),
        "--overwrite",
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stdout = done.stdout

    results = json.loads((out / "results.json").read_text())
    assert not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo")]  # no temporary folder left
    assert "Estimated time:" in stdout and f"Everything is in {out}/" in stdout
    assert new_task_table(results["new_task"]) in stdout
    assert knowledge_table(results["knowledge_update"]) in stdout
    markdown = (out / "results.md").read_text()
    assert (
        new_task_table(results["new_task"]) in markdown
        and knowledge_table(results["knowledge_update"]) in markdown
    )
    for png in ("cie_heatmap.png", "forgetting.png"):
        assert (out / png).read_bytes()[:8] == PNG
    assert set(results["seconds"]) == {
        "loading and preparing",
        "instruction vector",
        "new task, plain vs KL anchor vs IV-guided",
        "knowledge update",
        "total",
    }

    model, tokenizer = default_model
    iv = InstructionVector.from_pretrained(out / "instruction_vector")
    assert [list(h) for h in iv.heads] == results["instruction_vector"]["heads"]
    assert f"L{iv.heads[0][0]}H{iv.heads[0][1]}" in stdout

    # The forgetting table's numbers: re-evaluate the saved plain adapter on the same data.
    plan = results["plan"]
    new_task = results["new_task"]
    test_words = new_task_words()[1][: plan["n_test_words"]]
    plain = PeftModel.from_pretrained(model, out / "adapters" / "new_task_plain")
    try:
        again = evaluate_abilities(
            plain,
            tokenizer,
            new_task["facts"],
            test_words,
            n_icl=plan["n_icl"],
            fixed_demos=plan["icl_fixed_demos"],
        )
    finally:
        plain.unload()
    assert again == pytest.approx(new_task["scores"]["plain"], abs=1e-6)
    assert new_task["scores"]["before"]["new_task"] == 0.0  # the task is new to the model
    assert new_task["scores"]["plain"]["new_task"] > 0.3  # and LoRA learns it in the quick run too

    # The knowledge table's first row: the unedited model on the saved edits.
    edits = results["knowledge_update"]["edits"]
    before = evaluate_edits(
        model, tokenizer, edits, base_predictions=locality_reference(model, tokenizer, edits)
    )
    assert before == pytest.approx(results["knowledge_update"]["scores"]["before"], abs=1e-6)
    for name in ("old_knowledge", "new_task_iv_guided"):
        assert (out / "adapters" / name / "adapter_config.json").is_file()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_stages_on_tiny_models(tmp_path, model_type):
    """The three stages on other architectures (GPT-2: no pad token, LayerNorm, Conv1D): the
    artifacts a user gets and the tables, at toy sizes. A random model knows nothing, so the
    numbers are not checked here (the real run is above)."""
    from peft import PeftModel

    from ivtrainer import InstructionVector
    from ivtrainer.demo import stage_instruction_vector, stage_knowledge_update, stage_new_task
    from ivtrainer.testing import tiny_edits, tiny_tokenizer

    model, tokenizer = tiny_model(model_type), tiny_tokenizer(pad_token=model_type != "gpt2")
    records = [{**r, "relation": "capital"} for r in tiny_edits(8)]
    lm_eval = (
        {"lm_eval_tasks": ("ivtrainer_icl_antonym",), "lm_eval_limit": 2} if model_type == "llama" else {}
    )
    plan = DemoPlan(
        n_mean_prompts=4, n_cie_prompts=1, n_train_words=24, epochs=1, n_icl=2, n_test_words=3, n_edits=4,
        **lm_eval,
    )  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    iv_result = stage_instruction_vector(model, tokenizer, plan, tmp_path)
    iv = iv_result.pop("iv")
    assert InstructionVector.from_pretrained(tmp_path / "instruction_vector").heads == iv.heads
    assert (tmp_path / "cie_heatmap.png").read_bytes()[:8] == PNG
    new_task = stage_new_task(model, tokenizer, records[4:], plan, tmp_path, tmp_path / "work", iv=iv)
    own = InstructionVector.from_pretrained(tmp_path / "new_task_iv")  # the new task's own IV guided it
    assert own.task == "new task" and new_task["own_iv"]["edit_layer"] == own.edit_layer
    knowledge = stage_knowledge_update(model, tokenizer, records[:4], plan, tmp_path, tmp_path / "work")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    assert set(new_task["scores"]) == {"before", "plain", "kl_anchor", "iv_guided"}
    # the stage-1 IV added back to the plain fine-tuned model: scored with and without it
    assert set(new_task["repair"]) == {"task", "without_iv", "with_iv", "n_prompts"}
    assert new_task["repair"]["task"] == plan.iv_task and "IV repair" in repair_line(new_task)
    assert set(knowledge["scores"]) == {"before", "plain", "f_learning"}
    for name in ("new_task_plain", "new_task_kl_anchor", "new_task_iv_guided", "old_knowledge"):
        adapter = PeftModel.from_pretrained(tiny_model(model_type), tmp_path / "adapters" / name)
        assert any("lora_B" in n and p.abs().sum() > 0 for n, p in adapter.named_parameters())  # trained
    assert new_task_table(new_task).count("\n") == 5 and knowledge_table(knowledge).count("\n") == 4

    # results.md: every table, the lm-eval one (when asked for) as a table of its own
    results = {
        "model": model_type, "quick": True, "plan": dataclasses.asdict(plan), "instruction_vector": iv_result,
        "new_task": new_task, "knowledge_update": knowledge, "seconds": {"total": 1.0},
    }  # fmt: skip
    write_results(tmp_path, results)
    markdown = (tmp_path / "results.md").read_text()
    assert new_task_table(new_task) in markdown and knowledge_table(knowledge) in markdown
    assert (f"\n\n{lm_eval_table(new_task)}\n" in markdown) == bool(lm_eval)
    assert bool(lm_eval_table(new_task)) == bool(lm_eval)
