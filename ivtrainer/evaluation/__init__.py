"""Evaluation: knowledge-edit metrics (EasyEdit semantics), held-out abilities for forgetting, plots."""
