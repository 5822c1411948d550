"""The precomputed teacher: the KL against stored top-k distributions or hidden states, the store
(row matching, fingerprints, damage) and training with it (the live teacher's gradients, no
reference copy)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, TrainerCallback

from ivtrainer import IVGuidedTrainer
from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.kl_loss import SparseTeacher, kl_term
from ivtrainer.iv_guided.precomputed_teacher import CACHE_FOLDER, stored_masks
from ivtrainer.steering.intervention import last_prompt_positions
from ivtrainer.testing import intercept_hub_upload, tiny_model, tiny_tokenizer
from tests.utils import collator, guided_config

VOCAB = 320  # the tiny models'
# every path of the loss active from step 0: two KL terms, no thresholds, the head term
TERMS = dict(
    kl_positions=["last_prompt", "all"], kl_weight=[3.0, 1.0], kl_threshold=0.0, teacher_iv_strength=4.0,
    head_mse_weight=0.5, head_mse_threshold=0.0,
)  # fmt: skip


def _one_step(tmp_path, iv, data, model, **kw):
    """The trainer and minus the gradient of one SGD step (lr 1; with ``max_steps``, what the
    steps changed)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sgd = dict(optim="sgd", learning_rate=1.0, max_steps=1, lr_scheduler_type="constant")
    config = guided_config(tmp_path, **(sgd | TERMS | kw))
    trainer = IVGuidedTrainer(
        model, config, instruction_vectors=iv, train_dataset=data.select(range(4)), data_collator=collator()
    )
    trainer.train()
    return trainer, {n: before[n] - p.detach() for n, p in model.named_parameters() if n in before}


def _model(peft: bool, arch: str = "llama"):
    model = tiny_model(arch, seed=1)
    if not peft:
        return model
    torch.manual_seed(1)  # the adapters' random initialisation, the same in every run compared
    return get_peft_model(model, LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM"))


@pytest.mark.parametrize("direction", ["reverse", "forward", "jsd"])
def test_the_top_k_kl_is_the_kl_of_the_coarsened_distributions(direction):
    """Stored top-k + tail bucket: value and gradient equal the KL between both distributions
    coarsened to the k tokens plus one bucket (autograd on that formula); a whole stored
    distribution gives the exact KL."""
    torch.manual_seed(0)
    b, s, v, t, k = 2, 5, 50, 2.0, 5
    student = torch.randn(b, s, v, requires_grad=True)
    teacher = F.log_softmax(torch.randn(b, s, v) * 2 / t, -1).reshape(-1, v)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 3:] = False
    where = mask.reshape(-1).nonzero().squeeze(1)
    full, top = where[:2], where[2:]
    values, indices = teacher[top].topk(k, -1)
    tail = torch.logsumexp(teacher[top].scatter(-1, indices, -torch.inf), -1)
    stored = SparseTeacher(t, full, teacher[full], top, values, indices, tail)

    value = kl_term(student, stored, mask, direction=direction, temperature=t)
    (grad,) = torch.autograd.grad(value, student)
    log_p = F.log_softmax(student / t, -1).reshape(-1, v)
    total = 0.0
    for position in where.tolist():
        if position in full.tolist():
            p, q = log_p[position], teacher[position]
        else:
            row = top.tolist().index(position)
            outside = torch.ones(v, dtype=torch.bool)
            outside[indices[row]] = False
            p = torch.cat([log_p[position][indices[row]], torch.logsumexp(log_p[position][outside], 0)[None]])
            q = torch.cat([values[row], tail[row : row + 1]])
        if direction == "reverse":
            total = total + (p.exp() * (p - q)).sum()
        elif direction == "forward":
            total = total + (q.exp() * (q - p)).sum()
        else:
            m = torch.logaddexp(p, q) - np.log(2.0)
            total = total + 0.5 * ((p.exp() * (p - m)).sum() + (q.exp() * (q - m)).sum())
    expected = total / where.numel()
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-8)

    whole = SparseTeacher(t, where, teacher[where], top[:0], values[:0], indices[:0], tail[:0])
    logits = teacher.reshape(b, s, v) * t  # logits whose softmax at temperature t is the teacher
    torch.testing.assert_close(
        kl_term(student, whole, mask, direction=direction, temperature=t),
        kl_term(student, logits, mask, direction=direction, temperature=t),
    )


