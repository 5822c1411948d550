"""lm-evaluation-harness: the package's abilities as lm-eval tasks, LMEvalCallback on a training
run, and the lm_eval CLI route (all offline: the tasks are built from the package's own data)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from ivtrainer.callbacks import LMEvalCallback
from ivtrainer.datasets.edits import candidate_facts
from ivtrainer.errors import InvalidInputError, MissingDependencyError
from ivtrainer.evaluation.forgetting import QUESTIONS, icl_abilities, instruction_hits
from ivtrainer.evaluation.lm_eval_harness import check_model, check_tasks, evaluate_lm, task_manager
from ivtrainer.evaluation.lm_eval_tasks import lm_eval_tasks_path
from ivtrainer.evaluation.predictions import target_predictions
from ivtrainer.testing import tiny_model
from tests.utils import collator

ICL = [
    f"ivtrainer_icl_{t}"
    for t in ("antonym", "country_capital", "first_letter", "present_past", "singular_plural", "uppercase")
]


@pytest.fixture(scope="module")
def manager():
    return task_manager()


def _trainer(tmp_path, model, tokenizer, data, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, **kw,
    )  # fmt: skip
    return Trainer(model, args, train_dataset=data, data_collator=collator(), processing_class=tokenizer)


def test_the_package_tasks_and_group_are_found_and_unknown_names_get_close_ones(manager):
    assert (lm_eval_tasks_path() / "ivtrainer_abilities.yaml").is_file()
    assert check_tasks("ivtrainer_abilities, ivtrainer_facts_instruction", manager) == [
        "ivtrainer_abilities",
        "ivtrainer_facts_instruction",
    ]
    with pytest.raises(InvalidInputError, match="unknown lm-eval task 'hellaswg'; did you mean hellaswag"):
        check_tasks(["hellaswg"], manager)
    with pytest.raises(InvalidInputError, match="no lm-eval task given"):
        check_tasks(" , ", manager)
    with pytest.raises(InvalidInputError, match="not a folder of lm-eval task configs"):
        task_manager(lm_eval_tasks_path() / "ivtrainer_abilities.yaml")


def test_callback_on_a_peft_run_logs_writes_and_restores(tmp_path, tokenizer, data, manager):
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    embedding = model.get_input_embeddings()
    seen = []  # lm-eval must run the model being trained itself (in eval mode), not a copy of it

    def hook(module, args):
        if not model.training:
            seen.append(module is embedding)

    embedding.register_forward_pre_hook(hook)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, model, tokenizer, data, max_steps=4)
    callback = LMEvalCallback(
        ["ivtrainer_icl_antonym", "ivtrainer_facts_completion"], limit=3, every=2, trainer=trainer
    )
    trainer.add_callback(callback)
    trainer.train()
    assert seen and all(seen)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    assert model.training  # the Trainer's mode, restored after each evaluation
    logged = [e for e in trainer.state.log_history if "lm_eval/ivtrainer_icl_antonym/acc" in e]
    assert [e["step"] for e in logged] == [0, 2, 4]
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [
        1,
        2,
        3,
        4,
    ]  # every step's own log
    saved = json.loads((tmp_path / "run" / "lm_eval.json").read_text())
    assert [e["step"] for e in saved["evaluations"]] == [0, 2, 4]
    assert set(saved["evaluations"][0]["scores"]) == {
        "ivtrainer_icl_antonym/acc",
        "ivtrainer_facts_completion/acc",
    }
    table = (tmp_path / "run" / "lm_eval.md").read_text()
    assert "| ivtrainer_icl_antonym/acc |" in table and "step 0 | step 2 | step 4 | change |" in table


def test_callback_without_the_trainer_logs_into_the_history_every_epoch(tmp_path, tokenizer, data):
    trainer = _trainer(tmp_path, tiny_model("qwen2"), tokenizer, data.select(range(4)), num_train_epochs=2)
    trainer.add_callback(LMEvalCallback("ivtrainer_icl_uppercase", limit=2, at_start=False))
    trainer.train()
    steps = [e["step"] for e in trainer.state.log_history if "lm_eval/ivtrainer_icl_uppercase/acc" in e]
    assert steps == [1, 2]


def test_bad_settings_are_refused_before_training(tmp_path, tokenizer, data, monkeypatch):
    for every in (0, -1, "step", True):
        with pytest.raises(InvalidInputError, match="every must be 'epoch' or a positive number"):
            LMEvalCallback("ivtrainer_abilities", every=every)
    with pytest.raises(InvalidInputError, match="limit must be > 0"):
        LMEvalCallback("ivtrainer_abilities", limit=0)
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, model, tokenizer, data, max_steps=2)
    trainer.add_callback(LMEvalCallback("ivtrainer_abilities", every=5))
    with pytest.raises(InvalidInputError, match=r"every=5\) would never run: training has 2 steps"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(InvalidInputError, match="causal LM"):
        check_model(torch.nn.Linear(2, 2))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'ivtrainer\[eval\]'"):
        LMEvalCallback("ivtrainer_abilities")


@pytest.mark.real
def test_the_tasks_score_what_evaluate_abilities_scores(default_model, manager):
    model, tokenizer = default_model
    n = 16
    scores = evaluate_lm(model, tokenizer, ["ivtrainer_abilities"], limit=n, manager=manager)
    icl = icl_abilities(model, tokenizer, n_icl=n)
    assert {f"ivtrainer_icl_{k.removeprefix('icl/')}/acc": v for k, v in icl.items()} == pytest.approx(
        {f"{t}/acc": scores[f"{t}/acc"] for t in ICL}
    )
    facts = candidate_facts()[:n]
    completion = target_predictions(
        model, tokenizer, [f["prompt"] for f in facts], [f["target_old"] for f in facts]
    )
    assert scores["ivtrainer_facts_completion/acc"] == pytest.approx(
        sum(p[0] == t[0] for p, t in completion) / n
    )
    parts = [scores[f"{t}/acc"] for t in [*ICL, "ivtrainer_facts_completion"]]
    assert scores["ivtrainer_abilities/acc"] == pytest.approx(
        sum(parts) / len(parts)
    )  # the group: unweighted
    chat = evaluate_lm(
        model, tokenizer, ["ivtrainer_facts_instruction"], limit=8, apply_chat_template=True, manager=manager
    )
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": QUESTIONS[f["relation"]].format(f["subject"])}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for f in facts[:8]
    ]
    hits = instruction_hits(model, tokenizer, prompts, [f["target_old"] for f in facts[:8]])
    assert chat["ivtrainer_facts_instruction/acc"] == pytest.approx(sum(hits) / 8)


@pytest.mark.real
def test_the_lm_eval_cli_runs_the_shipped_tasks_offline(default_model, tmp_path):
    from ivtrainer.modeling.loading import default_model_path

    include = subprocess.run(
        [str(Path(sys.executable).parent / "ivtrainer"), "lm-eval-tasks"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    done = subprocess.run(
        [lm_eval, "--model", "hf", "--model_args", f"pretrained={default_model_path()}", "--device", "cpu",
         "--include_path", include, "--tasks", "ivtrainer_icl_antonym", "--limit", "8",
         "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ivtrainer_icl_antonym" in done.stdout and "acc" in done.stdout
    (saved,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(saved.read_text())["results"]["ivtrainer_icl_antonym"]["acc,none"]
    model, tokenizer = default_model  # the documents knew the tokenizer from --model_args: exact scores
    assert acc == pytest.approx(icl_abilities(model, tokenizer, n_icl=8)["icl/antonym"])


@pytest.mark.parametrize("kind", ["iv-guided", "f-learning", "sft"])
def test_callback_on_the_package_trainers_and_sft(kind, tmp_path, tokenizer, data):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from ivtrainer import FLearningConfig, FLearningTrainer, IVGuidedConfig, IVGuidedTrainer

    common = dict(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True,
    )  # fmt: skip
    model, rows = tiny_model("llama"), data.select(range(8))
    if kind == "iv-guided":  # a KL anchor: the teacher pass runs, no IV needed
        config = IVGuidedConfig.recipe("kl-anchor", **common)
        trainer = IVGuidedTrainer(
            model, config, train_dataset=rows, data_collator=collator(), processing_class=tokenizer
        )
    elif kind == "f-learning":  # the callback sees the learning phase: its start is after the subtraction
        config = FLearningConfig(**common, old_num_train_epochs=1, old_learning_rate=1e-3)
        trainer = FLearningTrainer(
            model,
            config,
            train_dataset=rows,
            old_dataset=rows,
            data_collator=collator(),
            processing_class=tokenizer,
        )
    else:
        pairs = Dataset.from_list([{"prompt": f"Q: word {i}\nA:", "completion": f" w{i}"} for i in range(8)])
        trainer = SFTTrainer(
            model=model, args=SFTConfig(**common), train_dataset=pairs, processing_class=tokenizer
        )
    trainer.add_callback(LMEvalCallback("ivtrainer_icl_antonym", limit=2, every=2, trainer=trainer))
    trainer.train()
    steps = [e["step"] for e in trainer.state.log_history if "lm_eval/ivtrainer_icl_antonym/acc" in e]
    assert steps == [0, 2]
    assert trainer.model.training


def test_training_goes_on_as_if_no_evaluation_had_run(tmp_path, tokenizer, data):
    """lm-eval seeds the global random generators; the callback puts them back, so dropout (here
    LoRA's) draws the same masks with and without it."""

    def losses(with_callback: bool) -> list[float]:
        torch.manual_seed(0)
        model = get_peft_model(
            tiny_model("llama"), LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj"])
        )
        trainer = _trainer(tmp_path / str(with_callback), model, tokenizer, data, num_train_epochs=2, seed=0)
        if with_callback:
            trainer.add_callback(LMEvalCallback("ivtrainer_icl_antonym", limit=2, every=1, trainer=trainer))
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    assert losses(True) == losses(False)


def test_evaluate_abilities_takes_your_own_abilities_and_lm_eval_tasks(tmp_path, tokenizer):
    from ivtrainer.evaluation.forgetting import evaluate_abilities, held_out_mean
    from ivtrainer.testing import tiny_edits

    pairs = [{"input": f"w{i}", "output": f"W{i}"} for i in range(30)]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    model, facts = tiny_model("llama"), [{**e, "relation": "capital"} for e in tiny_edits(2)]
    scores = evaluate_abilities(
        model, tokenizer, facts, ["cold"], n_icl=4, abilities={"mine": tmp_path / "mine.jsonl", "listed": pairs},
        lm_eval_tasks=["ivtrainer_icl_antonym"], lm_eval_limit=2,
    )  # fmt: skip
    assert {"icl/mine", "icl/listed", "lm_eval/ivtrainer_icl_antonym/acc", "icl/antonym"} <= set(scores)
    assert 0 <= held_out_mean(scores) <= 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(InvalidInputError, match="has no 'input' field"):
        evaluate_abilities(model, tokenizer, facts, ["cold"], abilities={"bad": tmp_path / "bad.jsonl"})
    with pytest.raises(InvalidInputError, match="ability 'few' has 3 pairs"):
        evaluate_abilities(model, tokenizer, facts, ["cold"], abilities={"few": pairs[:3]})


def test_no_environment_report_outside_a_git_checkout(tmp_path, monkeypatch, capfd, tokenizer, manager):
    """lm-eval's run metadata (git, pip: ~1 s a call) is skipped: outside a git checkout its
    `git describe` printed "fatal: not a git repository" into the training log. Its functions are
    put back afterwards."""
    import lm_eval.evaluator

    originals = (lm_eval.evaluator.get_git_commit_hash, lm_eval.evaluator.add_env_info)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path
    scores = evaluate_lm(tiny_model("llama"), tokenizer, ["ivtrainer_icl_antonym"], limit=2, manager=manager)
    assert "ivtrainer_icl_antonym/acc" in scores
    assert "fatal" not in capfd.readouterr().err
    assert (lm_eval.evaluator.get_git_commit_hash, lm_eval.evaluator.add_env_info) == originals
