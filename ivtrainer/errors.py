"""Exceptions with messages written for the user: what went wrong and how to fix it.

Each also derives from the matching builtin, so ``except ValueError`` keeps working. The CLI
prints them as one line, without a traceback.
"""

from __future__ import annotations


class IVTrainerError(Exception):
    """Base class of the errors ivtrainer raises on bad input or a broken environment."""


class UnsupportedArchitectureError(IVTrainerError, ValueError):
    """ivtrainer does not know where this model's attention heads are."""


class ModelLoadError(IVTrainerError, OSError):
    """A model id or path could not be loaded."""


class MissingDependencyError(IVTrainerError, ImportError):
    """An optional dependency is missing; the message names the install command."""


class InvalidInputError(IVTrainerError, ValueError):
    """An argument, file or record that ivtrainer cannot use; the message names the fix."""


class InputNotFoundError(IVTrainerError, FileNotFoundError):
    """A path or Hub id that does not exist or holds something else than expected."""
