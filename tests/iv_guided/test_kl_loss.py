"""The KL term: positions, normalisation and the fused gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.kl_loss import kl_positions, kl_term, kl_terms, token_kl


def test_token_kl_matches_torch():
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    ref_reverse = F.kl_div(F.log_softmax(t / 2, -1), F.softmax(s / 2, -1), reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(s, t, "reverse", 2.0), ref_reverse)
    ref_forward = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(s, t, "forward"), ref_forward)
    torch.testing.assert_close(token_kl(s, t, "jsd"), token_kl(t, s, "jsd"))
    assert token_kl(s, s, "reverse").abs().max() < 1e-6
    assert (token_kl(s, t, "jsd") <= math.log(2) + 1e-6).all()


def test_kl_positions_and_normalisation():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 4]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert kl_positions("last_prompt", labels).nonzero().tolist() == [[0, 1], [1, 0]]
    assert kl_positions("answer", labels).nonzero().tolist() == [
        [0, 1],
        [0, 2],
        [1, 0],
        [1, 1],
        [1, 2],
        [1, 3],
    ]
    assert kl_positions("all", labels, attention).sum() == 9
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = kl_positions("answer", labels)
    per = token_kl(s[mask], t[mask])
    torch.testing.assert_close(kl_term(s, t, mask, num_items_in_batch=12), per.sum() / 12)
    torch.testing.assert_close(kl_term(s, t, mask), per.mean())
    assert kl_term(s, t, torch.zeros_like(mask)) is None
    assert kl_term(s, t, mask, threshold=1e9) == 0
    s.requires_grad_()
    (kl_term(s, t, mask, threshold=1e9) + s.sum()).backward()  # below the threshold: no gradient
    assert (s.grad == 1).all()


@pytest.mark.parametrize("direction", ["reverse", "forward", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("selection", ["all", "some"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_fused_kl_gradient_equals_autograd(direction, dtype, selection, overwrite, monkeypatch):
    """kl_term's closed-form, chunked gradient = autograd through token_kl (chunks of 3 positions)."""
    monkeypatch.setattr("ivtrainer.iv_guided.kl_loss._CHUNK_ELEMENTS", {"cpu": 3 * 50})
    torch.manual_seed(0)
    s = (torch.randn(3, 7, 50) * 3).to(dtype).requires_grad_()
    t = (torch.randn(3, 7, 50) * 3).to(dtype)
    mask = torch.ones(3, 7, dtype=torch.bool) if selection == "all" else torch.rand(3, 7) > 0.5
    value = kl_term(
        s,
        t.clone(),
        mask,
        direction=direction,
        temperature=2.0,
        num_items_in_batch=11,
        overwrite_teacher=overwrite,
    )
    (1.7 * value).backward()
    fused = s.grad
    s.grad = None
    reference = token_kl(s[mask], t[mask], direction, 2.0).sum() / 11
    (1.7 * reference).backward()
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(value.float(), reference.float(), **tol)
    torch.testing.assert_close(fused, s.grad, **tol)
    assert fused.dtype == dtype and not fused[~mask].any()


def test_kl_with_teacher_logits_at_some_columns_only():
    """A teacher run with logits_to_keep=columns gives the same KL and gradient."""
    torch.manual_seed(0)
    s, t = torch.randn(3, 7, 11, requires_grad=True), torch.randn(3, 7, 11)
    labels = torch.tensor([[-100] * 4 + [1, 2, 3], [-100] * 2 + [1] * 5, [-100] * 6 + [4]])
    for which in ("answer", "last_prompt"):
        mask = kl_positions(which, labels)
        columns = mask.any(0).nonzero().squeeze(1)
        full = kl_term(s, t, mask, num_items_in_batch=9)
        (full_grad,) = torch.autograd.grad(full, s)
        part = kl_term(s, t[:, columns], mask, num_items_in_batch=9, teacher_columns=columns)
        (part_grad,) = torch.autograd.grad(part, s)
        torch.testing.assert_close(part, full)
        torch.testing.assert_close(part_grad, full_grad)
    with pytest.raises(ValueError, match="teacher_columns must include"):
        kl_term(s, t[:, :1], kl_positions("answer", labels), teacher_columns=torch.tensor([0]))


