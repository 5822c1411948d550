"""``ivtrainer demo``: the whole story on one model, offline, in minutes.

1. Extract the instruction vector (IV) of a built-in task; its top heads and CIE heatmap.
2. Fine-tune with LoRA on a new task the model cannot do, plainly and IV-guided; the new task and
   the held-out abilities (:mod:`ivtrainer.evaluation.forgetting`) before and after.
3. Update a handful of facts the model knows to counterfactual ones, plain full fine-tuning
   against F-Learning (LoRA->FT); Reliability, Generality, Locality.

Every number is measured in the run. The output folder holds the IV, the LoRA adapters, the
tables (JSON and Markdown) and the plots; it is written to a temporary folder and renamed into
place at the end, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ivtrainer.demo.plan import DemoPlan, check_output_folder, estimate_seconds
    from ivtrainer.demo.report import knowledge_table, new_task_table
    from ivtrainer.demo.run import run_demo
    from ivtrainer.demo.stages import stage_instruction_vector, stage_knowledge_update, stage_new_task

# loaded on first use: the command line reads DemoPlan's defaults without the training stack
_LAZY = {
    "DemoPlan": "plan",
    "check_output_folder": "plan",
    "estimate_seconds": "plan",
    "knowledge_table": "report",
    "new_task_table": "report",
    "run_demo": "run",
    "stage_instruction_vector": "stages",
    "stage_knowledge_update": "stages",
    "stage_new_task": "stages",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"ivtrainer.demo.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ivtrainer.demo' has no attribute {name!r}")


__all__ = [
    "DemoPlan",
    "check_output_folder",
    "estimate_seconds",
    "knowledge_table",
    "new_task_table",
    "run_demo",
    "stage_instruction_vector",
    "stage_knowledge_update",
    "stage_new_task",
]