@pytest.mark.parametrize("direction", ["reverse", "forward", "jsd"])
def test_stored_logits_give_the_exact_kl(direction):
    """A SparseTeacher of raw logits (the LM head applied to stored hidden states) gives the dense
    teacher's KL and gradient, also when the gradient is written into its logits, and at a
    subset of the positions."""
    torch.manual_seed(0)
    b, s, v, t = 2, 5, 50, 2.0
    student, teacher = torch.randn(b, s, v, requires_grad=True), torch.randn(b, s, v) * 3
    for mask in (torch.ones(b, s, dtype=torch.bool), torch.rand(b, s) > 0.5):
        where = mask.reshape(-1).nonzero().squeeze(1)
        want = kl_term(student, teacher, mask, direction=direction, temperature=t)
        (want_grad,) = torch.autograd.grad(want, student)
        for overwrite in (False, True):
            logits = teacher.reshape(-1, v)[where].clone()
            empty = torch.zeros(0, dtype=torch.long)
            stored = SparseTeacher(
                t,
                empty,
                torch.zeros(0, v),
                empty,
                torch.zeros(0, 1),
                empty[:, None],
                torch.zeros(0),
                where,
                logits,
            )
            got = kl_term(
                student, stored, mask, direction=direction, temperature=t, overwrite_teacher=overwrite
            )
            (grad,) = torch.autograd.grad(got, student)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(grad, want_grad)
            # the buffer was reused exactly when every position is covered
            assert torch.equal(logits, teacher.reshape(-1, v)[where]) == (
                not overwrite or not bool(mask.all())
            )


@pytest.mark.parametrize("peft", [False, True])
@pytest.mark.parametrize("positions", [["last_prompt", "all"], ["answer"]])
def test_training_with_the_stored_teacher_equals_the_live_teacher(tmp_path, iv, data, peft, positions):
    """With k = vocabulary - 1 the stored teacher is the live one up to float16 storage at the last
    prompt token: the same gradients (KL terms and the head term), and no reference copy."""
    n = len(positions)
    kw = dict(kl_positions=positions, kl_weight=[3.0, 1.0][:n])
    _, live = _one_step(tmp_path / "live", iv, data, _model(peft), **kw)
    trainer, stored = _one_step(
        tmp_path / "stored", iv, data, _model(peft), teacher="precomputed", teacher_top_k=VOCAB - 1, **kw
    )
    _, no_kl = _one_step(tmp_path / "none", iv, data, _model(peft), **kw | {"kl_weight": [0.0] * n})
    for name, grad in live.items():
        torch.testing.assert_close(stored[name], grad, rtol=1e-3, atol=2e-5, msg=name)
    assert max(float((live[k] - no_kl[k]).abs().max()) for k in live) > 1e-4  # the KL mattered
    callback = trainer.iv_callbacks[-1]
    assert callback.reference is None and callback.guidance.store is not None
    assert (
        tmp_path / "stored" / "run" / CACHE_FOLDER / callback.guidance.store.folder.name / "meta.json"
    ).is_file()


@pytest.mark.parametrize(
    ("arch", "peft"), [("llama", False), ("gpt2", False), ("qwen2", False), ("llama", True)]
)
def test_stored_hidden_states_give_the_live_teachers_training(tmp_path, iv, data, arch, peft):
    """teacher_top_k=0: the teacher's LM head applied to its stored hidden states is its exact
    distribution at every position. Three steps (full fine-tuning trains the LM head, tied to the
    embeddings in GPT-2: the stored head is the one before training) end where the live teacher's
    do, and the store holds one hidden state a KL position and the head once."""
    model = lambda: _model(peft, arch)  # noqa: E731
    # the store written a row at a time: its first pass checks the LM head, the others end before it
    kw = dict(max_steps=3, learning_rate=0.1, per_device_train_batch_size=2, per_device_eval_batch_size=1)
    _, live = _one_step(tmp_path / "live", iv, data, model(), **kw)
    stored_model = model()
    no_grad_head_calls = []
    stored_model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: (
            no_grad_head_calls.append(tuple(args[0].shape)) if not torch.is_grad_enabled() else None
        )
    )
    trainer, stored = _one_step(
        tmp_path / "stored", iv, data, stored_model, teacher="precomputed", teacher_top_k=0, **kw
    )
    for name, change in live.items():
        torch.testing.assert_close(stored[name], change, rtol=1e-4, atol=1e-6, msg=name)
    # 4 teacher passes of one row each, the LM head in the first only (the others: the monitor's)
    assert [shape[0] for shape in no_grad_head_calls].count(1) == 1
    store = trainer.iv_callbacks[-1].guidance.store
    part, rows = store.parts[0], [data[i] for i in range(4)]
    batch = collator()(rows)
    covered = stored_masks(
        ["last_prompt", "all"], batch["labels"], batch["attention_mask"], whole_last_prompt=False
    )[1]
    assert (
        part["hidden"].shape == (int(covered.sum()), 64) and "top_values" not in part and "full" not in part
    )
    assert part["head_weight"].shape == (VOCAB, 64) and store.meta["hidden_dtype"] == "float32"
    # LoRA leaves the head frozen: the store applies the model's own (no copy); full FT trains it
    weight = store.head(torch.device("cpu"))[0]
    own = trainer.model.get_output_embeddings().weight
    assert (weight.data_ptr() == own.data_ptr()) == peft


