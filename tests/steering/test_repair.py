"""IV repair: each row's own IV in a mixed batch, and routing prompts to their task."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest
import torch

from ivtrainer.errors import InvalidInputError
from ivtrainer.steering.repair import TaskVectors
from ivtrainer.steering.routing import NearestTaskRouter
from ivtrainer.testing import tiny_model


def _last_logits(model, tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    last = (batch["attention_mask"] * torch.arange(1, logits.shape[1] + 1)).argmax(-1)
    return logits[torch.arange(len(prompts)), last]


def test_each_row_gets_its_own_tasks_iv(iv, tokenizer):
    """A batch of three prompts (task a, task b, no task) gives what each prompt gives alone with
    its own IV applied (none for the third); the hooks go on exit; generation runs."""
    model = tiny_model("llama").eval()
    other = dataclasses.replace(iv, vector=-2 * iv.vector, task="b")
    repair = TaskVectors({"a": iv, "b": other}, strengths={"b": 0.5})
    prompts = ["Q: hot\nA:", "Q: up\nA:", "Q: big\nA:"]
    plain = _last_logits(model, tokenizer, prompts)
    with repair.apply(model, ["a", "b", None]):
        mixed = _last_logits(model, tokenizer, prompts)
    with iv.apply(model):
        alone_a = _last_logits(model, tokenizer, prompts[:1])
    with other.apply(model, strength=0.5 * other.strength):
        alone_b = _last_logits(model, tokenizer, prompts[1:2])
    torch.testing.assert_close(mixed[0], alone_a[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1], alone_b[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[2], plain[2])
    assert float((mixed[0] - plain[0]).abs().max()) > 1e-4
    torch.testing.assert_close(_last_logits(model, tokenizer, prompts), plain)  # hooks gone
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with repair.apply(model, ["a", "b", None]):
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape == (3, batch["input_ids"].shape[1] + 3)


def test_repair_refuses_unknown_tasks_and_a_batch_of_another_size(iv, tokenizer):
    model = tiny_model("llama").eval()
    repair = TaskVectors({"a": iv})
    with pytest.raises(InvalidInputError, match=r"no IV for tasks \['z'\]"), repair.apply(model, ["a", "z"]):
        pass
    with pytest.raises(InvalidInputError, match="strengths for tasks without an IV"):
        TaskVectors({"a": iv}, strengths={"b": 1.0})
    with pytest.raises(InvalidInputError, match="one strength per row"), repair.apply(model, ["a", "a"]):
        _last_logits(model, tokenizer, ["Q: hot\nA:", "Q: up\nA:", "Q: big\nA:"])


def test_prompts_are_routed_to_their_task(tokenizer):
    """Nearest centroid on held-out prompts of two formats; the layer is chosen on the fitting
    prompts; a fixed layer is used as given."""
    model = tiny_model("llama", seed=1).eval()
    words = ["hot", "up", "big", "cat", "dog", "sun", "red", "old", "new", "low", "wet", "fat"]
    antonym = [f"Q: {w}\nA:" for w in words]
    upper = [f"Uppercase the word {w} ->" for w in words]
    router = NearestTaskRouter.fit(model, tokenizer, {"antonym": antonym[:8], "upper": upper[:8]})
    assert router.layer in (0, 1, 2)
    routed = router.route(model, tokenizer, antonym[8:] + upper[8:])
    assert routed == ["antonym"] * 4 + ["upper"] * 4
    # prompts of no known task are left alone (the gate), unless it is switched off
    strangers = ["The capital city of France is", "Translate to French: good morning", "hello"]
    assert router.route(model, tokenizer, strangers) == [None] * 3
    ungated = NearestTaskRouter.fit(
        model, tokenizer, {"antonym": antonym[:8], "upper": upper[:8]}, margin=None
    )
    assert None not in ungated.route(model, tokenizer, strangers)
    with pytest.raises(InvalidInputError, match="at least two prompts per task"):
        NearestTaskRouter.fit(model, tokenizer, {"antonym": antonym[:1], "upper": upper[:8]})
    with pytest.raises(InvalidInputError, match="margin must be > 0"):
        NearestTaskRouter.fit(model, tokenizer, {"antonym": antonym[:8], "upper": upper[:8]}, margin=0)
    fixed = NearestTaskRouter.fit(model, tokenizer, {"antonym": antonym[:8], "upper": upper[:8]}, layer=0)
    assert fixed.layer == 0
    with pytest.raises(InvalidInputError, match="at least two tasks"):
        NearestTaskRouter.fit(model, tokenizer, {"antonym": antonym})


def _first_tokens(model, tokenizer, prompts, iv=None, strength=None):
    """Greedy decoding's first answer token of each prompt (one prompt at a time)."""
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            if iv is None:
                logits = model(**ids).logits
            else:
                with iv.apply(model, strength=strength):
                    logits = model(**ids).logits
        out.append(int(logits[0, -1].argmax()))
    return out


