"""Per-GPU memory for a 7B Llama on 1 node x 4 GPUs under each ds_configs/ config.

    python benchmarks/zero_memory.py [--seq 2048] [--micro-batch 1] [--gpu-gib 80] [--no-checkpointing] [--write-readme]

Model states (parameters, gradients, optimizer) come from DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``) for the
parameter count of a Llama-2-7B built on the meta device (no download). On top, per GPU:

- activations of one micro-batch in bf16 with gradient checkpointing: each layer's input kept
  (2 s b h bytes per layer) plus one layer recomputed (34 s b h bytes; SDPA/flash attention, so no
  s^2 attention scores), and the logits (bf16, their float32 copy and its gradient: 10 s b V bytes);
- LoRA (r 8 on q_proj and v_proj): the frozen base in bf16 (replicated under ZeRO-2, sharded under
  ZeRO-3) and the adapter's states from the same estimators;
- IV-guided training: the teacher's logits in bf16 (the KL's gradient is written into them, and
  its float32 work happens in 64 MiB chunks: 4 of them counted) and, for full fine-tuning, the
  frozen reference model in bf16 (a replica under ZeRO-2, a shard under ZeRO-3, as trl prepares it).

"Fits" means at most ``--gpu-gib`` minus 4 GiB (CUDA context, allocator fragmentation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

GIB = 1024**3
GPUS = 4


def llama_7b_params() -> tuple[int, int]:
    """(total, largest tensor) parameter counts of Llama-2-7B, from its config on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    sizes = [p.numel() for p in model.parameters()]
    return sum(sizes), max(sizes)


def lora_params(rank: int = 8, layers: int = 32, hidden: int = 4096) -> int:
    return layers * 2 * rank * (hidden + hidden)  # q_proj and v_proj: A (r x h) + B (h x r)


def model_states(config: str, params: int, largest: int) -> tuple[int, int]:
    """(per-GPU bytes, CPU bytes) of parameters, gradients and optimizer states, full training."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if config == "zero2":
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, GPUS, 1, cpu_offload=False)
        return gpu, cpu
    offload = config == "zero3_offload"
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        params, largest, GPUS, 1, cpu_offload=offload, cpu_offload_params=False
    )
    return gpu, cpu


def estimate(seq: int, micro_batch: int, gpu_gib: float, checkpointing: bool = True) -> dict:
    params, largest = llama_7b_params()
    lora = lora_params()
    hidden, layers, vocab = 4096, 32, 32000
    tokens = seq * micro_batch
    if checkpointing:
        activations = 2 * tokens * hidden * layers + 34 * tokens * hidden + 10 * tokens * vocab
    else:  # every layer's 34 s b h bytes kept for backward
        activations = 34 * tokens * hidden * layers + 10 * tokens * vocab
    teacher_logits = 2 * tokens * vocab + 4 * 64 * 1024**2
    rows = {}
    for config in ("zero2", "zero3", "zero3_offload"):
        states, cpu = model_states(config, params, largest)
        frozen = 2 * params if config == "zero2" else 2 * params // GPUS  # a bf16 copy, replicated or sharded
        lora_states, lora_cpu = model_states(config, lora, lora)
        need = {
            "full FT": states + activations,
            "full FT, IV-guided": states + activations + teacher_logits + frozen,
            "LoRA": frozen + lora_states + activations,
            "LoRA, IV-guided": frozen + lora_states + activations + teacher_logits,
        }
        rows[config] = {"model_states": states, "cpu": cpu, "lora_cpu": lora_cpu, "need": need}
    return {
        "params": params,
        "largest": largest,
        "lora_params": lora,
        "activations": activations,
        "teacher_logits": teacher_logits,
        "budget": (gpu_gib - 4) * GIB,
        "rows": rows,
    }


def format_table(result: dict, args) -> str:
    budget = result["budget"]
    columns = list(next(iter(result["rows"].values()))["need"])
    lines = [
        "| config | model states per GPU (full FT) | CPU (full FT) | " + " | ".join(columns) + " |",
        "|---|---:|---:|" + "---:|" * len(columns),
    ]
    for config, row in result["rows"].items():
        cells = [
            f"{'fits' if v <= budget else 'does not fit'}, {v / GIB:.1f} GiB" for v in row["need"].values()
        ]
        lines.append(
            f"| `{config}` | {row['model_states'] / GIB:.1f} GiB | {row['cpu'] / GIB:.0f} GiB | "
            + " | ".join(cells)
            + " |"
        )
    lines.append(
        f"\n`python benchmarks/zero_memory.py --seq {args.seq} --micro-batch {args.micro_batch} --gpu-gib "
        f"{args.gpu_gib:g}{' --no-checkpointing' if args.no_checkpointing else ''}`: Llama-2-7B ({result['params'] / 1e9:.2f}B parameters), 1 node x 4 GPUs, "
        f"bf16, sequence {args.seq}, micro-batch {args.micro_batch}, "
        f"{'no gradient checkpointing' if args.no_checkpointing else 'gradient checkpointing'} "
        f"(activations {result['activations'] / GIB:.1f} GiB per GPU; IV-guided adds "
        f"{result['teacher_logits'] / GIB:.2f} GiB for the teacher's logits and the KL's work, and full fine-tuning "
        f"the bf16 reference model); LoRA r8 on q_proj, v_proj ({result['lora_params'] / 1e6:.1f}M parameters). "
        f"'Fits' = at most {args.gpu_gib - 4:g} GiB. F-Learning's phases are plain fine-tunings "
        "(full FT or LoRA columns); its subtraction reads the delta from disk one tensor at a time."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--gpu-gib", type=float, default=80)
    parser.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    parser.add_argument(
        "--write-readme", action="store_true", help="the default and a no-checkpointing table"
    )
    args = parser.parse_args()
    table = format_table(estimate(args.seq, args.micro_batch, args.gpu_gib, not args.no_checkpointing), args)
    print(table)
    if args.write_readme:
        sys.path.insert(0, str(Path(__file__).parent))
        from _readme import replace_block

        heavy = argparse.Namespace(**{**vars(args), "micro_batch": 4, "no_checkpointing": True})
        heavy_table = format_table(estimate(args.seq, 4, args.gpu_gib, checkpointing=False), heavy)
        replace_block("zero-memory", table + "\n\n" + heavy_table)


if __name__ == "__main__":
    main()