def test_a_soft_capped_model_is_refused_for_stored_hidden_states(tmp_path, iv, data):
    """Gemma 2 soft-caps its logits after the LM head: the head alone cannot rebuild them."""
    trainer = IVGuidedTrainer(
        tiny_model("gemma2"), guided_config(tmp_path, teacher="precomputed", teacher_top_k=0, max_steps=1),
        instruction_vectors=iv, train_dataset=data.select(range(4)), data_collator=collator(),
    )  # fmt: skip
    with pytest.raises(InvalidInputError, match=r"soft-cap.*teacher_top_k >= 1"):
        trainer.train()
    assert not list((tmp_path / "run" / CACHE_FOLDER).iterdir())  # nothing half-written left
    assert not trainer.model.get_output_embeddings()._forward_pre_hooks  # the capture hook removed


def test_full_fine_tuning_holds_no_reference_copy(tmp_path, iv, data):
    seen = {}

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen["reference"] = trainer.iv_callbacks[-1].reference

    trainer = IVGuidedTrainer(
        tiny_model("llama"), guided_config(tmp_path, teacher="precomputed", **TERMS), instruction_vectors=iv,
        train_dataset=data, data_collator=collator(), callbacks=[Spy()],
    )  # fmt: skip
    trainer.train()
    assert "reference" in seen and seen["reference"] is None
    live = IVGuidedTrainer(
        tiny_model("llama"), guided_config(tmp_path / "live", **TERMS), instruction_vectors=iv,
        train_dataset=data, data_collator=collator(),
    )  # fmt: skip
    assert live.iv_callbacks[-1].reference is not None  # what the stored teacher saves


def test_rows_are_matched_whatever_the_padding_side_and_order(tmp_path, iv, data):
    trainer, _ = _one_step(tmp_path, iv, data, tiny_model("llama"), teacher="precomputed", teacher_top_k=16)
    store = trainer.iv_callbacks[-1].guidance.store
    rows = [data[i] for i in range(4)]
    tokenizer = tiny_tokenizer()

    def stored(batch_rows, side):
        tokenizer.padding_side = side
        batch = DataCollatorForSeq2Seq(tokenizer, padding=True)(batch_rows)
        sparse, heads = store.batch(batch["input_ids"], batch["attention_mask"], batch["labels"])
        full, top = stored_masks(["last_prompt", "all"], batch["labels"], batch["attention_mask"])
        # the stored positions are where this batch's last prompt tokens and attended tokens are
        assert torch.equal(full, last_prompt_positions(batch["labels"]))
        assert torch.equal(sparse.full_positions, full.reshape(-1).nonzero()[:, 0])
        assert torch.equal(sparse.top_positions, top.reshape(-1).nonzero()[:, 0])
        return sparse, heads

    right, right_heads = stored(rows, "right")
    left, left_heads = stored(rows[::-1], "left")
    tokenizer.padding_side = "right"
    torch.testing.assert_close(left.full, right.full.flip(0))
    torch.testing.assert_close(left_heads, right_heads.flip(0))
    assert torch.equal(left.top_values.sort(0).values, right.top_values.sort(0).values)

    changed = DataCollatorForSeq2Seq(tokenizer, padding=True)(rows)
    changed["input_ids"][0, 1] += 1
    with pytest.raises(InvalidInputError, match="not in the precomputed teacher"):
        store.batch(changed["input_ids"], changed["attention_mask"], changed["labels"])


