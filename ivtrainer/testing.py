"""Tiny random models and an offline tokenizer, for tests, examples and multi-process checks.

Every model here is built from a config in code (no download) and runs a forward pass in
milliseconds on a CPU. The tokenizer is a byte-level BPE trained in memory on a small corpus.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch

from ivtrainer.errors import InvalidInputError

__all__ = [
    "TINY_ARCHITECTURES",
    "intercept_hub_upload",
    "peft_subtraction",
    "tiny_config",
    "tiny_edits",
    "tiny_model",
    "tiny_tokenizer",
]

_WIDTH = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 128}

_CORPUS = [
    "Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA: small",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "walk walked run ran go went see saw cat cats dog dogs box boxes",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z 0 1 2 3 4 5 6 7 8 9",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>",
]

_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Families with a tiny config below: model_type -> extra config fields.
TINY_ARCHITECTURES: dict[str, dict] = {
    "llama": {"num_key_value_heads": 2},
    "mistral": {"num_key_value_heads": 2, "sliding_window": None},
    "qwen2": {"num_key_value_heads": 2},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 16},
    "gemma": {"num_key_value_heads": 1, "head_dim": 32},  # head_dim != hidden / heads, as in Gemma
    "gemma2": {"num_key_value_heads": 2, "head_dim": 24, "sliding_window": 8},
    "gemma3_text": {"num_key_value_heads": 2, "head_dim": 24, "sliding_window": 8},
    "phi3": {"num_key_value_heads": 2},
    "gpt2": {"n_positions": 256},
    "gpt_neox": {"rotary_pct": 0.5},
}


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(*, pad_token: bool = True, chat_template: bool = True):
    """A ~320-token byte-level BPE tokenizer (any text encodes), built offline in ~10 ms.

    ``<|endoftext|>`` is bos/eos (and pad unless ``pad_token=False``, to test models without one).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>" if pad_token else None,
    )
    if chat_template:
        tokenizer.chat_template = _CHATML
    return tokenizer


def tiny_config(model_type: str = "llama", vocab_size: int = 320, **overrides):
    """A config of the given family with 3 layers, 4 heads and hidden size 64."""
    from transformers import AutoConfig

    if model_type not in TINY_ARCHITECTURES:
        raise InvalidInputError(
            f"no tiny config for {model_type!r}; choose one of {sorted(TINY_ARCHITECTURES)}"
        )
    # Special ids must lie inside the tiny vocabulary (the families' defaults do not).
    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    fields = {**_WIDTH, **ids, **TINY_ARCHITECTURES[model_type], "vocab_size": vocab_size, **overrides}
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised causal LM of the given family, deterministic for a given seed."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def peft_subtraction(peft_model, lam: float, adapter_name: str = "default"):
    """PEFT's own route to ``W - lam * delta`` (scale the adapter by ``-lam``, then merge): the
    reference that ivtrainer's subtraction is checked against."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(adapter_name, -lam)
    return peft_model.merge_and_unload()


def tiny_edits(n: int = 6) -> list[dict[str, str]]:
    """``n`` made-up edit records in ivtrainer's schema (two relations, alternating)."""
    cities = ["Paris", "Rome", "Madrid", "Berlin", "Lima", "Oslo", "Cairo", "Tokyo"]
    return [
        {
            "prompt": f"The capital of land {i} is",
            "subject": f"land {i}",
            "target_old": cities[i % 8],
            "target_new": cities[(i + 3) % 8],
            "rephrase_prompt": f"Land {i} has its capital in",
            "locality_prompt": f"The river of place {i} is the",
            "locality_ground_truth": "Nile",
            "relation": "capital" if i % 2 else "other",
        }
        for i in range(n)
    ]


@contextlib.contextmanager
def intercept_hub_upload(repo_id: str) -> Iterator[dict]:
    """Stop pushes at ``huggingface_hub.HfApi``'s boundary (``create_repo``, ``upload_folder``).

    Yields a dict that receives what would be sent: ``repo_id``, ``files`` (paths relative to the
    uploaded folder, after the call's ``allow_patterns``/``ignore_patterns`` as the Hub client
    applies them), ``card`` (its README.md, or None), ``texts`` (its top-level JSON files) and
    ``commit_message``; ``create_repo`` is the mock, for call assertions.
    """
    from unittest import mock

    sent: dict = {}

    def upload_folder(
        self,
        *,
        repo_id,
        folder_path,
        commit_message=None,
        allow_patterns=None,
        ignore_patterns=None,
        **kwargs,
    ):
        from huggingface_hub.utils import filter_repo_objects
        from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS  # what upload_folder adds

        root = Path(folder_path)
        card = root / "README.md"
        ignore = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        files = filter_repo_objects(  # what HfApi.upload_folder would send of the folder
            (str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()),
            allow_patterns=allow_patterns,
            ignore_patterns=ignore + list(DEFAULT_IGNORE_PATTERNS),
        )
        sent.update(
            repo_id=repo_id,
            files=set(files),
            card=card.read_text() if card.is_file() else None,
            commit_message=commit_message,
            texts={p.name: p.read_text() for p in root.glob("*.json")},
        )
        return mock.MagicMock(commit_url="https://hub.invalid/commit/1")

    from huggingface_hub import HfApi

    with contextlib.ExitStack() as stack:
        create = stack.enter_context(
            mock.patch("huggingface_hub.HfApi.create_repo", return_value=mock.MagicMock(repo_id=repo_id))
        )
        stack.enter_context(mock.patch("huggingface_hub.HfApi.upload_folder", upload_folder))
        # Module-level `create_repo = api.create_repo` aliases (huggingface_hub's, and the copies
        # transformers 5.0 imported) are methods bound before the patch: bind them again.
        for module in list(sys.modules.values()):
            for name in ("create_repo", "upload_folder"):
                bound = vars(module).get(name) if hasattr(module, "__dict__") else None
                if isinstance(bound, types.MethodType) and isinstance(bound.__self__, HfApi):
                    stack.enter_context(mock.patch.object(module, name, getattr(bound.__self__, name)))
        sent["create_repo"] = create
        yield sent
