"""Instruction vectors: extraction by causal mediation, the artifact, and steering with it.

An instruction vector (IV) is the sum of the residual-stream contributions of the attention heads
that carry a task (Todd et al., 2024; Jiang et al., 2024): each chosen head's mean last-token
output over clean k-shot prompts, pushed through the attention output projection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ivtrainer.datasets.tasks import load_examples
from ivtrainer.errors import InvalidInputError, IVTrainerError
from ivtrainer.modeling.architectures import ModelLayout, get_layout
from ivtrainer.modeling.hooks import eval_mode
from ivtrainer.modeling.loading import model_source
from ivtrainer.steering.calibration import HEAD_COUNTS, MIN_HITS, MIN_PAIRS, warn_unusual_strength
from ivtrainer.steering.calibration import calibrate as calibrate_vector
from ivtrainer.steering.extraction_config import ExtractionConfig
from ivtrainer.steering.head_set import HeadSet
from ivtrainer.steering.icl import PromptBuilder, check_extraction_sizes, check_prompts_fit
from ivtrainer.steering.intervention import Intervention, Positions, add_to_residual
from ivtrainer.steering.mediation import mean_cie, mean_head_activations
from ivtrainer.steering.vector_evaluation import VectorEvaluation, evaluate_vector
from ivtrainer.utils.checks import finite_number, finite_numbers, finite_tensor

logger = logging.get_logger(__name__)

__all__ = [
    "IncompatibleVectorError",
    "InstructionVector",
    "InvalidVectorError",
    "extract_instruction_vector",
    "head_contributions",
    "load_vectors",
]

FORMAT_VERSION = 1
WEIGHTS_NAME = "instruction_vector.safetensors"
CONFIG_NAME = "instruction_vector.json"


class IncompatibleVectorError(IVTrainerError, ValueError):
    """An instruction vector was applied to a model of another shape."""


class InvalidVectorError(IVTrainerError, ValueError):
    """An instruction vector whose fields do not fit together (a corrupt or hand-edited folder)."""


@dataclasses.dataclass
class InstructionVector:
    """An instruction vector with everything needed to reuse, inspect or reproduce it.

    Attributes:
        vector: ``(hidden_size,)``, added at the output of decoder layer ``edit_layer``.
        heads: the chosen ``(layer, head)`` pairs, best first, with their mean CIE in ``head_scores``.
        cie: the full ``(n_layers, n_heads)`` table of mean causal indirect effects.
        mean_activations: ``(n_layers, n_heads, head_dim)`` mean last-token head outputs (from a
            head set, only the layers of its candidate heads are read: the other rows are zero).
        strength: how strongly :meth:`apply` and the trainers add the vector by default (chosen on
            extraction pairs with ``calibrate=True``; 1 for the papers' fixed choice).
        settings: the extraction arguments; ``metrics``: measurements made during extraction
            (``metrics["calibration"]``: the searched layer x strength x heads grid).
    """

    vector: torch.Tensor
    edit_layer: int
    heads: list[tuple[int, int]]
    head_scores: list[float]
    cie: torch.Tensor
    mean_activations: torch.Tensor
    model_name: str
    model_revision: str | None
    model_type: str
    hidden_size: int
    n_layers: int
    n_heads: int
    head_dim: int
    task: str | None = None
    strength: float = 1.0
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every field checked, so a corrupt or hand-edited vector fails here, with one line."""
        for name in ("hidden_size", "n_layers", "n_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidVectorError(f"{name} must be a positive integer, got {value!r}")
        layer = self.edit_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise InvalidVectorError(f"edit_layer must be an integer in [0, {self.n_layers}), got {layer!r}")
        for name, tensor, shape in (
            ("vector", self.vector, (self.hidden_size,)),
            ("cie", self.cie, (self.n_layers, self.n_heads)),
            ("mean_activations", self.mean_activations, (self.n_layers, self.n_heads, self.head_dim)),
        ):
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise InvalidVectorError(f"{name} must have shape {shape}, got {got}")
            try:
                finite_tensor(name, tensor)
            except InvalidInputError as exc:
                raise InvalidVectorError(str(exc)) from None
        if (
            isinstance(self.strength, bool)
            or not isinstance(self.strength, (int, float))
            or not (0 < self.strength < float("inf"))
        ):
            raise InvalidVectorError(f"strength must be a finite number > 0, got {self.strength!r}")
        self.strength = float(self.strength)
        heads = []
        for head in self.heads:
            pair = tuple(head) if isinstance(head, (list, tuple)) else ()
            if not (
                len(pair) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
                and 0 <= pair[0] < self.n_layers
                and 0 <= pair[1] < self.n_heads
            ):
                raise InvalidVectorError(
                    f"head {head!r} is not a (layer, head) pair of this model ({self.n_layers} x {self.n_heads})"
                )
            heads.append(pair)
        self.heads = heads
        if len(self.head_scores) != len(self.heads):
            raise InvalidVectorError(f"{len(self.head_scores)} head_scores for {len(self.heads)} heads")
        try:
            self.head_scores = finite_numbers("head_scores", self.head_scores)
        except InvalidInputError as exc:
            raise InvalidVectorError(str(exc)) from None

    # -- use -------------------------------------------------------------------------------
    def check_compatible(self, model: nn.Module) -> ModelLayout:
        """The model's layout; raises :class:`IncompatibleVectorError` if the shapes differ."""
        layout = get_layout(model)
        if (layout.hidden_size, layout.n_layers) != (self.hidden_size, self.n_layers):
            raise IncompatibleVectorError(
                f"this instruction vector was extracted on {self.model_name} (hidden size {self.hidden_size}, "
                f"{self.n_layers} layers) and cannot be applied to a model with hidden size "
                f"{layout.hidden_size} and {layout.n_layers} layers; extract one for this model with "
                "ivtrainer.extract_instruction_vector(model, tokenizer, examples)"
            )
        return layout

    @contextlib.contextmanager
    def apply(
        self,
        model: nn.Module,
        strength: float | None = None,
        positions: Positions = "last",
        *,
        layer: int | None = None,
    ) -> Iterator[Intervention]:
        """Add ``strength * vector`` to the edit layer's output while the block runs::

            with iv.apply(model):  # at the vector's own (calibrated) strength
                model.generate(**inputs)

        ``strength``: ``None`` for :attr:`strength`, or an absolute strength.
        ``positions``: ``"last"`` (last non-pad token of each row, left or right padding),
        ``"all"``, or a ``(batch, seq)`` bool mask. ``layer`` overrides ``edit_layer``.
        """
        self.check_compatible(model)
        if strength is not None:
            warn_unusual_strength(abs(finite_number("strength", strength)))
        with add_to_residual(
            model,
            [(self.edit_layer if layer is None else layer, self.vector)],
            strength=self.strength if strength is None else strength,
            positions=positions,
        ) as handle:
            yield handle

    def evaluate(
        self,
        model: nn.Module,
        tokenizer,
        pairs,
        *,
        shots: Sequence[int] = (0, 5),
        strength: float | None = None,
        **kwargs: Any,
    ) -> VectorEvaluation:
        """Zero-shot, zero-shot + this vector, and k-shot accuracy on held-out ``pairs``
        (first token and exact match of the greedy answer), with the lift's 95% bootstrap interval
        and a sign test; warns in one line when the lift is not significant. ``kwargs``:
        ``demonstrations`` (k-shot demos, default the other pairs), ``chat_template``, ``seed``,
        ``batch_size``, ``n_bootstrap``, ``progress`` (see :mod:`ivtrainer.steering.vector_evaluation`)."""
        result = evaluate_vector(self, model, tokenizer, pairs, shots=shots, strength=strength, **kwargs)
        if not result.significant:
            low, high = result.lift_interval
            logger.warning(
                "%sthe instruction vector's lift on %d held-out pairs is not significant: %+.2f "
                "(95%% interval %+.2f to %+.2f, p = %.2g)",
                f"{self.task!r}: " if self.task else "", result.n, result.lift, low, high, result.p_value,
            )  # fmt: skip
        return result

    # -- persistence -----------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("vector", "cie", "mean_activations"):
            fields.pop(name)
        fields["heads"] = [list(h) for h in self.heads]
        from ivtrainer.version import __version__

        return {"format_version": FORMAT_VERSION, "ivtrainer_version": __version__, **fields}

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``instruction_vector.safetensors``, ``instruction_vector.json`` and a README card.

        Each file is written to a temporary name and renamed into place.
        """
        from ivtrainer.hub.artifacts import write_artifact

        tensors = {"vector": self.vector, "cie": self.cie, "mean_activations": self.mean_activations}
        return write_artifact(
            save_directory,
            config_name=CONFIG_NAME,
            config=self._config(),
            weights_name=WEIGHTS_NAME,
            tensors=tensors,
            card=self.model_card(),
        )

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, *, revision: str | None = None, token: str | None = None
    ) -> InstructionVector:
        """Load from a folder written by :meth:`save_pretrained` or a Hub repo id (both files from
        one commit of ``revision``, default the main branch's latest). Everything is checked."""
        from ivtrainer.hub.artifacts import artifact_folder

        where = os.fspath(path_or_repo_id)
        hint = "(written by InstructionVector.save_pretrained / ivtrainer extract-iv) "
        folder = artifact_folder(
            where,
            [CONFIG_NAME, WEIGHTS_NAME],
            "an instruction vector",
            hint=hint,
            revision=revision,
            token=token,
        )
        config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        return cls._from_files(config_file, weights_file, where)

    @classmethod
    def _from_files(cls, config_file: Path, weights_file: Path, where: str) -> InstructionVector:
        """Read and check the two files; every problem is one line naming ``where``."""
        from ivtrainer.hub.artifacts import read_artifact

        config, tensors = read_artifact(
            config_file.parent,
            config_name=CONFIG_NAME,
            weights_name=WEIGHTS_NAME,
            format_version=FORMAT_VERSION,
            what="instruction vector",
            where=where,
            error=InvalidVectorError,
        )
        fields = {f.name for f in dataclasses.fields(cls)}
        names = {"vector", "cie", "mean_activations"}
        missing = sorted(
            (fields - {"task", "strength", "settings", "metrics"}) - (config.keys() | tensors.keys())
        )
        unknown = sorted((config.keys() - fields) | (tensors.keys() - names))
        if missing or unknown:
            raise InvalidVectorError(
                f"{where}: "
                + "; ".join(
                    part
                    for part in (
                        f"missing {missing}" if missing else "",
                        f"unknown fields {unknown}" if unknown else "",
                    )
                    if part
                )
            )
        if not isinstance(config.get("heads"), list) or not isinstance(config.get("head_scores"), list):
            raise InvalidVectorError(f"{where}: heads and head_scores must be lists")
        try:
            return cls(**tensors, **config)  # type: ignore[arg-type]  # each field checked in __post_init__
        except InvalidVectorError as exc:
            raise InvalidVectorError(f"{where}: {exc}") from None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload instruction vector",
    ) -> str:
        """Upload the files of :meth:`save_pretrained` to a Hub model repo; returns the commit URL."""
        from ivtrainer.hub.push import push_folder

        return push_folder(
            self.save_pretrained, repo_id, private=private, token=token, commit_message=commit_message
        )

    def model_card(self):
        """A ``huggingface_hub.ModelCard`` describing the vector and how it was extracted."""
        from huggingface_hub import ModelCard, ModelCardData

        data = ModelCardData(
            library_name="ivtrainer",
            tags=["ivtrainer", "instruction-vector", "function-vector"],
            base_model=self.model_name
            if "/" in self.model_name and not Path(self.model_name).exists()
            else None,
        )
        heads = "\n".join(
            f"| {layer} | {head} | {score:.4f} |"
            for (layer, head), score in zip(self.heads, self.head_scores, strict=True)
        )
        lines = [f"- {k}: {v}" for k, v in self.metrics.items() if k not in ("calibration", "evaluation")]
        calibration = self.metrics.get("calibration")
        if isinstance(calibration, dict):
            lines.append(
                f"- calibration: {calibration.get('n_heads')} heads, layer {calibration.get('edit_layer')}, strength "
                f"{calibration.get('strength')} chosen on {calibration.get('n_prompts')} extraction pairs "
                f"(zero-shot accuracy {calibration.get('base_accuracy')} -> {calibration.get('accuracy')})"
            )
        metrics = "\n".join(lines) or "- none recorded"
        evaluation = self.metrics.get("evaluation")
        measured = ""
        if isinstance(evaluation, dict):
            from ivtrainer.steering.vector_evaluation import VectorEvaluation

            known = {f.name for f in dataclasses.fields(VectorEvaluation)}
            result = VectorEvaluation(**{k: v for k, v in evaluation.items() if k in known})
            measured = f"\n## Measured on held-out pairs (never used for extraction)\n\n{result.table()}\n"
        settings = "\n".join(f"- {k}: {v}" for k, v in self.settings.items())
        content = f"""---
{data.to_yaml()}
---

# Instruction vector{f" for `{self.task}`" if self.task else ""}

An instruction vector (Jiang et al., 2024, arXiv:2406.12227; Todd et al., ICLR 2024) for
`{self.model_name}`{f" (revision `{self.model_revision}`)" if self.model_revision else ""}: the summed
residual-stream contributions of the {len(self.heads)} attention heads with the largest causal
indirect effect on the task, added at the output of decoder layer {self.edit_layer}
(of {self.n_layers}) with strength {self.strength:g}.

```python
from ivtrainer import InstructionVector

iv = InstructionVector.from_pretrained("<this repo>")
with iv.apply(model):  # strength {self.strength:g}
    outputs = model.generate(**inputs)
```

## Heads

| layer | head | mean CIE |
| --- | --- | --- |
{heads}

## Extraction settings

{settings}

## Measured during extraction (extraction pairs, not held-out)

{metrics}
{measured}"""
        return ModelCard(content)


@torch.no_grad()
def head_contributions(layout: ModelLayout, mean: torch.Tensor, heads: list[tuple[int, int]]) -> torch.Tensor:
    """``(len(heads), hidden)``: each head's mean output pushed through its output projection.

    Computed as ``proj(x) - proj(0)`` with only that head's slice of ``x`` set, so biases cancel
    and Linear, GPT-2 Conv1D and PEFT-wrapped projections are all handled alike.
    """
    out = []
    for layer, head in heads:
        proj = layout.attn_outputs[layer]
        weight = next(proj.parameters())
        x = torch.zeros(2, layout.n_heads, layout.head_dim, dtype=weight.dtype, device=weight.device)
        x[0, head] = mean[layer, head].to(x)
        y = proj(x.flatten(-2))
        out.append((y[0] - y[1]).float().cpu())
    return torch.stack(out)


def _validate(
    layout: ModelLayout,
    examples,
    n_heads,
    n_shots,
    n_mean_prompts,
    n_cie_prompts,
    method,
    edit_layer,
    strength,
    calibrate,
    batch_size=1,
):
    if method not in ("exact", "atp"):
        raise InvalidInputError(f"method must be 'exact' or 'atp', not {method!r}")
    for name, value, low in (
        ("n_shots", n_shots, 0),
        ("n_mean_prompts", n_mean_prompts, 1),
        ("n_cie_prompts", n_cie_prompts, 1),
        ("batch_size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}")
    check_extraction_sizes(examples, n_shots=n_shots)
    total = layout.n_layers * layout.n_heads
    if n_heads is not None and (not isinstance(n_heads, int) or not 1 <= n_heads <= total):
        raise InvalidInputError(
            f"n_heads must be between 1 and the model's {layout.n_layers} x {layout.n_heads} = {total} heads, got {n_heads!r}"
        )
    if edit_layer not in (None, "auto") and not (
        isinstance(edit_layer, int) and 0 <= edit_layer < layout.n_layers
    ):
        raise InvalidInputError(
            f"edit_layer must be None, 'auto' or a layer in [0, {layout.n_layers}), got {edit_layer!r}"
        )
    if strength is not None:
        strength = finite_number("strength", strength)
        if strength <= 0:
            raise InvalidInputError(f"strength must be > 0, got {strength}")
        warn_unusual_strength(strength)
    if (calibrate or edit_layer == "auto") and len(examples) < MIN_PAIRS:
        raise InvalidInputError(
            f"calibration needs at least {MIN_PAIRS} extraction pairs for a stable choice, got {len(examples)}; "
            "pass more pairs, or calibrate=False (--no-calibrate) for the papers' fixed layer and strength"
        )


def extract_instruction_vector(
    model: nn.Module,
    tokenizer: Any,
    examples: Any,
    config: ExtractionConfig | None = None,
    *,
    name: str | None = None,
    heads: HeadSet | str | os.PathLike | None = None,
    progress: bool | None = None,
    **settings: Any,
) -> InstructionVector:
    """Extract the instruction vector of a task (Todd et al.'s function-vector procedure).

    How (``config`` and ``settings``: an :class:`~ivtrainer.steering.extraction_config.ExtractionConfig`
    and any of its fields by name, e.g. ``n_heads=10, calibrate=False``):

    1. Mean head outputs at the last token over ``n_mean_prompts`` clean ``n_shots``-shot prompts
       (default 100, Todd et al.'s; 25 with ``heads=``, where the mean only forms the vector:
       ``benchmarks/universal_heads_cost.py`` measures the same held-out lift at a quarter the cost).
    2. Causal indirect effect of every head on ``n_cie_prompts`` shuffled-label prompts
       (``method="exact"``: shared-prefix patching, equal to the plain loop; ``"atp"``: attribution
       patching, one forward and one backward per prompt).
    3. The heads with the largest mean CIE; the vector is the sum of their outputs.
    4. ``calibrate=True`` (default): the number of heads (5, 10 or 20), the edit layer and the
       strength (1, 2, 4 or 8) chosen jointly by zero-shot accuracy on ``n_calibration_prompts``
       extraction pairs (:mod:`ivtrainer.steering.calibration`); the strength is stored in the
       vector and used by :meth:`InstructionVector.apply` and the trainers. ``calibrate=False``:
       the papers' fixed choice, 10 heads at layer ``n_layers // 3``, strength 1.

    Args:
        examples: ``{"input", "output"}`` dicts, a ``datasets.Dataset``, a JSON/JSONL path or a
            built-in task name (its extraction split).
        config: the extraction settings (default: ``ExtractionConfig()``); ``settings`` change
            single fields of it. ``n_heads``, ``edit_layer``, ``strength`` fix that part of the
            choice (not searched); ``edit_layer="auto"`` with ``calibrate=False`` searches the layer only.
        name: the task's name in the artifact (default: the built-in task's name or the file's stem).
        heads: a :class:`~ivtrainer.steering.head_set.HeadSet` (or its folder / Hub id): rank the
            heads by its mean CIE over many tasks instead of measuring this task's (step 2 skipped;
            the public FvForgetting code's universal heads; the mean activations are read only
            up to the deepest candidate head's layer).
        progress: progress bars; ``None`` shows them in a terminal only.

    All arguments are checked before any forward pass. The tokenizer needs no pad token.
    """
    c = ExtractionConfig.of(config, **settings)
    n_heads, n_shots, n_mean_prompts, n_cie_prompts = c.n_heads, c.n_shots, c.n_mean_prompts, c.n_cie_prompts
    method, calibrate, edit_layer, strength = c.method, c.calibrate, c.edit_layer, c.strength
    n_calibration_prompts, chat_template, seed, batch_size = (
        c.n_calibration_prompts,
        c.chat_template,
        c.seed,
        c.batch_size,
    )
    task = name or _task_name(examples)
    if n_mean_prompts is None:
        n_mean_prompts = 100 if heads is None else HEAD_SET_MEAN_PROMPTS
    data = load_examples(examples)
    layout = get_layout(model)
    _validate(
        layout, data, n_heads, n_shots, n_mean_prompts, n_cie_prompts, method, edit_layer, strength, calibrate,
        batch_size,
    )  # fmt: skip
    head_set = HeadSet.from_pretrained(heads) if isinstance(heads, (str, os.PathLike)) else heads
    if head_set is not None:
        head_set.check_compatible(model)
    builder = PromptBuilder(tokenizer, chat_template=chat_template)
    rng = random.Random(seed)
    clean = builder.sample(data, n_mean_prompts, n_shots, rng)
    corrupted = builder.sample(data, n_cie_prompts, n_shots, rng, shuffle_labels=True)
    check_prompts_fit(model, [*clean, *corrupted], n_shots=n_shots)
    bars = None if progress is None else not progress

    total = layout.n_layers * layout.n_heads
    if n_heads is not None:
        counts = [n_heads]
    elif calibrate:
        counts = [k for k in HEAD_COUNTS if k <= total] or [total]
    else:
        counts = [min(10, total)]

    with eval_mode(model):
        layers = None
        if head_set is not None:  # only the candidate heads' layers are read, so the forward stops early
            cie = head_set.cie.clone()
            candidates = _top(torch.argsort(cie.flatten(), descending=True), max(counts), layout)
            layers = sorted({layer for layer, _ in candidates})
        with tqdm(total=len(clean), desc="mean head activations", unit="prompt", disable=bars) as bar:
            mean = mean_head_activations(
                model, layout, clean, layers=layers, batch_size=batch_size, progress=bar.update
            )
        if head_set is None:
            cie = mean_cie(model, layout, corrupted, mean, method=method, disable=bars)

        if not bool((cie > 0).any()):
            logger.warning(
                "no head has a positive causal effect on this task (max CIE %.3g): the instruction vector "
                "will not steer; check the task data, or use more prompts (n_cie_prompts)",
                float(cie.max()),
            )
        order = torch.argsort(cie.flatten(), descending=True)
        default_layer = layout.n_layers // 3
        metrics: dict[str, Any] = {}
        if calibrate or edit_layer == "auto":
            vectors = {k: head_contributions(layout, mean, _top(order, k, layout)).sum(0) for k in counts}
            queries = rng.sample(data, min(n_calibration_prompts, len(data)))
            found = calibrate_vector(
                model,
                layout,
                [builder.encode([], q) for q in queries],
                vectors,
                default_layer=default_layer,
                edit_layer=edit_layer if isinstance(edit_layer, int) else None,
                strength=strength if calibrate else (strength or 1.0),
                progress=progress,
            )
            k, edit_layer, strength = found.n_heads, found.edit_layer, found.strength
            metrics["calibration"] = found.as_dict()
            metrics["zero_shot_accuracy"] = found.base_accuracy
            metrics["zero_shot_accuracy_with_iv"] = found.accuracy
            where = f"{task!r}: " if task else ""
            if found.accuracy <= found.base_accuracy:
                logger.warning(
                    "%sthe instruction vector does not raise zero-shot accuracy on %d extraction pairs "
                    "(%.2f with it, %.2f without) at any layer or strength tried: it will not steer",
                    where, found.n_prompts, found.accuracy, found.base_accuracy,
                )  # fmt: skip
            elif found.hits < MIN_HITS:
                logger.warning(
                    "%sthe calibrated layer %d rests on %d hits in %d extraction pairs: an unstable choice; "
                    "use more extraction pairs (n_calibration_prompts) or a task the model can do few-shot",
                    where, edit_layer, found.hits, found.n_prompts,
                )  # fmt: skip
        else:
            k = counts[0]
            edit_layer = default_layer if edit_layer is None else edit_layer
            strength = 1.0 if strength is None else strength
        chosen = _top(order, k, layout)
        vector = head_contributions(layout, mean, chosen).sum(0)

    source = model_source(model)
    return InstructionVector(
        vector=vector,
        edit_layer=int(edit_layer),
        heads=chosen,
        head_scores=[float(cie[layer, head]) for layer, head in chosen],
        cie=cie,
        mean_activations=mean,
        model_name=source["name"] or layout.model_type,
        model_revision=source["revision"],
        model_type=layout.model_type,
        hidden_size=layout.hidden_size,
        n_layers=layout.n_layers,
        n_heads=layout.n_heads,
        head_dim=layout.head_dim,
        task=task,
        strength=float(strength),
        settings={
            "n_heads": k,
            "n_shots": n_shots,
            "n_mean_prompts": n_mean_prompts,
            "n_cie_prompts": n_cie_prompts,
            "method": method,
            "calibrate": calibrate,
            "edit_layer": edit_layer,
            "strength": float(strength),
            "chat_template": chat_template,
            "seed": seed,
            "n_examples": len(data),
            **({"head_set": {"tasks": head_set.tasks, "model": head_set.model_name}} if head_set else {}),
            **({"model_note": source["note"]} if source["note"] else {}),
        },
        metrics=metrics,
    )


#: Mean prompts when a head set is given (no CIE to patch with the mean: it only forms the vector).
HEAD_SET_MEAN_PROMPTS = 25


def _top(order: torch.Tensor, k: int, layout: ModelLayout) -> list[tuple[int, int]]:
    return [divmod(int(i), layout.n_heads) for i in order[:k]]


def _task_name(examples) -> str | None:
    """A built-in task's name, or a task file's stem."""
    if isinstance(examples, (str, os.PathLike)):
        path = Path(examples)
        return path.stem if path.exists() else os.fspath(examples)
    return None


def load_vectors(
    instruction_vectors: InstructionVector | str | os.PathLike | Sequence,
) -> list[InstructionVector]:
    """InstructionVectors from objects, folders or Hub ids; at least one."""
    if instruction_vectors is None:
        raise InvalidInputError(
            "no instruction vector given: pass instruction_vectors= (InstructionVector objects or folders "
            "written by InstructionVector.save_pretrained / `ivtrainer extract-iv`)"
        )
    items = (
        [instruction_vectors]
        if isinstance(instruction_vectors, (InstructionVector, str, os.PathLike))
        else list(instruction_vectors)
    )
    if not items:
        raise InvalidInputError("instruction_vectors is empty: pass at least one InstructionVector or folder")
    return [v if isinstance(v, InstructionVector) else InstructionVector.from_pretrained(v) for v in items]