def test_the_store_is_reused_and_recomputed_when_anything_changes(tmp_path, iv, data, caplog):
    def run(model_seed=1, rows=range(4), **kw):
        caplog.clear()
        model = tiny_model("llama", seed=model_seed)
        config = guided_config(tmp_path, teacher="precomputed", max_steps=1, **(TERMS | kw))
        trainer = IVGuidedTrainer(
            model, config, instruction_vectors=iv, train_dataset=data.select(rows), data_collator=collator()
        )
        with caplog.at_level(logging.WARNING, logger="ivtrainer"):
            trainer.train()
        folders = sorted(p.name for p in (tmp_path / "run" / CACHE_FOLDER).iterdir())
        return caplog.text, folders, trainer.state.log_history[0]["loss"]

    text, first, loss = run()
    assert "precomputed teacher: 4 rows" in text and len(first) == 1
    assert "tail mass" in text and "teacher_top_k=0 stores the teacher exactly" in text  # 64 of 320 tokens
    text, again, loss_again = run()
    assert "precomputed teacher reused" in text and again == first and loss_again == loss
    for change, kw in [
        ("data", {"rows": range(1, 5)}),
        ("model", {"model_seed": 2}),
        ("teacher", {"teacher_iv_strength": 2.0}),
        ("settings", {"teacher_top_k": 8}),
        ("settings", {"teacher_top_k": 0}),
    ]:
        text, folders, _ = run(**kw)  # each run changes one thing against the run before
        stale = re.search(r"is stale \((.*) changed\): removed", text)
        assert stale and change in stale.group(1).split(", "), (change, text)
        assert len(folders) == 1 and folders != first
    # a damaged store (a killed copy, a truncated file) is found and computed again
    text, first, loss = run()
    (tmp_path / "run" / CACHE_FOLDER / first[0] / "top_values-0.npy").write_bytes(b"\x93NUMPY")
    text, again, loss_again = run()
    assert "is damaged" in text and "precomputed teacher: 4 rows" in text
    assert again == first and loss_again == loss
    # what a killed precompute leaves (a temporary folder) is never read, and removed next time
    (tmp_path / "run" / CACHE_FOLDER / f".{first[0]}.tmp").mkdir()
    text, _, _ = run(rows=range(2, 6))
    assert not (tmp_path / "run" / CACHE_FOLDER / f".{first[0]}.tmp").exists()


@pytest.mark.parametrize("restore", [False, True])  # restore_callback_states_from_checkpoint
def test_a_resumed_full_fine_tuning_reuses_the_store(tmp_path, iv, data, restore):
    """The model before training is the teacher: a resumed run (whose model is trained) reads the
    first run's store, and ends where an uninterrupted run does; without the store it is refused."""

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    def trainer(out, callbacks=()):
        config = guided_config(
            tmp_path, output_dir=str(out), per_device_train_batch_size=2, save_strategy="steps", save_steps=1,
            teacher="precomputed", restore_callback_states_from_checkpoint=restore, **TERMS,
        )  # fmt: skip
        return IVGuidedTrainer(
            tiny_model("llama", seed=5), config, instruction_vectors=iv, train_dataset=data,
            data_collator=collator(), callbacks=list(callbacks),
        )  # fmt: skip

    whole = trainer(tmp_path / "whole")
    whole.train()
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "run", [Crash()]).train()
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)

    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "gone", [Crash()]).train()
    for item in (tmp_path / "gone" / CACHE_FOLDER).iterdir():
        for file in item.iterdir():
            file.unlink()
        item.rmdir()
    with pytest.raises(InvalidInputError, match="missing, stale or damaged"):
        trainer(tmp_path / "gone").train(resume_from_checkpoint=True)


