"""``evaluate`` modules shipped with ivtrainer, loadable offline from their local path.

>>> import evaluate, ivtrainer.evaluation.metrics
>>> metric = evaluate.load(ivtrainer.evaluation.metrics.path("knowledge_update"))
"""

from __future__ import annotations

from importlib import resources

from ivtrainer.errors import InvalidInputError

__all__ = ["load", "path"]

_NAMES = ("knowledge_update",)


def path(name: str) -> str:
    """Local path of a shipped ``evaluate`` module script, for ``evaluate.load(path)``."""
    if name not in _NAMES:
        raise InvalidInputError(f"no metric {name!r}; ivtrainer ships {list(_NAMES)}")
    return str(resources.files("ivtrainer.evaluation") / "metrics" / name / f"{name}.py")


def load(name: str, **kwargs):
    """``evaluate.load`` of a shipped module (no network: it is read from the installed package)."""
    import evaluate

    return evaluate.load(path(name), **kwargs)
