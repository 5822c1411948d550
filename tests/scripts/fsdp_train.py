"""IVKLCallback with the precomputed teacher on a model sharded by torch's FSDP2 (``fully_shard``),
on one process or under ``torchrun`` (CPU processes, gloo):

    python tests/scripts/fsdp_train.py --model M --iv IV --batch 4 --out OUT
    torchrun --nproc_per_node 2 tests/scripts/fsdp_train.py --model M --iv IV --batch 2 --out OUT

accelerate (and with it the Trainer) enables FSDP only on accelerators, so on CPU the training
loop is written out here the way the Trainer runs it: the callback's ``on_init_end`` before the
model is wrapped, ``on_train_begin`` after, the loss normalised by the global token count and
multiplied by the world size (FSDP averages gradients over processes). ``--batch`` is per
process, so both runs above see the same global batches. The main process writes
``OUT/losses.json``: the summed loss of every step, and what served as the teacher.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a saved tiny model")
    parser.add_argument("--iv", required=True, help="an instruction-vector folder")
    parser.add_argument("--batch", type=int, required=True, help="per-process batch size")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--teacher", default="precomputed", choices=["precomputed", "auto"])
    parser.add_argument("--top-k", type=int, default=0, help="0: stored hidden states, the LM head a DTensor")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

    from ivtrainer import InstructionVector
    from ivtrainer.callbacks import IVKLCallback
    from ivtrainer.datasets.edits import edit_dataset
    from ivtrainer.iv_guided.kl_loss import KLTerm
    from ivtrainer.testing import tiny_edits, tiny_tokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    data = edit_dataset(tiny_edits(16), tok, "new")
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    training = TrainingArguments(
        output_dir=str(args.out / "run"), per_device_train_batch_size=args.batch, report_to="none", use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    if world > 1:
        os.environ["ACCELERATE_USE_FSDP"] = (
            "true"  # what `accelerate launch --use_fsdp` sets: the callback sees FSDP
        )
    model = AutoModelForCausalLM.from_pretrained(args.model)
    callback = IVKLCallback(
        InstructionVector.from_pretrained(args.iv),
        terms=[KLTerm("last_prompt", 20.0), KLTerm("all", 1.0)], teacher_strength=2.0, head_mse_weight=0.5,
        head_mse_reference="without_iv", teacher=args.teacher, teacher_top_k=args.top_k,
    )  # fmt: skip
    state, control = TrainerState(max_steps=args.steps), TrainerControl()
    callback.on_init_end(training, state, control, model=model)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    # global batches: rows [4s, 4s + 4) at step s; each process takes its slice of them
    rows = [[data[4 * s + rank * args.batch + i] for i in range(args.batch)] for s in range(args.steps)]
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, collate_fn=collator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    callback.on_train_begin(training, state, control, model=model, train_dataloader=loader)
    losses = []
    for step in range(args.steps):
        batch = collator(rows[step])
        items = (batch["labels"][:, 1:] != -100).sum()
        if world > 1:
            dist.all_reduce(items)
        callback.on_step_begin(training, state, control)
        loss = model(**batch, num_items_in_batch=items).loss
        (loss * world).backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total))
        state.global_step += 1
        callback.on_step_end(training, state, control)
    callback.on_train_end(training, state, control)
    if rank == 0:
        teacher = (
            "stored"
            if callback.guidance.store is not None
            else "reference"
            if callback.reference is not None
            else "self"
        )
        (args.out / "losses.json").write_text(json.dumps({"loss": losses, "teacher": teacher}))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