def test_bad_input_is_refused_before_training(tmp_path, iv, data):
    with pytest.raises(InvalidInputError, match="teacher must be 'live' or 'precomputed'"):
        guided_config(tmp_path, teacher="cached")
    with pytest.raises(InvalidInputError, match="teacher_top_k must be a whole number >= 0"):
        guided_config(tmp_path, teacher="precomputed", teacher_top_k=-1)

    def trainer(dataset=data, data_collator=None, **kw):
        model = tiny_model("llama")
        config = guided_config(tmp_path, teacher="precomputed", **(TERMS | kw))
        return model, IVGuidedTrainer(
            model,
            config,
            instruction_vectors=iv,
            train_dataset=dataset,
            data_collator=data_collator or collator(),
        )

    (tmp_path / "a_file").write_text("")
    with pytest.raises(InvalidInputError, match="is a file"):  # at construction
        trainer(teacher_cache_dir=str(tmp_path / "a_file"))
    for kw, message in [
        ({"teacher_top_k": VOCAB}, "smaller than the vocabulary"),
        ({"dataset": data.to_iterable_dataset(), "max_steps": 1}, "map-style"),
        ({"data_collator": _with_position_ids}, "packed without padding"),
    ]:
        model, built = trainer(**kw)
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(InvalidInputError, match=message):
            built.train()
        assert all(
            torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
        )  # no step taken


def test_a_store_the_disk_cannot_hold_is_refused_before_it_is_written(tmp_path, iv, data, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    model = tiny_model("llama")
    before = [p.detach().clone() for p in model.parameters()]
    trainer = IVGuidedTrainer(
        model, guided_config(tmp_path, teacher="precomputed", teacher_top_k=0, **TERMS), instruction_vectors=iv,
        train_dataset=data, data_collator=collator(),
    )  # fmt: skip
    with pytest.raises(
        InvalidInputError, match=r"needs \d+\.\d MB in .* but 0\.0 MB is free: point teacher_cache_dir"
    ):
        trainer.train()
    assert not list((tmp_path / "run" / CACHE_FOLDER).iterdir())  # nothing half-written
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _with_position_ids(rows):
    batch = collator()(rows)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    return batch


def test_push_to_hub_leaves_the_store_out(tmp_path, iv, data, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, task_type="CAUSAL_LM"))
    config = guided_config(tmp_path, hub_model_id="someone/stored-teacher", teacher="precomputed", **TERMS)
    trainer = IVGuidedTrainer(
        model, config, instruction_vectors=iv, train_dataset=data, data_collator=collator()
    )
    trainer.train()
    assert any((tmp_path / "run" / CACHE_FOLDER).iterdir())
    with intercept_hub_upload("someone/stored-teacher") as sent:
        trainer.push_to_hub()
    assert "adapter_model.safetensors" in sent["files"]
    assert not [f for f in sent["files"] if CACHE_FOLDER in f]


def _store_run(tmp_path, iv, data, rows=range(4), out="run", **kw):
    """One step with the stored teacher; its loss, the log and the store folders."""
    config = guided_config(
        tmp_path, output_dir=str(tmp_path / out), teacher="precomputed", max_steps=1, **(TERMS | kw)
    )
    trainer = IVGuidedTrainer(
        tiny_model("llama", seed=1), config, instruction_vectors=iv, train_dataset=data.select(rows),
        data_collator=collator(),
    )  # fmt: skip
    logger = logging.getLogger("ivtrainer")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        trainer.train()
    finally:
        logger.removeHandler(handler)
    return trainer.state.log_history[0]["loss"], "\n".join(records)


def _npy(folder, name):
    return np.load(folder / name, mmap_mode="r")


def _tamper(kind, folder, other):
    """Edit a finished store as a hostile user (or a bad copy) would."""
    import json
    import shutil

    if kind in ("nan", "zeros", "inf"):
        values = _npy(folder, "top_values-0.npy")
        fill = {"nan": np.nan, "zeros": 0.0, "inf": np.inf}[kind]
        np.save(folder / "top_values-0.npy", np.full(values.shape, fill, values.dtype))
    elif kind == "dtype":
        np.save(folder / "top_values-0.npy", np.asarray(_npy(folder, "top_values-0.npy"), np.float64))
    elif kind == "indices":
        indices = np.array(_npy(folder, "top_indices-0.npy"))
        indices[0, 0] = 10**6
        np.save(folder / "top_indices-0.npy", indices)
    elif kind == "meta":
        meta = json.loads((folder / "meta.json").read_text())
        meta["temperature"] = 1.0
        (folder / "meta.json").write_text(json.dumps(meta))
    elif kind == "another store":
        for f in folder.iterdir():
            f.unlink()
        for f in other.iterdir():
            shutil.copy(f, folder / f.name)


