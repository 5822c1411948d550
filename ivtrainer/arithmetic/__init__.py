"""Parameter arithmetic: subtracting LoRA adapters and full fine-tuning deltas (streamed over safetensors)."""
