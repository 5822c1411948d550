"""The instruction vector artifact: its data, checks, files (safetensors + JSON + model card) and
steering with it (extraction is :mod:`ivtrainer.steering.extraction`).

An instruction vector (IV) is the sum of the residual-stream contributions of the attention heads
that carry a task (Todd et al., 2024; Jiang et al., 2024): each chosen head's mean last-token
output over clean k-shot prompts, pushed through the attention output projection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ivtrainer.errors import InvalidInputError, IVTrainerError
from ivtrainer.modeling.architectures import ModelLayout, get_layout
from ivtrainer.steering.calibration import warn_unusual_strength
from ivtrainer.steering.intervention import Intervention, Positions, add_to_residual
from ivtrainer.steering.vector_evaluation import VectorEvaluation, evaluate_vector
from ivtrainer.utils.checks import finite_number, finite_numbers, finite_tensor

logger = logging.get_logger(__name__)

__all__ = [
    "IncompatibleVectorError",
    "InstructionVector",
    "InvalidVectorError",
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