@pytest.mark.parametrize("kind", ["nan", "zeros", "inf", "dtype", "indices", "meta", "another store"])
def test_an_edited_store_is_recomputed_never_trained_on(tmp_path, iv, data, kind):
    """Any edit of a finished store (values, dtype, meta.json, another run's files under this
    fingerprint's name) is found when it is opened: one log line, the store computed again, and
    training as with a fresh store."""
    loss, _ = _store_run(tmp_path, iv, data)
    _store_run(tmp_path, iv, data, rows=range(2, 6), out="other")
    (folder,) = (tmp_path / "run" / CACHE_FOLDER).iterdir()
    (other,) = (tmp_path / "other" / CACHE_FOLDER).iterdir()
    _tamper(kind, folder, other)
    again, log = _store_run(tmp_path, iv, data)
    assert "is damaged" in log and "precomputed teacher: 4 rows" in log, log
    assert again == loss and [p.name for p in (tmp_path / "run" / CACHE_FOLDER).iterdir()] == [folder.name]


def test_a_teacher_that_gives_nan_is_refused_before_training(tmp_path, iv, data):
    model = tiny_model("llama", seed=1)
    with torch.no_grad():
        model.lm_head.weight[3] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    trainer = IVGuidedTrainer(
        model, guided_config(tmp_path, teacher="precomputed", max_steps=1, **TERMS), instruction_vectors=iv,
        train_dataset=data.select(range(4)), data_collator=collator(),
    )  # fmt: skip
    with pytest.raises(InvalidInputError, match="non-finite values"):
        trainer.train()
    assert not list((tmp_path / "run" / CACHE_FOLDER).iterdir())  # nothing written
    for a, b in zip(before, model.parameters(), strict=True):  # no step taken
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("where", ["output_dir", "output_dir/cache", "home", "cwd", "project"])
def test_a_cache_folder_that_is_not_ours_or_would_be_uploaded_is_refused(
    tmp_path, iv, data, monkeypatch, where
):
    """teacher_cache_dir: never where push_to_hub uploads, never a folder holding anything but
    stores (stale stores are removed there); refused at construction, nothing touched."""
    home, project = tmp_path / "home", tmp_path / "project"
    (home / "code").mkdir(parents=True)
    (home / "thesis.tex").write_text("mine")
    (project / "results").mkdir(parents=True)
    (project / "results" / "meta.json").write_text("{}")  # looks like a store to a careless sweep
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "code")
    (home / "code" / "notes.md").write_text("mine")
    cache = {
        "output_dir": tmp_path / "run", "output_dir/cache": tmp_path / "run" / "cache", "home": "~",
        "cwd": ".", "project": project,
    }[where]  # fmt: skip
    message = "push_to_hub would upload" if where.startswith("output_dir") else "not precomputed teachers"
    with pytest.raises(InvalidInputError, match=message):
        IVGuidedTrainer(
            tiny_model("llama"), guided_config(tmp_path, teacher="precomputed", teacher_cache_dir=str(cache), **TERMS),
            instruction_vectors=iv, train_dataset=data, data_collator=collator(),
        )  # fmt: skip
    assert (home / "thesis.tex").read_text() == "mine" and (project / "results" / "meta.json").is_file()
    assert (home / "code" / "notes.md").is_file()


