"""Universal heads: attention heads ranked once per model by their causal indirect effect averaged
over many tasks (what the public FvForgetting code uses, ``--universal_set``). With a saved
:class:`HeadSet`, a task's instruction vector needs only that task's mean head outputs, no causal
mediation per task: ``extract_instruction_vector(model, tokenizer, task, heads=head_set)``."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ivtrainer.datasets.tasks import list_tasks, load_examples
from ivtrainer.errors import InvalidInputError, IVTrainerError
from ivtrainer.modeling.architectures import ModelLayout, get_layout, unwrap_model
from ivtrainer.modeling.hooks import eval_mode
from ivtrainer.modeling.loading import model_source
from ivtrainer.steering.extraction_config import HEAD_SET_FIELDS, ExtractionConfig
from ivtrainer.steering.icl import PromptBuilder, check_extraction_sizes, check_prompts_fit
from ivtrainer.steering.mediation import mean_cie, mean_head_activations
from ivtrainer.utils.checks import finite_tensor

__all__ = [
    "SHIPPED",
    "HeadSet",
    "IncompatibleHeadSetError",
    "InvalidHeadSetError",
    "extract_head_set",
    "shipped_head_set",
]

#: The head set shipped for the default model (``benchmarks/build_head_set.py`` writes it).
SHIPPED = Path(__file__).resolve().parents[1] / "resources" / "head_sets" / "default"

FORMAT_VERSION = 1
WEIGHTS_NAME = "head_set.safetensors"
CONFIG_NAME = "head_set.json"


class IncompatibleHeadSetError(IVTrainerError, ValueError):
    """A head set chosen on another model (other layers or heads)."""


class InvalidHeadSetError(IVTrainerError, ValueError):
    """A head set whose fields do not fit together (a corrupt or hand-edited folder)."""


@dataclasses.dataclass
class HeadSet:
    """Heads ranked by mean CIE over ``tasks``; ``task_cie`` keeps each task's own table;
    ``n_top``: how many of its top heads an instruction vector sums, so that its calibration
    searches the layer and strength only (None: the count is calibrated too, 5, 10 or 20)."""

    cie: torch.Tensor  # (n_layers, n_heads), the mean over tasks
    task_cie: torch.Tensor  # (n_tasks, n_layers, n_heads)
    tasks: list[str]
    model_name: str
    model_revision: str | None
    model_type: str
    n_layers: int
    n_heads: int
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    n_top: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads", "n_top"):
            value = getattr(self, name)
            if name == "n_top" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidHeadSetError(f"{name} must be a positive integer, got {value!r}")
        if self.n_top is not None and self.n_top > self.n_layers * self.n_heads:
            raise InvalidHeadSetError(
                f"n_top must be at most the model's {self.n_layers * self.n_heads} heads, got {self.n_top}"
            )
        shapes = (
            ("cie", self.cie, (self.n_layers, self.n_heads)),
            ("task_cie", self.task_cie, (len(self.tasks), self.n_layers, self.n_heads)),
        )
        for name, tensor, shape in shapes:
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise InvalidHeadSetError(
                    f"{name} must have shape {shape} ({len(self.tasks)} tasks), got {got}"
                )
            try:
                finite_tensor(name, tensor)
            except IVTrainerError as exc:
                raise InvalidHeadSetError(str(exc)) from None

    def top(self, k: int) -> list[tuple[int, int]]:
        """The ``k`` heads with the largest mean CIE, best first, as ``(layer, head)``."""
        order = torch.argsort(self.cie.flatten(), descending=True)[:k]
        return [divmod(int(i), self.n_heads) for i in order]

    def check_compatible(self, model: nn.Module) -> ModelLayout:
        """The model's layout; raises :class:`IncompatibleHeadSetError` for another architecture
        or other layers x heads (head rankings do not carry across models)."""
        layout = get_layout(model)
        model_type = getattr(getattr(unwrap_model(model), "config", None), "model_type", None)
        if model_type is not None and model_type != self.model_type:
            raise IncompatibleHeadSetError(
                f"this head set was chosen on {self.model_name} (a {self.model_type} model) and cannot rank the heads "
                f"of a {model_type} model, whatever their number; choose one for this model with "
                "ivtrainer.extract_head_set(model, tokenizer)"
            )
        if (layout.n_layers, layout.n_heads) != (self.n_layers, self.n_heads):
            raise IncompatibleHeadSetError(
                f"this head set was chosen on {self.model_name} ({self.n_layers} layers x {self.n_heads} heads) and "
                f"cannot rank the heads of a model with {layout.n_layers} x {layout.n_heads}; choose one for this "
                "model with ivtrainer.extract_head_set(model, tokenizer)"
            )
        return layout

    # -- persistence -----------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        from ivtrainer.hub.artifacts import write_artifact
        from ivtrainer.version import __version__

        config = {
            "format_version": FORMAT_VERSION,
            "ivtrainer_version": __version__,
            **{
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if f.name not in ("cie", "task_cie")
            },
        }
        return write_artifact(
            save_directory,
            config_name=CONFIG_NAME,
            config=config,
            weights_name=WEIGHTS_NAME,
            tensors={"cie": self.cie, "task_cie": self.task_cie},
            card=self.model_card(),
        )

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, *, revision: str | None = None, token: str | None = None
    ) -> HeadSet:
        """Load from a folder written by :meth:`save_pretrained` or a Hub id (``id@rev``)."""
        from ivtrainer.hub.artifacts import artifact_folder, read_artifact

        where = os.fspath(path_or_repo_id)
        folder = artifact_folder(
            where, [CONFIG_NAME, WEIGHTS_NAME], "a head set", hint="(written by HeadSet.save_pretrained) ",
            revision=revision, token=token,
        )  # fmt: skip
        config, tensors = read_artifact(
            folder,
            config_name=CONFIG_NAME,
            weights_name=WEIGHTS_NAME,
            format_version=FORMAT_VERSION,
            what="head set",
            where=where,
            error=InvalidHeadSetError,
        )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((config.keys() | tensors.keys()) - fields)
        missing = sorted(fields - {"settings", "n_top"} - (config.keys() | tensors.keys()))
        if unknown or missing:
            raise InvalidHeadSetError(f"{where}: missing {missing}, unknown fields {unknown}")
        try:
            return cls(**tensors, **config)  # type: ignore[arg-type]  # each field checked in __post_init__
        except (InvalidHeadSetError, TypeError) as exc:
            raise InvalidHeadSetError(f"{where}: {exc}") from None

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
        """Upload the files of :meth:`save_pretrained` to a Hub model repo; returns the commit URL."""
        from ivtrainer.hub.push import push_folder

        return push_folder(
            self.save_pretrained, repo_id, private=private, token=token, commit_message="Upload head set"
        )

    def model_card(self):
        from huggingface_hub import ModelCard, ModelCardData

        data = ModelCardData(library_name="ivtrainer", tags=["ivtrainer", "instruction-vector", "head-set"])
        rows = "\n".join(
            f"| {layer} | {head} | {float(self.cie[layer, head]):.4f} |" for layer, head in self.top(20)
        )
        return ModelCard(
            f"""---
{data.to_yaml()}
---

