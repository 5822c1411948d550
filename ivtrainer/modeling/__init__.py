"""Models: loading (the default model, Hub ids, folders, GGUF), where each architecture keeps its attention heads, and head-recording hooks."""
