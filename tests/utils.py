"""Helpers and sample records shared by several test modules."""

from __future__ import annotations

import copy

import torch
from transformers import DataCollatorForSeq2Seq

from ivtrainer import IVGuidedConfig, IVGuidedTrainer
from ivtrainer.testing import tiny_model

SMALL = {
    "n_heads": 3,
    "n_shots": 2,
    "n_mean_prompts": 6,
    "n_cie_prompts": 2,
    "progress": False,
    "calibrate": False,
}


# The mechanics tests use one KL term at every token and the annealed student IV (every path
# active from step 0, no thresholds), not the default recipe (tested on its own).
ONE_TERM = dict(
    iv_strength_start=1.0, kl_positions="all", kl_weight=1.0, kl_threshold=0.0, head_mse_weight=0.0
)


def guided_config(tmp_path, **kw) -> IVGuidedConfig:
    values = dict(
        **ONE_TERM,
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    return IVGuidedConfig(**(values | kw))


def grads_after_one_step(tmp_path, iv, data, model, **kw):
    """Parameters after one SGD step of lr 1: minus the gradient."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = guided_config(
        tmp_path, optim="sgd", learning_rate=1.0, max_steps=1, lr_scheduler_type="constant", **kw
    )
    trainer = IVGuidedTrainer(
        model,
        config,
        instruction_vectors=iv,
        train_dataset=data.select(range(4)),
        data_collator=collator(),
    )
    trainer.train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if n in before}


def collator():
    from ivtrainer.testing import tiny_tokenizer

    return DataCollatorForSeq2Seq(tiny_tokenizer(), padding=True)


# One record of each public edit format, as published.
COUNTERFACT = {  # EasyEdit's CounterFact split
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "target_new": "English",
    "rephrase_prompt": "Danielle Darrieux, a native speaker of",
    "locality_prompt": "The mother tongue of Léon Blum is",
    "locality_ground_truth": "French",
}

ZSRE = {  # MEND's ZsRE split
    "subject": "Watts Humphrey",
    "src": "What university did Watts Humphrey attend?",
    "answers": ["University of Michigan"],
    "alt": "Illinois Institute of Technology",
    "rephrase": "What university did Watts Humphrey take part in?",
    "loc": "nq question: who played desmond doss father in hacksaw ridge",
    "loc_ans": "Hugo Weaving",
}


# LoRA adapters and fine-tunes to subtract.
TARGETS = {"llama": ["q_proj", "o_proj", "embed_tokens"], "gpt2": ["c_attn", "c_proj"]}


def trained_adapter(model_type, *, seed=0, use_rslora=False, **kwargs):
    """A LoRA adapter with random (non-zero) B, as after training."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[model_type],
        fan_in_fan_out=model_type == "gpt2",
        use_rslora=use_rslora,
        **kwargs,
    )
    peft_model = get_peft_model(tiny_model(model_type), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return peft_model


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetuned_pair(tmp_path, tokenizer, dtype=torch.float32, **save_kwargs):
    base = tiny_model("llama").to(dtype)
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_((torch.randn(param.shape, generator=generator) * 0.05).to(dtype))
    base.save_pretrained(tmp_path / "base", **save_kwargs)
    tokenizer.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned", **save_kwargs)
    return base, tuned


def write_tiny_gguf(path) -> None:
    """A tiny Llama with its tokenizer as a float32 GGUF file, as llama.cpp lays one out (what
    ``load_model("x.gguf")`` reads)."""
    import json

    import gguf

    from ivtrainer.testing import tiny_tokenizer

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    tokens += [f"<unused{i}>" for i in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id or 0)
    writer.add_eos_token_id(tokenizer.eos_token_id or 0)
    writer.add_pad_token_id(tokenizer.pad_token_id or 0)
    parts = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    for name, tensor in model.state_dict().items():
        module, kind = name.rsplit(".", 1)
        if module.startswith("model.layers."):
            _, _, layer, rest = module.split(".", 3)
            gguf_name = f"blk.{layer}.{parts[rest]}.{kind}"
        else:
            gguf_name = f"{top[module]}.{kind}"
        writer.add_tensor(gguf_name, tensor.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