def test_a_cache_folder_starting_with_an_underscore_in_output_dir_is_never_uploaded(
    tmp_path, iv, data, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    cache = tmp_path / "run" / "_teachers"
    config = guided_config(
        tmp_path, hub_model_id="someone/stored", teacher="precomputed", teacher_cache_dir=str(cache), max_steps=1,
        **TERMS,
    )  # fmt: skip
    trainer = IVGuidedTrainer(
        tiny_model("llama"), config, instruction_vectors=iv, train_dataset=data, data_collator=collator()
    )
    trainer.train()
    assert any(cache.iterdir())
    with intercept_hub_upload("someone/stored") as sent:
        trainer.push_to_hub()
    assert "model.safetensors" in sent["files"] and not [f for f in sent["files"] if "_teachers" in f]


def test_runs_sharing_a_cache_folder_leave_each_other_alone(tmp_path, iv, data, monkeypatch):
    """A shared teacher_cache_dir: a live run's temporary folder is left alone, a killed one's is
    removed; a run that finds the same store written by another meanwhile uses it."""
    import shutil
    import subprocess
    import sys

    from ivtrainer.iv_guided.precomputed_teacher import write as write_pass

    cache = tmp_path / "shared"
    loss, _ = _store_run(tmp_path, iv, data, teacher_cache_dir=str(cache))
    (store,) = cache.iterdir()
    shutil.copytree(store, tmp_path / "saved")
    shutil.rmtree(store)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    try:
        live_tmp = cache / f".{store.name}.tmp-{alive.pid}-abc"
        dead_tmp = cache / f".{store.name}.tmp-{int(dead.stdout)}-def"
        live_tmp.mkdir()
        dead_tmp.mkdir()
        write = write_pass._write_part

        def meanwhile(folder, *args, **kwargs):  # another run renames the same store into place first
            shapes = write(folder, *args, **kwargs)
            shutil.copytree(tmp_path / "saved", store)
            return shapes

        monkeypatch.setattr(write_pass, "_write_part", meanwhile)
        again, log = _store_run(tmp_path, iv, data, teacher_cache_dir=str(cache))
    finally:
        alive.kill()
        alive.wait()
    assert live_tmp.is_dir() and not dead_tmp.exists()
    assert "written by another run meanwhile" in log and again == loss
    assert sorted(p.name for p in cache.iterdir()) == sorted([store.name, live_tmp.name])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_the_head_pass_without_the_iv_ends_after_the_last_prompt_token(iv, data, tokenizer, padding_side):
    """The head term's reference (the teacher without the IV) is read at each row's last prompt
    token: its pass runs the batch cut after the last of them (causal: nothing later changes it)
    and gives the heads' outputs of the whole batch's pass."""
    from ivtrainer.iv_guided.teacher import LiveTeacher

    model = tiny_model("llama", seed=1)
    teacher = LiveTeacher(
        [(iv.edit_layer, iv.vector * iv.strength)], strength=4.0, heads=iv.heads, head_reference="without_iv"
    )
    teacher.prepare(model)
    assert teacher.separate_head_pass()
    tokenizer.padding_side = padding_side
    try:
        batch = DataCollatorForSeq2Seq(tokenizer, padding=True)([data[i] for i in range(4)])
    finally:
        tokenizer.padding_side = "right"
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    prompt_end = last_prompt_positions(batch["labels"])
    widths = []
    teacher.reference.get_input_embeddings().register_forward_hook(
        lambda m, a, out: widths.append(a[0].shape[1])
    )
    _, heads = teacher.run(model, inputs, prompt_end)
    _, whole = teacher._pass(model, inputs, prompt_end, None, with_iv=False)
    rows, cols = prompt_end.nonzero(as_tuple=True)
    for layer, head in iv.heads:
        torch.testing.assert_close(heads[layer, head], whole[layer][rows, cols, head], rtol=0, atol=1e-6)
    seq, last = batch["input_ids"].shape[1], int(cols.max()) + 1
    assert last < seq and widths == [seq, last, seq]  # the KL's pass, the cut head pass, the check


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_the_kl_gradient_goes_through_a_frozen_lm_head(tmp_path, iv, data, arch, monkeypatch):
    """LoRA leaves the LM head frozen: the KL's gradient goes to its input (no second
    ``(batch, seq, vocab)`` gradient beside the CE's), and training is the same as through the
    logits. Gemma 2 soft-caps the head's output: the check on the first batch keeps the logits."""
    import ivtrainer.iv_guided.guidance as guidance
    import ivtrainer.iv_guided.kl_loss as kl_loss

    routes = []
    kl_terms = kl_loss.kl_terms

    def spy(*args, **kw):
        routes.append(kw.get("student_hidden") is not None)
        return kl_terms(*args, **kw)

    monkeypatch.setattr(guidance, "kl_terms", spy)
    kw = dict(max_steps=2, learning_rate=0.1, per_device_train_batch_size=2)
    _, through_head = _one_step(tmp_path / "head", iv, data, _model(True, arch), **kw)
    assert routes == [arch == "llama"] * 2
    monkeypatch.setattr(guidance, "_frozen_head", lambda model: None)
    _, through_logits = _one_step(tmp_path / "logits", iv, data, _model(True, arch), **kw)
    assert routes[2:] == [False] * 2
    for name, change in through_logits.items():
        torch.testing.assert_close(through_head[name], change, rtol=1e-4, atol=1e-6, msg=name)