def test_teacher_forced_repair_is_greedy_decoding_with_the_iv(iv, tokenizer):
    """exact_match puts each row's IV at its last prompt token of the teacher-forced sequence:
    the first answer token it predicts is the one greedy decoding gives with the IV on the
    prompt; and a strength is chosen where the IV helps, 0 where nothing does."""
    from ivtrainer.evaluation.predictions import target_predictions
    from ivtrainer.steering.repair import choose_strengths, exact_match

    model = tiny_model("llama").eval()
    words = [
        "hot",
        "up",
        "big",
        "cat",
        "dog",
        "sun",
        "red",
        "old",
        "new",
        "low",
        "wet",
        "fat",
        "top",
        "end",
        "day",
        "way",
        "car",
        "bus",
        "map",
        "pen",
    ]
    prompts = [f"Q: {w}\nA:" for w in words]
    steered = _first_tokens(model, tokenizer, prompts, iv, strength=8 * iv.strength)
    assert steered != _first_tokens(model, tokenizer, prompts)  # the IV moves some answers
    repair = TaskVectors({"antonym": iv}, {"antonym": 8.0})
    tasks = ["antonym"] * len(prompts)
    with_iv = target_predictions(
        model, tokenizer, prompts, ["x"] * len(prompts),
        intervene=lambda batch, mask: repair.apply(model, [tasks[i] for i in batch], positions=mask),
    )  # fmt: skip
    assert [pred[0] for pred, _ in with_iv] == steered
    # a task the IV makes right: every answer is " is" (one token), and an IV that points the last layer's
    # output at that token
    token = tokenizer(f"{prompts[0]} is")["input_ids"][-1]
    rows = [{"prompt": p, "output": "is"} for p in prompts]
    assert all(tokenizer(f"{p} is")["input_ids"] == [*tokenizer(p)["input_ids"], token] for p in prompts)
    direction = model.lm_head.weight[token].detach()
    towards = dataclasses.replace(iv, vector=direction / direction.norm(), edit_layer=2, strength=1.0)
    repair = TaskVectors({"say-is": towards}, {"say-is": 5.0})
    assert all(exact_match(model, tokenizer, rows, repair=repair, tasks=["say-is"] * len(rows)))
    assert not any(exact_match(model, tokenizer, rows))
    # a wrong route: the rows get another task's IV (pointing at another token) and lose the answer
    other = tokenizer(f"{prompts[0]} of")["input_ids"][-1]
    away = dataclasses.replace(
        towards, vector=model.lm_head.weight[other].detach() / model.lm_head.weight[other].norm()
    )
    both = TaskVectors({"say-is": towards, "say-of": away}, {"say-is": 5.0, "say-of": 5.0})
    assert not any(exact_match(model, tokenizer, rows, repair=both, tasks=["say-of"] * len(rows)))
    assert all(exact_match(model, tokenizer, rows, repair=both, tasks=["say-is"] * len(rows)))
    tried = choose_strengths(model, tokenizer, repair, {"say-is": rows}, grid=[0.0, 5.0])
    assert repair.strengths["say-is"] == 5.0 and tried["say-is"] == {0.0: 0.0, 5.0: 1.0}
    hopeless = [{"prompt": r["prompt"], "output": "zzzz zzzz"} for r in rows]
    choose_strengths(model, tokenizer, repair, {"say-is": hopeless}, grid=[0.0, 5.0])
    assert repair.strengths["say-is"] == 0.0  # a tie at 0 accuracy: no repair


