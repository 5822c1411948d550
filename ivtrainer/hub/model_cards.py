"""Model cards for models trained or edited with ivtrainer, built with ``huggingface_hub.ModelCard``.

A card says what was done (method, paper, parameters), to which base model, on which data, and
what was measured, and nothing it does not know: metrics appear only when given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ivtrainer.errors import InvalidInputError

__all__ = ["METHODS", "adapter_description", "edited_model_card", "write_trainer_card"]

METHODS = {
    "iv-guided": (
        "IV-guided training",
        "Jiang et al., *Interpretable Catastrophic Forgetting of Large Language Model Fine-tuning via "
        "Instruction Vector* (arXiv:2406.12227)",
        "Fine-tuned with instruction-vector guidance: the instruction vectors below were added to the model "
        "with an annealed strength, and a KL term kept its outputs close to the original model with the "
        "vectors added, to reduce forgetting of what the model could do before.",
    ),
    "f-learning": (
        "F-Learning (forgetting before learning)",
        "Ni et al., *Forgetting before Learning: Utilizing Parametric Arithmetic for Knowledge Updating in "
        "Large Language Models* (ACL 2024, arXiv:2311.08011)",
        "Knowledge updated by F-Learning: lambda times the parameter delta of a fine-tuning on the old "
        "knowledge was subtracted from the base model, which was then fine-tuned on the new knowledge.",
    ),
    "forget": (
        "forgetting by parameter subtraction",
        "Ni et al., *Forgetting before Learning* (ACL 2024, arXiv:2311.08011), first step",
        "The base model minus lambda times a parameter delta (a LoRA adapter's update or a full fine-tune "
        "minus its base); no further training.",
    ),
}


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return f"`{value}`" if isinstance(value, str) else str(value)


def edited_model_card(
    method: str,
    *,
    base_model: str | None,
    parameters: Mapping[str, Any],
    datasets: Sequence[str] = (),
    metrics: Mapping[str, float] | None = None,
    base_model_note: str | None = None,
    sections: Mapping[str, str] | None = None,
):
    """A ``huggingface_hub.ModelCard`` for a model made by ``method`` (a key of :data:`METHODS`).

    ``base_model`` goes into the card metadata when it looks like a Hub id; ``parameters`` are
    listed as given; ``metrics`` (e.g. the last training log) only when given; ``sections`` adds
    titled Markdown blocks (e.g. the instruction vectors' heads).
    """
    from huggingface_hub import ModelCard, ModelCardData

    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; one of {sorted(METHODS)}")
    title, paper, summary = METHODS[method]
    hub_id = base_model if base_model and "/" in base_model and not Path(base_model).exists() else None
    data = ModelCardData(
        library_name="transformers",
        base_model=hub_id,
        datasets=[d for d in datasets if "/" in d] or None,
        tags=["ivtrainer", method],
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {title}: {base_model or 'a base model'}",
        "",
        summary,
        "",
        f"- Method: {paper}",
        f"- Base model: `{base_model}`" + (f" ({base_model_note})" if base_model_note else "")
        if base_model
        else "- Base model: not recorded",
    ]
    if datasets:
        lines.append("- Data: " + ", ".join(f"`{d}`" for d in datasets))
    lines += ["- Made with ivtrainer (Hugging Face Trainer extensions)", ""]
    lines += ["## Parameters", "", "| parameter | value |", "| --- | --- |"]
    lines += [f"| {k} | {_value(v)} |" for k, v in parameters.items()]
    lines += ["", "## Results", ""]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_value(v)} |" for k, v in metrics.items()]
    else:
        lines.append("No evaluation was recorded with this model; measure it on your own data before use.")
    for heading, body in (sections or {}).items():
        lines += ["", f"## {heading}", "", body.strip()]
    return ModelCard("\n".join(lines) + "\n")


def adapter_description(model) -> str:
    """What a trainer trained: a LoRA adapter's settings, or all weights."""
    config = getattr(model, "peft_config", None)
    if config:
        cfg = next(iter(config.values()))
        return f"LoRA r={cfg.r}, alpha={cfg.lora_alpha} on {sorted(cfg.target_modules or [])}"
    return "all weights (full fine-tuning)"


def _last_training_log(history: list[dict]) -> dict[str, float]:
    """The last logged training values (loss, ce, kl, ...), as measured during training."""
    keep = ("loss", "ce", "kl", "head_mse", "train_loss")
    out: dict[str, float] = {}
    for entry in history:
        out.update(
            {f"{k} (last logged)" if k != "train_loss" else k: v for k, v in entry.items() if k in keep}
        )
    return out


def write_trainer_card(
    trainer,
    method: str,
    parameters: Mapping[str, Any],
    dataset_name: str | None = None,
    sections: Mapping[str, str] | None = None,
) -> None:
    """``trainer.create_model_card`` for ivtrainer's trainers: ``README.md`` in ``output_dir`` with
    the base model, ``parameters``, the last training log and ``sections``; main process only."""
    if not trainer.is_world_process_zero():
        return
    from ivtrainer.modeling.loading import model_source

    source = model_source(trainer.model)
    card = edited_model_card(
        method,
        base_model=source["name"],
        base_model_note=source["note"],
        parameters=parameters,
        datasets=[dataset_name] if dataset_name else [],
        metrics=_last_training_log(trainer.state.log_history),
        sections=sections,
    )
    card.save(Path(trainer.args.output_dir) / "README.md")