# Head set for `{self.model_name}`

Attention heads ranked by their causal indirect effect (Todd et al., ICLR 2024) averaged over
{len(self.tasks)} tasks ({", ".join(self.tasks)}): a universal head set, as the public code of
Jiang et al. (FvForgetting, `--universal_set`) uses. A task's instruction vector then needs only
its mean head outputs:

```python
from ivtrainer import HeadSet, extract_instruction_vector

heads = HeadSet.from_pretrained("<this repo>")
iv = extract_instruction_vector(model, tokenizer, "my_task.jsonl", heads=heads)
```

## Top heads

| layer | head | mean CIE |
| --- | --- | --- |
{rows}

## Settings

{chr(10).join(f"- {k}: {v}" for k, v in self.settings.items())}
{f"{chr(10)}An instruction vector from this set sums its top {self.n_top} heads (`n_top`: the calibration searches the layer and strength only).{chr(10)}" if self.n_top else ""}"""
        )


def shipped_head_set(model: nn.Module) -> HeadSet | None:
    """The head set ivtrainer ships for ``model``'s checkpoint, or None: the default model's
    (SmolLM2-135M-Instruct, built from the built-in tasks by ``benchmarks/build_head_set.py``),
    for a model of that name and layout. Head rankings are a property of the checkpoint, so a
    fine-tuned copy keeps its base's (as FvForgetting's universal set is computed once)."""
    import json

    config = SHIPPED / CONFIG_NAME
    if (
        not config.is_file()
        or json.loads(config.read_text()).get("model_name") != model_source(model)["name"]
    ):
        return None
    head_set = HeadSet.from_pretrained(SHIPPED)
    try:
        head_set.check_compatible(model)
    except IncompatibleHeadSetError:
        return None
    return head_set


def extract_head_set(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[Any] | None = None,
    config: ExtractionConfig | None = None,
    *,
    progress: bool | None = None,
    **settings: Any,
) -> HeadSet:
    """Rank the model's heads by CIE averaged over ``tasks`` (default: every built-in task; or
    built-in names, task files, lists of ``{"input", "output"}`` pairs), each measured as in
    :func:`~ivtrainer.steering.extraction.extract_instruction_vector` on its extraction pairs.

    ``config``/``settings``: the :class:`~ivtrainer.steering.extraction_config.ExtractionConfig`
    fields a head set uses (``HEAD_SET_FIELDS``: prompts, method, seed, batch size;
    ``n_mean_prompts=None`` is 100); no vector is formed, so the head count, layer, strength and
    calibration do not apply and are refused by name."""
    vector_only = sorted(set(settings) - set(HEAD_SET_FIELDS))
    if vector_only:
        raise TypeError(
            f"{vector_only} do not apply to a head set (no vector is formed): use {list(HEAD_SET_FIELDS)}"
        )
    c = ExtractionConfig.of(config, **settings)
    n_shots, n_cie_prompts, method, chat_template = c.n_shots, c.n_cie_prompts, c.method, c.chat_template
    n_mean_prompts = 100 if c.n_mean_prompts is None else c.n_mean_prompts
    seed, batch_size = c.seed, c.batch_size
    items = list(tasks) if tasks is not None else list_tasks()
    if not items:
        raise InvalidInputError(
            "tasks is empty: pass task names, files or example lists (default: every built-in task)"
        )
    names = [Path(t).stem if isinstance(t, (str, os.PathLike)) and Path(t).exists() else
             (t if isinstance(t, str) else f"task_{i}") for i, t in enumerate(items)]  # fmt: skip
    datasets = [load_examples(t) for t in items]
    for data, name in zip(datasets, names, strict=True):  # every task checked before any forward
        check_extraction_sizes(data, n_shots=n_shots, source=name)
    layout = get_layout(model)
    builder = PromptBuilder(tokenizer, chat_template=chat_template)
    bars = None if progress is None else not progress
    tables = []
    with eval_mode(model):
        for data in tqdm(datasets, desc="head set", unit="task", disable=bars):
            rng = random.Random(seed)
            clean = builder.sample(data, n_mean_prompts, n_shots, rng)
            corrupted = builder.sample(data, n_cie_prompts, n_shots, rng, shuffle_labels=True)
            check_prompts_fit(model, [*clean, *corrupted], n_shots=n_shots)
            mean = mean_head_activations(model, layout, clean, batch_size=batch_size)
            tables.append(mean_cie(model, layout, corrupted, mean, method=method, disable=True))
    task_cie = torch.stack(tables)
    source = model_source(model)
    return HeadSet(
        cie=task_cie.mean(0),
        task_cie=task_cie,
        tasks=names,
        model_name=source["name"] or layout.model_type,
        model_revision=source["revision"],
        model_type=layout.model_type,
        n_layers=layout.n_layers,
        n_heads=layout.n_heads,
        settings={
            "n_shots": n_shots,
            "n_mean_prompts": n_mean_prompts,
            "n_cie_prompts": n_cie_prompts,
            "method": method,
            "chat_template": chat_template,
            "seed": seed,
        },
    )
