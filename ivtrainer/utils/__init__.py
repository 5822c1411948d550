"""Infrastructure shared by the rest: input checks, safe output folders, DeepSpeed helpers."""
