"""The Hugging Face Hub: push checks and uploads, model cards."""
