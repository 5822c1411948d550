"""Continual instruction tuning: a sequence of tasks trained in turn, scored after every stage."""