def test_iv_repair_saved_loaded_and_routed_around_generate(iv, tokenizer, tmp_path, caplog):
    """IVRepair round-trips through its folder; routed around generate it gives, row by row, what
    naming each row's task gives; a forced wrong route changes the answers; bad folders are
    refused with what to give instead."""
    from ivtrainer.steering.repair import IVRepair

    model = tiny_model("llama", seed=1).eval()
    words = ["hot", "up", "big", "cat", "dog", "sun", "red", "old", "new", "low", "wet", "fat"]
    antonym, upper = [f"Q: {w}\nA:" for w in words], [f"Uppercase the word {w} ->" for w in words]
    other = dataclasses.replace(iv, vector=-4 * iv.vector, task="upper")
    router = NearestTaskRouter.fit(model, tokenizer, {"antonym": antonym[:8], "upper": upper[:8]})
    repair = IVRepair(TaskVectors({"antonym": iv, "upper": other}, {"antonym": 4.0, "upper": 2.0}), router)
    saved = repair.save_pretrained(tmp_path / "repair")
    loaded = IVRepair.from_pretrained(saved)
    assert loaded.vectors.strengths == {"antonym": 4.0, "upper": 2.0} and loaded.router.layer == router.layer
    torch.testing.assert_close(loaded.router.centroids, router.centroids)
    torch.testing.assert_close(loaded.router.radii, router.radii)
    assert loaded.router.margin == router.margin

    prompts = antonym[8:10] + upper[8:10]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")

    def generate(**kw):
        with loaded.apply(model, tokenizer, prompts, **kw) as tasks:
            return tasks, model.generate(**batch, max_new_tokens=3, do_sample=False)

    tasks, routed = generate()
    assert tasks == ["antonym", "antonym", "upper", "upper"]
    with loaded.apply(model, tokenizer, ["The capital city of France is"]) as none:
        assert none == [None]  # no known task: no IV
    torch.testing.assert_close(routed, generate(tasks=tasks)[1])
    assert not torch.equal(routed, generate(tasks=["upper", "upper", "antonym", "antonym"])[1])
    assert not torch.equal(routed, model.generate(**batch, max_new_tokens=3, do_sample=False))

    no_router = IVRepair(TaskVectors({"antonym": iv}))
    with pytest.raises(InvalidInputError, match="no router"), no_router.apply(model, tokenizer, prompts):
        pass
    with pytest.raises(InvalidInputError, match="must match"):
        IVRepair(TaskVectors({"antonym": iv}), router)
    (tmp_path / "file").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(saved)
    assert IVRepair.from_pretrained(link).vectors.strengths == loaded.vectors.strengths
    for bad in (tmp_path, tmp_path / "file", tmp_path / "missing", saved / "task_0"):
        with pytest.raises(InvalidInputError, match="holds no IV repair"):
            IVRepair.from_pretrained(bad)
    # a repair saved before the gate: loads, warns, and routes every prompt to a task
    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(saved, old)
    tensors = load_file(str(old / "router.safetensors"))
    save_file({k: tensors[k] for k in ("centroids", "mean")}, str(old / "router.safetensors"))
    config = json.loads((old / "repair.json").read_text())
    del config["router"]["margin"]
    (old / "repair.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="ivtrainer.steering.repair"):
        legacy = IVRepair.from_pretrained(old)
    assert "saved before prompts of no known task" in caplog.text
    assert legacy.router.route(model, tokenizer, ["The capital city of France is"]) != [None]
    (saved / "repair.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="not a whole IV repair"):
        IVRepair.from_pretrained(saved)
