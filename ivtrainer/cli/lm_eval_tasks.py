"""``ivtrainer lm-eval-tasks``: the folder of the package's lm-evaluation-harness tasks."""

from __future__ import annotations

DATACLASSES: tuple = ()


def make_parser(subparsers):
    return subparsers.add_parser(
        "lm-eval-tasks",
        dataclass_types=DATACLASSES,
        help="print the folder of ivtrainer's lm-evaluation-harness tasks (for lm_eval --include_path)",
        description="Print the folder holding the package's held-out abilities as lm-eval tasks: "
        'lm_eval --model hf --model_args pretrained=M --include_path "$(ivtrainer lm-eval-tasks)" '
        "--tasks ivtrainer_abilities (ivtrainer_facts_instruction: add --apply_chat_template).",
    )


def main() -> int:
    from ivtrainer.evaluation.lm_eval_tasks import lm_eval_tasks_path

    print(lm_eval_tasks_path())
    return 0
