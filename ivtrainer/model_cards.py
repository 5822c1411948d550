"""Model cards for models trained or edited with ivtrainer, built with ``huggingface_hub.ModelCard``.

A card says what was done (method, paper, parameters), to which base model, on which data, and
what was measured, and nothing it does not know: metrics appear only when given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["METHODS", "edited_model_card"]

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
        raise ValueError(f"unknown method {method!r}; one of {sorted(METHODS)}")
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