def test_fused_kl_rejects_a_second_backward():
    s = torch.randn(2, 3, 5, requires_grad=True)
    value = kl_term(s, torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.bool))
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        value.backward()


@pytest.mark.parametrize("items", [None, 13])
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("columns", [False, True])
def test_several_terms_in_one_pass_equal_the_terms_apart(items, overwrite, columns, monkeypatch):
    """kl_terms: the weighted sum of kl_term over overlapping masks (FvForgetting's last prompt
    token is in both terms), a term below its threshold counting for nothing, the same gradient,
    each term's value; a term whose mask is empty is None."""
    monkeypatch.setattr("ivtrainer.iv_guided.kl_loss._CHUNK_ELEMENTS", {"cpu": 3 * 50})
    torch.manual_seed(0)
    labels = torch.tensor([[-100, -100, 5, 6, -100, -100], [-100, 7, 8, 9, 4, 2]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    s = (torch.randn(2, 6, 50) * 3).requires_grad_()
    t = torch.randn(2, 6, 50) * 3
    masks = [kl_positions(w, labels, attention) for w in ("last_prompt", "answer", "all")]
    masks.append(torch.zeros_like(masks[0]))
    weights, thresholds = [20.0, 0.5, 0.1, 3.0], [0.0, 1e9, 0.0, 0.0]  # the answer term below its threshold
    keep = torch.arange(5) if columns else None  # the last column is never selected (padding / no label)
    assert not any(bool(m[:, 5].any()) for m in masks[:2]) and masks[2][:, 5].tolist() == [False, True]
    masks[2][:, 5] = False
    teacher = t[:, keep] if columns else t
    want, want_values = 0.0, []
    for mask, weight, threshold in zip(masks, weights, thresholds, strict=True):
        value = kl_term(
            s, teacher.clone(), mask, num_items_in_batch=items, threshold=threshold, teacher_columns=keep
        )
        want_values.append(value)
        want = want + (weight * value if value is not None else 0.0)
    (want_grad,) = torch.autograd.grad(want, s)
    got, values = kl_terms(
        s, teacher.clone(), masks, weights, num_items_in_batch=items, thresholds=thresholds,
        overwrite_teacher=overwrite, teacher_columns=keep,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)
    assert values[3] is None and float(values[1]) == 0.0
    for value, expected in zip(values[:3], want_values[:3], strict=True):
        torch.testing.assert_close(value, expected.detach())


@pytest.mark.parametrize("direction", ["reverse", "forward", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("selection", ["all", "some"])
def test_the_gradient_through_a_frozen_lm_head_equals_autograd(direction, dtype, selection, monkeypatch):
    """kl_terms with the student's hidden states and its frozen LM head: the value and the hidden
    states' gradient of autograd through ``logits = hidden @ W.T + b``; the logits get none."""
    monkeypatch.setattr("ivtrainer.iv_guided.kl_loss._CHUNK_ELEMENTS", {"cpu": 3 * 50})
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16).to(dtype).requires_grad_()
    weight, bias = torch.randn(50, 16).to(dtype), torch.randn(50).to(dtype)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    t = (torch.randn(3, 7, 50) * 3).to(dtype)
    masks = [torch.ones(3, 7, dtype=torch.bool) if selection == "all" else torch.rand(3, 7) > 0.5]
    masks.append(torch.zeros_like(masks[0]))
    masks[1][0, :2] = True  # overlapping terms, one below its threshold
    args = dict(direction=direction, temperature=2.0, num_items_in_batch=11, thresholds=[0.0, 1e9])
    value, values = kl_terms(
        logits, t.clone(), masks, [1.7, 3.0], **args, student_hidden=hidden, head_weight=weight
    )
    (grad,) = torch.autograd.grad(value, hidden)
    logits = torch.nn.functional.linear(hidden, weight, bias)  # a graph of its own
    reference, reference_values = kl_terms(logits, t.clone(), masks, [1.7, 3.0], **args)
    (want,) = torch.autograd.grad(reference, hidden)
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(grad, want, **tol)
    assert grad.dtype == dtype and not grad[~masks[0]].any() and values[1] == reference_values[1] == 0
    with pytest.raises(InvalidInputError, match="go together"):
        kl_terms(logits, t, masks, [1.0, 1.0], student_hidden=hidden)
