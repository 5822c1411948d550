"""One training run for the multi-process tests, the same script on one process or under
``accelerate launch`` (DeepSpeed on CPU processes, gloo):

    python tests/scripts/distributed_train.py --trainer iv-lora --model M --iv IV --batch 4 --out OUT
    accelerate launch --config_file ds_configs/accelerate_zero3.yaml --num_processes 2 \\
        tests/scripts/distributed_train.py --trainer iv-lora --model M --iv IV --batch 2 --out OUT

``--batch`` is per process, so both runs above see the same global batches. The main process
writes ``OUT/losses.json`` (the logged training loss per step) and the trained model (or adapter)
in ``OUT/model``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--trainer", choices=["iv-lora", "iv-full", "f-learning", "f-learning-lora-ft"], required=True
    )
    parser.add_argument("--model", required=True, help="a saved tiny model")
    parser.add_argument("--iv", help="an instruction-vector folder (IV-guided runs)")
    parser.add_argument("--batch", type=int, required=True, help="per-process batch size")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lm-eval", action="store_true", help="an LMEvalCallback every 2 steps")
    parser.add_argument("--teacher", default="live", choices=["live", "precomputed"], help="IV-guided runs")
    parser.add_argument(
        "--top-k", type=int, default=319, help="precomputed: of 320, close to the live teacher"
    )
    args = parser.parse_args()

    from accelerate import PartialState

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # DeepSpeed on CPU processes: gloo, and the Trainer must reuse this state
        PartialState(backend="gloo")

    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from ivtrainer import (
        FLearningConfig,
        FLearningTrainer,
        InstructionVector,
        IVGuidedConfig,
        IVGuidedTrainer,
    )
    from ivtrainer.datasets.edits import edit_dataset
    from ivtrainer.testing import tiny_edits, tiny_tokenizer

    tok = tiny_tokenizer()
    common = dict(
        output_dir=str(args.out / "run"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,  # with accelerate's seedable sampler: the same global batches on one process and on two
        use_cpu=not distributed,
        accelerator_config={"use_configured_state": True} if distributed else None,
    )
    new = edit_dataset(tiny_edits(16), tok, "new")
    collator = DataCollatorForSeq2Seq(tok, padding=True)
    # the arguments first, so that under ZeRO-3 the model is loaded sharded
    if args.trainer.startswith("f-learning"):
        forget = "lora" if args.trainer == "f-learning-lora-ft" else "full"
        config = FLearningConfig(
            **common, old_num_train_epochs=1, old_learning_rate=1e-2, forget_lambda=0.5, forget_method=forget
        )
    else:
        # one KL term at every token, no thresholds (a per-micro-batch threshold would make the sharded
        # run differ from the single process by design), the annealed student IV: every path active
        config = IVGuidedConfig(
            **common, kl_positions="all", kl_weight=2.0, kl_threshold=0.0, head_mse_weight=0.0,
            iv_strength_start=1.0, teacher_iv_strength=2.0, teacher=args.teacher, teacher_top_k=args.top_k,
        )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(args.model)
    if args.trainer.startswith("f-learning"):
        trainer = FLearningTrainer(
            model,
            config,
            train_dataset=new,
            old_dataset=edit_dataset(tiny_edits(16), tok, "old"),
            data_collator=collator,
        )
    else:
        if args.trainer == "iv-lora":
            from peft import LoraConfig, get_peft_model
            from transformers import set_seed

            set_seed(0)  # the adapter's random initialisation, the same on one process and on two
            model = get_peft_model(model, LoraConfig(r=4, init_lora_weights=False, task_type="CAUSAL_LM"))
        trainer = IVGuidedTrainer(
            model,
            config,
            instruction_vectors=InstructionVector.from_pretrained(args.iv),
            train_dataset=new,
            data_collator=collator,
            processing_class=tok if args.lm_eval else None,  # LMEvalCallback needs the tokenizer
        )
    if args.lm_eval:
        from ivtrainer.callbacks import LMEvalCallback

        trainer.add_callback(LMEvalCallback("ivtrainer_icl_antonym", limit=2, every=2, trainer=trainer))
    trainer.train()
    trainer.save_model(str(args.out / "model"))
    if trainer.is_world_process_zero():
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        extra = {k: [log[k] for log in trainer.state.log_history if k in log] for k in ("kl", "ce")}
        (args.out / "losses.json").write_text(
            json.dumps({"loss": losses, **extra, "teacher": _teacher(trainer)})
        )
    # end the process group before the interpreter does: left to exit-time teardown, gloo's
    # threads sometimes abort a process after its work is done ("terminate called without an
    # active exception")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _teacher(trainer) -> str | None:
    from ivtrainer.callbacks import IVKLCallback

    kl = [c for c in trainer.callback_handler.callbacks if isinstance(c, IVKLCallback)]
    if not kl:
        return None
    if kl[0].guidance.store is not None:
        return "stored"
    if kl[0].reference is None:
        return "adapters disabled"
    return "zero3 shard" if any(hasattr(p, "ds_id") for p in kl[0].reference.parameters()) else "full copy"


if __name__ == "__main__":
    main()
