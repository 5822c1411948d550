"""How an instruction vector is extracted: the one home of the extraction knobs and their defaults,
used by :func:`~ivtrainer.steering.extraction.extract_instruction_vector`,
:func:`~ivtrainer.steering.head_set.extract_head_set`, the own-task IVs, the continual runner and the
``extract-iv``/``extract-heads`` commands (whose flags are made from it)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from ivtrainer.errors import InvalidInputError

__all__ = ["HEAD_SET_FIELDS", "ExtractionConfig"]


def _field(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ExtractionConfig:
    """How an instruction vector is extracted (Todd et al.'s function-vector procedure: mean head
    outputs on clean few-shot prompts, each head's causal indirect effect on shuffled-label prompts,
    the top heads' outputs summed, then the heads, layer and strength calibrated).

    Parameters:
        n_shots (`int`, defaults to `10`):
            Demonstrations in each in-context prompt.
        n_mean_prompts (`int` or `None`, defaults to `None`):
            Clean prompts the mean head outputs are taken over. `None`: 100 (Todd et al.'s), or 25
            with a head set, where the mean only forms the vector.
        n_cie_prompts (`int`, defaults to `25`):
            Shuffled-label prompts each head's causal indirect effect is measured on.
        chat_template (`bool`, defaults to `False`):
            Wrap the prompts in the tokenizer's chat template.
        method (`str`, defaults to `"exact"`):
            `"exact"`: shared-prefix activation patching (equal to the plain loop); `"atp"`:
            attribution patching, one forward and one backward per prompt.
        n_heads (`int` or `None`, defaults to `None`):
            Heads summed into the vector. `None`: a head set's `n_top` when it has one, else 5, 10
            or 20 chosen by calibration (10 without).
        calibrate (`bool`, defaults to `True`):
            Choose the number of heads, the edit layer and the strength jointly by zero-shot
            accuracy on extraction pairs. `False`: the papers' fixed choice (10 heads, layer
            `n_layers // 3`, strength 1).
        edit_layer (`int`, `"auto"` or `None`, defaults to `None`):
            Fix the layer the vector is added at (not searched). `"auto"`: with `calibrate=False`,
            search the layer only.
        strength (`float` or `None`, defaults to `None`):
            Fix the vector's strength (not searched).
        n_calibration_prompts (`int`, defaults to `64`):
            Extraction pairs the calibration scores zero-shot.
        seed (`int`, defaults to `0`):
            Seed of the prompt sampling.
        batch_size (`int`, defaults to `16`):
            Prompts per forward for the mean activations.
    """

    n_shots: int = _field(10, "demonstrations in each in-context prompt")
    n_mean_prompts: int | None = _field(
        None, "clean prompts the mean head outputs are taken over (default: 100; 25 with a head set)"
    )
    n_cie_prompts: int = _field(25, "shuffled-label prompts each head's causal effect is measured on")
    chat_template: bool = _field(False, "wrap the prompts in the tokenizer's chat template")
    method: Literal["exact", "atp"] = _field(
        "exact", "exact: activation patching; atp: attribution patching (one forward and backward per prompt)"
    )
    n_heads: int | None = _field(None, "heads summed (default: 5, 10 or 20 by calibration; 10 without)")
    calibrate: bool = _field(
        True,
        "choose the heads, layer and strength on extraction pairs (--no_calibrate: the papers' fixed "
        "choice, 10 heads, layer L // 3, strength 1)",
    )
    edit_layer: int | str | None = _field(
        None, "layer index, or 'auto' (default: chosen by calibration; L // 3 without)"
    )
    strength: float | None = _field(None, "vector strength (default: chosen by calibration; 1 without)")
    n_calibration_prompts: int = _field(64, "extraction pairs the calibration scores zero-shot")
    seed: int = _field(0, "seed of the prompt sampling")
    batch_size: int = _field(16, "prompts per forward for the mean activations")

    def __post_init__(self) -> None:
        if isinstance(self.edit_layer, str) and self.edit_layer != "auto":  # from a command line
            try:
                self.edit_layer = int(self.edit_layer)
            except ValueError:
                raise InvalidInputError(
                    f"edit_layer must be a layer index or 'auto', got {self.edit_layer!r}"
                ) from None
        if self.method not in ("exact", "atp"):
            raise InvalidInputError(f"method must be 'exact' or 'atp', not {self.method!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")

    def replace(self, **settings: Any) -> ExtractionConfig:
        """A copy with ``settings`` changed; an unknown name is refused with the valid ones."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TypeError(f"unknown extraction setting(s) {unknown}: ExtractionConfig has {names}")
        return dataclasses.replace(self, **settings)

    @classmethod
    def of(cls, config: ExtractionConfig | None = None, **settings: Any) -> ExtractionConfig:
        """``config`` (default: the defaults) with ``settings`` changed."""
        return (config if config is not None else cls()).replace(**settings)


#: The settings a head set uses (it ranks heads: no vector is formed or calibrated).
HEAD_SET_FIELDS = (
    "n_shots",
    "n_mean_prompts",
    "n_cie_prompts",
    "chat_template",
    "method",
    "seed",
    "batch_size",
)
