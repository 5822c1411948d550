"""Cost of forgetting by subtraction on SmolLM2-135M: LoRA subtraction time, task-vector peak memory.

    python benchmarks/parameter_arithmetic.py [--runs 5]

1. ``subtract_adapter`` with a rank-8 LoRA on all attention and MLP projections (random B, as
   after training): wall time of the call, model already loaded; median of ``--runs``.
2. ``subtract_task_vector`` vs the naive route (load base and fine-tuned models, compute, save),
   each in a fresh process: peak RSS minus the RSS of a process that only imports the same
   modules, compared with the largest weight shard.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_BASELINE = "import torch, transformers, ivtrainer.arithmetic; from transformers import AutoModelForCausalLM"
_STREAMED = _BASELINE + "; ivtrainer.arithmetic.subtract_task_vector({base!r}, {tuned!r}, 0.5, {out!r})"
_NAIVE = (
    _BASELINE
    + """
import torch
base = AutoModelForCausalLM.from_pretrained({base!r}); tuned = AutoModelForCausalLM.from_pretrained({tuned!r})
with torch.no_grad():
    for (n, p), q in zip(base.named_parameters(), tuned.parameters()):
        p.sub_(0.5 * (q - p))
base.save_pretrained({out!r})
"""
)


def _peak_rss_mb(code: str) -> float:
    """Peak resident memory of a fresh Python process running ``code``.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child started by this
    (large) process would report this process's peak; VmHWM belongs to the new address space.
    """
    probe = f"{code}\nprint([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # KiB -> MiB


def lora_timing(runs: int) -> list[float]:
    from peft import LoraConfig, get_peft_model

    from ivtrainer.arithmetic import subtract_adapter
    from ivtrainer.modeling.loading import load_default_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_default_model()
        adapter = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        with torch.no_grad():
            for name, param in adapter.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.01)
        adapter.save_pretrained(tmp)
        times = []
        for _ in range(runs):
            model, _ = load_default_model()
            start = time.perf_counter()
            subtract_adapter(model, tmp, 0.3)
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    times = lora_timing(args.runs)
    print(f"subtract_adapter, rank-8 LoRA on 7 projections x 30 layers: median {statistics.median(times):.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)})")  # fmt: skip

    from ivtrainer.modeling.loading import default_model_path, load_default_model

    base = default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_default_model()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 1e-3)
        model.save_pretrained(Path(tmp) / "tuned")
        del model
        shard_mb = max(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
        baseline = _peak_rss_mb(_BASELINE)
        kw = {"base": str(base), "tuned": str(Path(tmp) / "tuned")}
        streamed = _peak_rss_mb(_STREAMED.format(**kw, out=str(Path(tmp) / "out1"))) - baseline
        naive = _peak_rss_mb(_NAIVE.format(**kw, out=str(Path(tmp) / "out2"))) - baseline
    print(f"largest shard {shard_mb:.0f} MiB; import-only process {baseline:.0f} MiB")
    print(
        f"subtract_task_vector peak RSS above that: {streamed:.0f} MiB = {streamed / shard_mb:.2f} x the shard"
    )
    print(f"naive route (load both, compute, save):    {naive:.0f} MiB = {naive / shard_mb:.2f} x the shard")


if __name__ == "__main__":
    main()
