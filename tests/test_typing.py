"""The type checker sees ``ivtrainer.callbacks`` as the package it installs as (not ``Any``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_resolves_ivtrainer_callbacks(tmp_path):
    """A deliberate type error through a callback fails mypy: ``ivtrainer/callbacks`` (a link to
    the top-level ``callbacks/``) gives the checker the installed layout. Without it the import
    is unresolved, every callback is ``Any`` and this passes silently."""
    assert (ROOT / "ivtrainer" / "callbacks").resolve() == (ROOT / "callbacks").resolve()
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from ivtrainer.callbacks import IVKLCallback\n\nweights: str = IVKLCallback().kl_weights\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", str(probe)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'expression has type "list[float]", variable has type "str"' in done.stdout
