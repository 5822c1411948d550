"""What defines a continual-tuning run (:class:`ContinualSettings`), its methods and the
``--quick`` preset: kept apart from the runner so that the command line reads them without the
training stack."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from ivtrainer.continual.sequence_tasks import SEQUENCE_TASKS
from ivtrainer.errors import InvalidInputError
from ivtrainer.iv_guided.recipes import RECIPES
from ivtrainer.steering.extraction_config import ExtractionConfig
from ivtrainer.utils.checks import finite_number

__all__ = ["LORA_TARGETS", "METHODS", "QUICK", "ContinualSettings", "Method"]

METHODS = ("plain", "replay", "kl-anchor", "iv-guided", "iv-guided-replay")
LORA_TARGETS = ("q_proj", "v_proj")
Method = Literal["plain", "replay", "kl-anchor", "iv-guided", "iv-guided-replay"]
_REPLAY = ("replay", "iv-guided-replay")
_GUIDED = ("kl-anchor", "iv-guided", "iv-guided-replay")
_OWN_IV = ("iv-guided", "iv-guided-replay")


@dataclasses.dataclass(frozen=True)
class ContinualSettings:
    """What defines a run: a resumed run must have the same (checked before any training)."""

    tasks: tuple[str, ...]
    method: Method = "iv-guided"
    model: str = "default"
    lora: bool = True
    seed: int = 0
    epochs: float = 2.0
    learning_rate: float | None = None  # default: 5e-4 LoRA, 2e-5 full
    batch_size: int = 8
    n_train: int | None = None  # rows per task (default: all of its train split)
    n_test: int | None = None  # test rows per task (default: all)
    n_icl: int = 24  # 5-shot prompts per held-out ability
    # "fixed": the same five demonstrations before every query of an ability (computed once, ~5x
    # cheaper); "per-query": drawn for each query, as the forgetting benchmark does
    icl_demos: Literal["fixed", "per-query"] = "fixed"
    replay_fraction: float = 0.1
    # kl-anchor, iv-guided: a factor on the recipe's KL weights, and the teacher's IV strength
    # (iv-guided; a multiple of each IV's own): the knobs the benchmark tunes on validation rows
    kl_scale: float = 1.0
    teacher_strength: float = 1.0
    # the split every stage is scored on: "validation" to choose settings without seeing test rows
    eval_split: Literal["test", "validation"] = "test"
    iv_heads: str | None = None  # a saved head set for the own-task IVs (mean activations only)
    # the own-task IVs' extraction sizes (ExtractionConfig's fields; its defaults)
    iv_mean_prompts: int | None = ExtractionConfig.n_mean_prompts
    iv_cie_prompts: int = ExtractionConfig.n_cie_prompts
    iv_calibration_prompts: int = ExtractionConfig.n_calibration_prompts
    # general abilities with lm-evaluation-harness after every stage (`[eval]` extra), next to the
    # built-in ones: lm-eval task names, and lm-eval's --limit (documents per task)
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_limit: int | None = None
    # kl-anchor, iv-guided: the teacher run at every step, or once before each stage and stored
    # (IVGuidedConfig.teacher; its top-k, 0 for the exact hidden-state store)
    teacher: Literal["live", "precomputed"] = "live"
    teacher_top_k: int = 64
    # IV repair: each task's IV captured right after its stage, added back at the end to the prompts
    # of its task (named, or routed from the prompt); evaluation only, so not part of a run's identity
    repair: bool = False
    # kl-anchor, iv-guided: the named IVGuidedConfig recipe (default: "kl-anchor" for kl-anchor,
    # "fvforgetting" for the IV-guided methods), before kl_scale and teacher_strength apply
    recipe: str | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise InvalidInputError(
                "the task list is empty: name at least one task (built-in or a JSON/JSONL file)"
            )
        if len(set(self.tasks)) != len(self.tasks):
            raise InvalidInputError(f"a task appears twice in {list(self.tasks)}")
        # each task is one column of the accuracy matrix, under its name: two tasks must not share one
        seen: dict[str, str] = {}
        for task in self.tasks:
            key = task if task in SEQUENCE_TASKS else str(Path(task).expanduser().resolve())
            if key in seen:
                raise InvalidInputError(f"{seen[key]!r} and {task!r} are the same task file: name it once")
            seen[key] = task
        names: dict[str, str] = {}
        for task in self.tasks:
            if _name(task) in names:
                raise InvalidInputError(
                    f"tasks {names[_name(task)]!r} and {task!r} would share the name {_name(task)!r} in the results: "
                    "rename one file (a task file's name, without its extension, names its column; built-in "
                    f"names {sorted(SEQUENCE_TASKS)} are taken)"
                )
            names[_name(task)] = task
        for name in ("n_train", "n_test", "iv_mean_prompts", "iv_cie_prompts", "iv_calibration_prompts"):
            value = getattr(self, name)  # None: all rows, or the package's default
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidInputError(f"{name} must be a whole number >= 1 (or left out), got {value!r}")
        if finite_number("epochs", self.epochs) <= 0:
            raise InvalidInputError(f"epochs must be > 0, got {self.epochs!r}")
        if self.learning_rate is not None and finite_number("learning_rate", self.learning_rate) <= 0:
            raise InvalidInputError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.method not in METHODS:
            raise InvalidInputError(f"method must be one of {METHODS}, not {self.method!r}")
        if not 0 <= finite_number("replay_fraction", self.replay_fraction) <= 1:
            raise InvalidInputError(f"replay_fraction must be in [0, 1], got {self.replay_fraction}")
        if finite_number("kl_scale", self.kl_scale) <= 0:
            raise InvalidInputError(
                f"kl_scale must be > 0 (a factor on the KL weights), got {self.kl_scale!r}"
            )
        if finite_number("teacher_strength", self.teacher_strength) < 0:
            raise InvalidInputError(f"teacher_strength must be >= 0, got {self.teacher_strength!r}")
        if self.eval_split not in ("test", "validation"):
            raise InvalidInputError(f"eval_split must be 'test' or 'validation', not {self.eval_split!r}")
        if self.repair and self.eval_split != "test":
            raise InvalidInputError(
                "--repair chooses its strengths on the validation rows: it cannot also be scored on them; use "
                "eval_split='test' with repair"
            )
        if self.icl_demos not in ("fixed", "per-query"):
            raise InvalidInputError(f"icl_demos must be 'fixed' or 'per-query', not {self.icl_demos!r}")
        for name in ("batch_size", "n_icl"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1")
        if self.teacher not in ("live", "precomputed"):
            raise InvalidInputError(f"teacher must be 'live' or 'precomputed', not {self.teacher!r}")
        if self.teacher_top_k < 0:
            raise InvalidInputError(
                f"teacher_top_k must be >= 0 (0: exact, from hidden states), got {self.teacher_top_k}"
            )
        if self.recipe is not None:
            if self.recipe not in RECIPES:
                raise InvalidInputError(f"unknown recipe {self.recipe!r}: choose one of {sorted(RECIPES)}")
            if self.method not in _GUIDED:
                raise InvalidInputError(
                    f"a recipe sets the KL terms of the guided methods {list(_GUIDED)}; method {self.method!r} has none"
                )
            uses_iv = any(
                RECIPES[self.recipe].get(k, 0) for k in ("teacher_iv_strength", "iv_strength_start")
            )
            if self.method == "kl-anchor" and uses_iv:
                raise InvalidInputError(
                    f"recipe {self.recipe!r} adds an instruction vector, which kl-anchor does not have: use method "
                    "'iv-guided' (the task's own IV) or recipe 'kl-anchor'"
                )
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise InvalidInputError(f"lm_eval_limit must be >= 1, got {self.lm_eval_limit}")
        if self.lm_eval_tasks:
            from ivtrainer.evaluation.lm_eval_harness import check_tasks, task_manager

            object.__setattr__(
                self, "lm_eval_tasks", tuple(check_tasks(list(self.lm_eval_tasks), task_manager()))
            )

    def guided_values(self) -> dict[str, Any]:
        """The IVGuidedConfig values of a guided method's stage: the recipe (default: kl-anchor
        for kl-anchor, fvforgetting for the IV-guided methods), its KL weights times
        ``kl_scale``, the teacher's IV at ``teacher_strength``."""
        recipe = dict(RECIPES[self.recipe or ("fvforgetting" if self.method in _OWN_IV else "kl-anchor")])
        recipe["kl_weight"] = [w * self.kl_scale for w in recipe["kl_weight"]]
        if self.method in _OWN_IV:
            recipe["teacher_iv_strength"] = self.teacher_strength
        return recipe

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else (5e-4 if self.lora else 2e-5)


def _name(task: str) -> str:
    return task if task in SEQUENCE_TASKS else Path(task).stem


#: ``ivtrainer continual --quick``: three tasks, small splits and IV extractions (about 3 minutes on
#: the default model, 2 CPU cores).
QUICK: dict[str, Any] = {
    "n_train": 64,
    "n_test": 16,
    "n_icl": 8,
    "epochs": 2.0,
    "iv_mean_prompts": 20,
    "iv_cie_prompts": 5,
    "iv_calibration_prompts": 16,
}
