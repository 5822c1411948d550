"""How close the precomputed teacher's top-k KL is to the live teacher's, on real batches.

    python benchmarks/top_k_teacher.py [--k 8 16 64 256] [--batches 8] [--write-readme]

SmolLM2-135M-Instruct and the forgetting benchmark's new task (its training rows, 8 per batch);
the teacher is the model with the task's own IV added at the last prompt token (the forgetting
benchmark's own-IV setting), the student the model before training (as at step 0) and the model
after 16 plain LoRA steps on the task (a student that has moved). At every position the KL covers
(``all``, ``answer``), the default direction and temperature (reverse, T = 2): the KL with the top-k
teacher against the exact one, and the gradient with respect to the student's logits (all that
differs; the rest of backpropagation is the same linear map): cosine and relative error. The last
prompt token is not in the table: its whole distribution is stored.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from ivtrainer import InstructionVector, load_default_model
from ivtrainer.evaluation.forgetting import new_task_dataset, new_task_words
from ivtrainer.iv_guided.kl_loss import SparseTeacher, kl_positions, kl_term
from ivtrainer.steering.intervention import add_to_residual, last_prompt_positions

sys.path.insert(0, str(Path(__file__).parent))
from forgetting import own_iv  # the benchmark's own-task IV (cached)

T = 2.0


def sparse(teacher_logits: torch.Tensor, mask: torch.Tensor, k: int) -> SparseTeacher:
    log_probs = F.log_softmax(teacher_logits.float() / T, dim=-1).reshape(-1, teacher_logits.shape[-1])
    where = mask.reshape(-1).nonzero().squeeze(1)
    values, indices = log_probs[where].topk(k, dim=-1)
    tail = torch.logsumexp(log_probs[where].scatter(-1, indices, -math.inf), dim=-1)
    empty = where[:0]
    return SparseTeacher(T, empty, log_probs[empty], where, values, indices, tail)


def compare(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, k: int) -> dict:
    exact_in = student_logits.detach().clone().requires_grad_(True)
    exact = kl_term(exact_in, teacher_logits, mask, temperature=T)
    (exact_grad,) = torch.autograd.grad(exact, exact_in)
    top_in = student_logits.detach().clone().requires_grad_(True)
    approx = kl_term(top_in, sparse(teacher_logits, mask, k), mask, temperature=T)
    (top_grad,) = torch.autograd.grad(approx, top_in)
    a, b = exact_grad.flatten(), top_grad.flatten()
    return {
        "value_ratio": float(approx / exact),
        "grad_cosine": float(F.cosine_similarity(a, b, dim=0)),
        "grad_rel_error": float((a - b).norm() / a.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[8, 16, 64, 256])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write-readme", action="store_true")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    model, tok = load_default_model()
    train_words = new_task_words()[0]
    iv: InstructionVector = own_iv(model, tok, train_words)
    data = new_task_dataset(train_words, tok)
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    batches = [collator([data[i] for i in range(8 * b, 8 * b + 8)]) for b in range(args.batches)]

    def logits(m, batch, with_iv: bool) -> torch.Tensor:
        prompt_end = last_prompt_positions(batch["labels"])
        pairs = [(iv.edit_layer, iv.strength * iv.vector)]
        with (
            torch.no_grad(),
            add_to_residual(m, pairs, strength=1.0, positions=prompt_end) if with_iv else _null(),
        ):
            return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    teachers = [logits(model, b, True) for b in batches]
    students = {"before training": [logits(model, b, False) for b in batches]}
    students["after 16 LoRA steps"] = [logits(_trained(model, tok, data), b, False) for b in batches]
    results: dict = {}
    for student, student_logits in students.items():
        for positions in ("all", "answer"):
            for k in args.k:
                rows = [
                    compare(s, t, kl_positions(positions, b["labels"], b["attention_mask"]), k)  # type: ignore[arg-type]
                    for s, t, b in zip(student_logits, teachers, batches, strict=True)
                ]
                r = {key: statistics.mean(row[key] for row in rows) for key in rows[0]}
                results[f"{student}|{positions}|{k}"] = r
                print(f"{student}, KL at {positions}, k={k}: {json.dumps(r)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    table = format_table(results, args)
    print(table)
    if args.write_readme:
        from _readme import replace_block

        replace_block("top-k-teacher", table)


def _null():
    import contextlib

    return contextlib.nullcontext()


def _trained(model, tok, data):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))
    training = TrainingArguments(
        tempfile.mkdtemp(), per_device_train_batch_size=8, max_steps=16, learning_rate=5e-4, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    Trainer(
        peft, training, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tok, padding=True)
    ).train()
    return peft.merge_and_unload().eval()


def format_table(results: dict, args) -> str:
    lines = [
        "| student | KL at | k | KL, top-k / exact | gradient cosine | gradient relative error |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, r in results.items():
        student, positions, k = key.split("|")
        lines.append(
            f"| {student} | {positions} | {k} | {r['value_ratio']:.3f} | {r['grad_cosine']:.4f} | "
            f"{r['grad_rel_error']:.3f} |"
        )
    lines.append(
        f"\n`python benchmarks/top_k_teacher.py --k {' '.join(map(str, args.k))} --batches {args.batches} "
        f"--write-readme`: SmolLM2-135M-Instruct, {args.batches} batches of 8 rows of the forgetting benchmark's "
        "new task; teacher = the model with the task's own IV; reverse KL at T = 2; means over batches."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
