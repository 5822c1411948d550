"""run_sequence on a tiny model: the results, every method, resuming, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from ivtrainer.continual.run_sequence import load_final_model, run_sequence
from ivtrainer.continual.sequence_tasks import ORDERS, load_sequence_task
from ivtrainer.errors import InvalidInputError
from ivtrainer.evaluation.lm_eval_harness import evaluate_lm
from ivtrainer.iv_guided.precomputed_teacher import model_fingerprint
from ivtrainer.testing import tiny_model, tiny_tokenizer

FAST = {"n_train": 24, "n_test": 4, "n_icl": 2, "epochs": 1, "progress": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def test_results_and_a_resumed_run_ends_the_same(tmp_path, model_dir):
    out = tmp_path / "run"
    results = run_sequence(ORDERS["quick"], out=out, method="plain", model=model_dir, **FAST)
    assert results["tasks"] == ["brackets", "plural", "json"]
    assert len(results["accuracy_matrix"]) == 4 and all(len(r) == 3 for r in results["accuracy_matrix"])
    assert {"AP", "BWT", "FWT", "forgetting", "abilities", "ability_retention", "seconds"} <= set(results)
    assert json.loads((out / "results.json").read_text())["accuracy_matrix"] == results["accuracy_matrix"]
    for name in (
        "results.md",
        "accuracy_matrix.png",
        "accuracy_curves.png",
        "stages/3/adapter/adapter_model.safetensors",
    ):
        assert (out / name).is_file(), name
    assert "| 3: json |" in (out / "results.md").read_text()
    first = load_file(out / "stages/3/adapter/adapter_model.safetensors")

    shutil.rmtree(out / "stages" / "3")  # killed in stage 3
    (out / "results.json").unlink()
    resumed = run_sequence(ORDERS["quick"], out=out, method="plain", model=model_dir, **FAST)
    again = load_file(out / "stages/3/adapter/adapter_model.safetensors")
    assert first.keys() == again.keys() and all((first[k] == again[k]).all() for k in first)  # bit for bit
    assert (
        resumed["accuracy_matrix"] == results["accuracy_matrix"]
        and resumed["abilities"] == results["abilities"]
    )
    # every stage keeps its own time: a run with nothing left to do reports the same split
    nothing_left = run_sequence(ORDERS["quick"], out=out, method="plain", model=model_dir, **FAST)
    assert nothing_left["seconds"] == resumed["seconds"] and resumed["seconds"]["train"] > 0


@pytest.mark.parametrize(
    ("method", "teacher"),
    [
        ("iv-guided", "live"),
        ("iv-guided", "precomputed"),
        ("kl-anchor", "live"),
        ("replay", "live"),
        ("iv-guided-replay", "live"),
    ],
)
def test_each_method(tmp_path, model_dir, method, teacher):
    out = tmp_path / method
    results = run_sequence(
        ["brackets", "plural"], out=out, method=method, model=model_dir, teacher=teacher, **FAST
    )
    assert results["settings"]["method"] == method and results["settings"]["teacher"] == teacher
    assert not list(out.rglob("_ivtrainer_teacher"))  # the stored teacher goes with its stage's scratch
    has_iv = (out / "stages/2/instruction_vector/instruction_vector.json").is_file()
    assert has_iv == method.startswith("iv-guided")
    # every stage records how far it moved the model on its own rows (the forgetting monitor)
    assert len(results["forgetting_kl"]) == 2 and all(kl["forward"] > 0 for kl in results["forgetting_kl"])
    if has_iv:  # the second task's own IV, named after it
        assert (
            json.loads((out / "stages/2/instruction_vector/instruction_vector.json").read_text())["task"]
            == "plural"
        )
        assert results["seconds"]["iv"] > 0


def test_task_files_and_full_fine_tuning(tmp_path, model_dir):
    task = tmp_path / "words.jsonl"
    task.write_text("\n".join(json.dumps({"input": f"say {w}", "output": w}) for w in ["a", "b", "c"] * 10))
    out = tmp_path / "run"
    results = run_sequence(
        [str(task), "brackets"], out=out, method="plain", lora=False, model=model_dir, **FAST
    )
    assert results["tasks"] == ["words", "brackets"]
    assert (out / "stages/2/model").is_dir() and not (out / "stages/1/model").exists()  # only the latest kept


@pytest.mark.parametrize(
    ("tasks", "match"),
    [
        (["brackets", "nope"], "unknown task 'nope'"),
        ([], "the task list is empty"),
        (["brackets", "brackets"], "appears twice"),
    ],
)
def test_bad_tasks_fail_before_any_training(tmp_path, model_dir, tasks, match):
    with pytest.raises(ValueError, match=match):
        run_sequence(tasks, out=tmp_path / "run", method="plain", model=model_dir, **FAST)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="teacher must be 'live' or 'precomputed'"):
        run_sequence(["brackets"], out=tmp_path / "run", model=model_dir, **{**FAST, "teacher": "cached"})
    assert not (tmp_path / "run").exists()


def test_bad_settings_fail_before_any_training(tmp_path, model_dir):
    with pytest.raises(ValueError, match="icl_demos must be 'fixed' or 'per-query'"):
        run_sequence(["brackets"], out=tmp_path / "run", model=model_dir, **{**FAST, "icl_demos": "some"})
    assert not (tmp_path / "run").exists()


def test_a_file_without_the_fields_and_a_resume_with_other_settings(tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(ValueError, match="input"):
        run_sequence([str(bad)], out=tmp_path / "a", model=model_dir, **FAST)
    out = tmp_path / "run"
    run_sequence(["brackets"], out=out, method="plain", model=model_dir, **FAST)
    before = sorted(p.name for p in (out / "stages").iterdir())
    with pytest.raises(ValueError, match="other settings \\(method, seed differ\\)"):
        run_sequence(["brackets"], out=out, method="replay", seed=3, model=model_dir, **FAST)
    assert sorted(p.name for p in (out / "stages").iterdir()) == before
    with pytest.raises(ValueError, match="not empty"):
        run_sequence(["brackets"], out=tmp_path, model=model_dir, **FAST)


def test_sequence_tasks_have_fixed_disjoint_splits():
    for task in ORDERS["order1"] + ORDERS["order2"]:
        splits = {s: load_sequence_task(task, s) for s in ("train", "validation", "test")}
        inputs = {s: {r["input"] for r in rows} for s, rows in splits.items()}
        assert not inputs["train"] & inputs["test"] and not inputs["validation"] & inputs["test"]
        assert splits["test"] == load_sequence_task(task, "test")
        assert all(
            r["prompt"].endswith("Output:") and r["completion"] == " " + r["output"] for r in splits["train"]
        )


def test_lm_eval_tasks_after_every_stage(tmp_path, model_dir):
    out = tmp_path / "run"
    results = run_sequence(
        ["brackets"], out=out, method="plain", model=model_dir, lm_eval_tasks=("ivtrainer_icl_antonym",),
        lm_eval_limit=2, **FAST,
    )  # fmt: skip
    assert list(results["lm_eval"]) == ["ivtrainer_icl_antonym/acc"]
    assert len(results["lm_eval"]["ivtrainer_icl_antonym/acc"]) == 2  # before, after stage 1
    assert "| ivtrainer_icl_antonym/acc |" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match="unknown lm-eval task 'hellaswg'; did you mean hellaswag"):
        run_sequence(["brackets"], out=tmp_path / "b", model=model_dir, lm_eval_tasks=("hellaswg",), **FAST)
    assert not (tmp_path / "b").exists()


def test_a_run_made_before_a_setting_existed(tmp_path, model_dir):
    """Settings added later match their default, except where older runs did something else
    (held-out abilities drawn per query before icl_demos existed)."""
    out = tmp_path / "run"
    run_sequence(["brackets"], out=out, method="plain", model=model_dir, **FAST)
    settings = json.loads((out / "settings.json").read_text())
    for name in ("lm_eval_tasks", "lm_eval_limit"):
        del settings[name]
    (out / "settings.json").write_text(json.dumps(settings))
    run_sequence(["brackets"], out=out, method="plain", model=model_dir, **FAST)  # continues
    del settings["icl_demos"]
    (out / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=r"other settings \(icl_demos differ\)"):
        run_sequence(["brackets"], out=out, method="plain", model=model_dir, **FAST)
    run_sequence(["brackets"], out=out, method="plain", model=model_dir, icl_demos="per-query", **FAST)


def test_iv_repair_rows_from_the_same_runs(tmp_path, model_dir, monkeypatch):
    """--repair: each task's IV captured after its stage and saved with the run; strengths chosen
    on validation rows only; the repair rows in results.json and results.md; a LoRA run made
    without --repair scored with it afterwards gives the same rows, with no retraining."""
    from ivtrainer.steering import repair as repair_module

    seen: list[list[str]] = []
    choose = repair_module.choose_strengths

    def spy(model, tokenizer, repair, validation, **kw):  # the real choice, its rows recorded
        seen.extend([r["prompt"] for r in rows] for rows in validation.values())
        return choose(model, tokenizer, repair, validation, **kw)

    monkeypatch.setattr(repair_module, "choose_strengths", spy)
    tasks = ORDERS["quick"][:2]
    kw = dict(
        method="plain", model=model_dir, **FAST, iv_mean_prompts=4, iv_cie_prompts=2, iv_calibration_prompts=4
    )
    results = run_sequence(tasks, out=tmp_path / "a", repair=True, **kw)
    repair = results["repair"]
    assert (tmp_path / "a" / "stages" / "1" / "task_iv" / "instruction_vector.json").is_file()
    assert set(repair["strengths"]) == {"brackets", "plural"} and 0 <= repair["routing_accuracy"] <= 1
    assert all(set(v) == {"0.0", "0.5", "1.0", "2.0", "4.0"} for v in repair["validation_accuracy"].values())
    test_prompts = {r["prompt"] for t in tasks for r in load_sequence_task(t, "test")}
    validation_prompts = [[r["prompt"] for r in load_sequence_task(t, "validation")] for t in tasks]
    assert seen == validation_prompts and not test_prompts & {p for rows in seen for p in rows}
    assert "+ IV, routed" in (tmp_path / "a" / "results.md").read_text()
    from ivtrainer.steering.repair import IVRepair  # what the user loads to repair the final model

    kept = IVRepair.from_pretrained(tmp_path / "a" / "repair")
    assert kept.vectors.strengths == repair["strengths"] and kept.router.layer == repair["router_layer"]
    # the final model rebuilt from the run, through lm-eval with the repair on: the run's own rows
    final, tokenizer = load_final_model(tmp_path / "a")
    assert model_fingerprint(final) == results["final_model"]
    lm_tasks = {f"ivtrainer_sequence_{t}": t for t in tasks}
    for key, given in (("task_given", lm_tasks), ("routed", None)):
        scores = evaluate_lm(
            final, tokenizer, list(lm_tasks), limit=FAST["n_test"], repair=kept, repair_tasks=given
        )
        assert {t: scores[f"ivtrainer_sequence_{t}/acc"] for t in tasks} == repair[key]
        assert sum(scores[f"repair/ivtrainer_sequence_{t}/{t}"] for t in tasks) / 2 == pytest.approx(
            repair["routing_accuracy"] if given is None else 1.0
        )
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "a")
    assert model_fingerprint(load_final_model(link)[0]) == results["final_model"]
    for bad in (tmp_path, tmp_path / "a" / "results.json", tmp_path / "missing"):
        with pytest.raises(InvalidInputError, match="holds no continual run"):
            load_final_model(bad)

    plain = run_sequence(tasks, out=tmp_path / "b", **kw)
    assert "repair" not in plain and not (tmp_path / "b" / "stages" / "1" / "task_iv").exists()
    adapter = (tmp_path / "b" / "stages" / "2" / "adapter" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "b" / "stages" / "2" / "scores.json").rename(tmp_path / "scores.json")
    with pytest.raises(InvalidInputError, match=r"stages \['2'\] are not finished"):
        load_final_model(tmp_path / "b")
    (tmp_path / "scores.json").rename(tmp_path / "b" / "stages" / "2" / "scores.json")
    later = run_sequence(tasks, out=tmp_path / "b", repair=True, **kw)
    assert (tmp_path / "b" / "stages" / "2" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert {k: v for k, v in later["repair"].items() if k != "seconds"} == {
        k: v for k, v in repair.items() if k != "seconds"
    }


def test_the_tuned_knobs_reach_training_and_validation_scoring(tmp_path, model_dir, monkeypatch):
    """kl_scale multiplies the recipe's KL weights, teacher_strength sets the teacher's IV
    strength, replay_fraction mixes rows into iv-guided-replay; eval_split='validation' scores
    on the validation rows (never the test rows) and is refused with --repair."""
    from ivtrainer.iv_guided import iv_guided_trainer

    configs, datasets = [], []
    real = iv_guided_trainer.IVGuidedTrainer.__init__

    def spy(self, model, args, *a, train_dataset=None, **kw):
        configs.append(args)
        datasets.append(len(train_dataset))
        real(self, model, args, *a, train_dataset=train_dataset, **kw)

    monkeypatch.setattr(iv_guided_trainer.IVGuidedTrainer, "__init__", spy)
    scored: list[list[str]] = []
    from ivtrainer.evaluation import predictions as module

    predictions = module.target_predictions

    def record(model, tokenizer, prompts, targets, **kw):
        scored.append(list(prompts))
        return predictions(model, tokenizer, prompts, targets, **kw)

    monkeypatch.setattr(module, "target_predictions", record)
    run_sequence(
        ["brackets", "plural"], out=tmp_path / "r", method="iv-guided-replay", model=model_dir, kl_scale=3.0,
        teacher_strength=2.0, replay_fraction=0.5, eval_split="validation", **FAST,
    )  # fmt: skip
    assert [c.kl_weight for c in configs] == [[60.0, pytest.approx(0.3)]] * 2
    assert [c.teacher_iv_strength for c in configs] == [2.0, 2.0]
    assert datasets == [FAST["n_train"], FAST["n_train"] + FAST["n_train"] // 2]
    validation = {r["prompt"] for t in ("brackets", "plural") for r in load_sequence_task(t, "validation")}
    test = {r["prompt"] for t in ("brackets", "plural") for r in load_sequence_task(t, "test")}
    task_prompts = {p for prompts in scored for p in prompts if p.startswith("Task:")}
    assert task_prompts and task_prompts <= validation and not task_prompts & test
    with pytest.raises(InvalidInputError, match="eval_split='test' with repair"):
        run_sequence(
            ["brackets"], out=tmp_path / "x", model=model_dir, eval_split="validation", repair=True, **FAST
        )
    for bad in ({"kl_scale": 0}, {"teacher_strength": -1.0}, {"eval_split": "train"}):
        with pytest.raises(InvalidInputError):
            run_sequence(["brackets"], out=tmp_path / "y", model=model_dir, **bad, **FAST)


def test_a_resumed_run_keeps_the_heads_its_own_task_ivs_began_with(tmp_path, model_dir, monkeypatch):
    """``iv_heads="shipped"`` takes the own-task IVs' heads from the set shipped for the model; the
    set they took them from is recorded, and a resume after it changed is refused."""
    import dataclasses

    import ivtrainer.iv_guided.own_task_iv as own_task_iv_module
    import ivtrainer.steering.head_set as head_set_module
    from ivtrainer import extract_head_set
    from ivtrainer.modeling.loading import load_model, model_source

    model, tokenizer = load_model(model_dir)
    heads = extract_head_set(
        model,
        tokenizer,
        ["antonym", "uppercase"],
        n_shots=2,
        n_mean_prompts=6,
        n_cie_prompts=2,
        progress=False,
    )
    heads.model_name = model_source(model)["name"]  # "shipped" for this tiny checkpoint
    heads.save_pretrained(tmp_path / "shipped")
    monkeypatch.setattr(head_set_module, "SHIPPED", tmp_path / "shipped")
    used = []
    own = own_task_iv_module.own_task_iv
    monkeypatch.setattr(
        own_task_iv_module, "own_task_iv", lambda *a, **kw: used.append((iv := own(*a, **kw)).settings) or iv
    )
    out, tasks = tmp_path / "run", ["brackets", "plural"]
    run_sequence(tasks, out=out, method="iv-guided", model=model_dir, iv_heads="shipped", **FAST)
    assert json.loads((out / "inputs.json").read_text())["iv_heads"] != "exact"
    assert [u["head_set"]["tasks"] for u in used] == [["antonym", "uppercase"]] * 2
    shutil.rmtree(out / "stages" / "2")  # killed in stage 2
    (out / "results.json").unlink()
    dataclasses.replace(heads, n_top=3).save_pretrained(tmp_path / "shipped")  # then the shipped set changed
    with pytest.raises(InvalidInputError, match="another head set"):
        run_sequence(tasks, out=out, method="iv-guided", model=model_dir, iv_heads="shipped", **FAST)
    run_sequence(["brackets"], out=tmp_path / "exact", method="iv-guided", model=model_dir, **FAST)
    assert json.loads((tmp_path / "exact" / "inputs.json").read_text())["iv_heads"] == "exact"
    assert not used[-1].get("head_set")  # the default: per-task CIE
