"""The functions the ivtrainer_* task YAMLs name (lm-eval imports this file from its folder)."""

from ivtrainer.evaluation.lm_eval_tasks import (
    contains_answer,
    facts_docs,
    first_token_match,
    icl_docs,
    sequence_docs,
)

__all__ = ["contains_answer", "facts_docs", "first_token_match", "icl_docs", "sequence_docs"]
