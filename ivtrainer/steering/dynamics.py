"""IV dynamics (Jiang et al. 2024's diagnostic): what fine-tuning did to a task's instruction vector.

:func:`analyze_iv` re-extracts the IV on a fine-tuned model with the original's settings and
compares the two (cosine similarity, head overlap, the CIE table difference), and measures on
held-out prompts how close the edit layer's hidden state stays to the IV, next to the task's
accuracy, for the fine-tuned model and (optionally) the original.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ivtrainer.datasets.tasks import list_tasks, load_examples, load_task
from ivtrainer.errors import InvalidInputError
from ivtrainer.modeling.architectures import get_layout
from ivtrainer.modeling.hooks import hooks
from ivtrainer.steering.extraction import extract_instruction_vector
from ivtrainer.steering.icl import EncodedPrompt, PromptBuilder, first_token_accuracy, last_token_forward
from ivtrainer.steering.instruction_vector import InstructionVector

__all__ = ["IVDynamics", "analyze_iv", "hidden_state_similarity"]


@dataclasses.dataclass
class IVDynamics:
    """The comparison; ``to_dict`` is what ``ivtrainer analyze`` writes as ``analysis.json``."""

    task: str | None
    cosine: float  # between the original IV and the one re-extracted on the fine-tuned model
    head_overlap: float  # shared top heads / number of heads
    shared_heads: list[tuple[int, int]]
    cie_change: torch.Tensor  # (n_layers, n_heads): re-extracted CIE minus original CIE
    evaluation: dict[str, dict[str, float]]  # model -> {hidden_iv_cosine, accuracy_0shot, accuracy_nshot}
    n_prompts: int
    reextracted: InstructionVector

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "iv_cosine": self.cosine,
            "head_overlap": self.head_overlap,
            "shared_heads": [list(h) for h in self.shared_heads],
            "cie_change_abs_mean": float(self.cie_change.abs().mean()),
            "cie_change_max_drop": float(self.cie_change.min()),
            "held_out_prompts": self.n_prompts,
            "evaluation": self.evaluation,
        }


@torch.no_grad()
def hidden_state_similarity(
    model: nn.Module, iv: InstructionVector, prompts: list[EncodedPrompt], *, batch_size: int = 16
) -> float:
    """Mean cosine similarity between the edit layer's output hidden state at each prompt's last
    token and the IV."""
    layout = get_layout(model)
    captured: list[torch.Tensor] = []
    where: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(
            hidden[torch.arange(hidden.shape[0], device=hidden.device), where["last"]].float().cpu()
        )

    with hooks(layout.layers[iv.edit_layer].register_forward_hook(hook)):
        last_token_forward(
            model, prompts, batch_size=batch_size, on_batch=lambda last: where.update(last=last)
        )
    states = torch.cat(captured)
    return float(torch.nn.functional.cosine_similarity(states, iv.vector.float()[None], dim=-1).mean())


def analyze_iv(
    model: nn.Module,
    tokenizer,
    iv: InstructionVector,
    *,
    examples=None,
    base_model: nn.Module | None = None,
    n_prompts: int = 50,
    progress: bool = True,
) -> IVDynamics:
    """Re-extract ``iv``'s task on the fine-tuned ``model`` and compare (see the module doc).

    ``examples`` defaults to the IV's built-in task: its extraction split for re-extraction, its
    held-out split for the hidden-state similarity and the accuracies (zero-shot and with the
    IV's ``n_shots`` demonstrations).
    """
    iv.check_compatible(model)
    if base_model is not None:
        iv.check_compatible(base_model)
    if examples is None and iv.task not in list_tasks():
        raise InvalidInputError(
            f"the IV's task {iv.task!r} is not a built-in task: pass examples= (the task's {{input, output}} pairs)"
        )
    settings = iv.settings
    if examples is None:
        task = str(iv.task)  # a built-in task: checked above
        extraction, held_out = load_task(task), load_task(task, "held_out")
    else:
        data = load_examples(examples)
        cut = (2 * len(data)) // 3
        extraction, held_out = data[:cut], data[cut:]
    edit_layer = settings.get("edit_layer")
    new = extract_instruction_vector(
        model,
        tokenizer,
        extraction,
        n_heads=len(iv.heads),
        n_shots=settings.get("n_shots", 10),
        n_mean_prompts=settings.get("n_mean_prompts", 100),
        n_cie_prompts=settings.get("n_cie_prompts", 25),
        method=settings.get("method", "exact"),
        edit_layer=iv.edit_layer if edit_layer in (None, "auto") else edit_layer,
        calibrate=False,  # the original's layer, heads and strength: only the model changed
        strength=iv.strength,
        chat_template=settings.get("chat_template", False),
        seed=settings.get("seed", 0),
        progress=progress,
    )
    new.task = iv.task
    shared = sorted(set(iv.heads) & set(new.heads))
    builder = PromptBuilder(tokenizer, chat_template=settings.get("chat_template", False))
    rng = random.Random(0)
    queries = rng.sample(held_out, min(n_prompts, len(held_out)))
    zero_shot = [builder.encode([], q) for q in queries]
    n_shots = min(settings.get("n_shots", 10), len(extraction))
    few_shot = builder.sample(extraction, len(queries), n_shots, rng, queries=queries)
    evaluation = {}
    for name, m in (("fine_tuned", model), ("original", base_model)):
        if m is None:
            continue
        evaluation[name] = {
            "hidden_iv_cosine": hidden_state_similarity(m, iv, zero_shot),
            "accuracy_0shot": first_token_accuracy(m, zero_shot),
            f"accuracy_{n_shots}shot": first_token_accuracy(m, few_shot),
        }
    return IVDynamics(
        task=iv.task,
        cosine=float(torch.nn.functional.cosine_similarity(iv.vector.float(), new.vector.float(), dim=0)),
        head_overlap=len(shared) / len(iv.heads),
        shared_heads=shared,
        cie_change=new.cie - iv.cie,
        evaluation=evaluation,
        n_prompts=len(queries),
        reextracted=new,
    )


def save_analysis(
    result: IVDynamics, out: str | os.PathLike, *, plot: bool = True, overwrite: bool = False
) -> Path:
    """``analysis.json``, the re-extracted IV (``reextracted_iv/``) and ``cie_change.png``, in a
    folder that follows :func:`ivtrainer.utils.outputs.check_output_dir`."""
    from ivtrainer.utils.outputs import atomic_dir, check_output_dir

    out = check_output_dir(out, overwrite=overwrite, flag="out", overwrite_flag="overwrite=True")
    with atomic_dir(out, marker={"command": "analyze"}) as tmp:
        (tmp / "analysis.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        result.reextracted.save_pretrained(tmp / "reextracted_iv")
        if plot:
            from ivtrainer.evaluation.plotting import plot_cie

            plot_cie(
                result.cie_change,
                tmp / "cie_change.png",
                heads=result.reextracted.heads,
                title="CIE after fine-tuning minus before (outlined: heads now chosen)",
            )
    return out
