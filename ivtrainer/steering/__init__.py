"""Instruction vectors: extraction by causal mediation, the artifact, steering with it, ICL prompts and what fine-tuning does to a vector (dynamics)."""
