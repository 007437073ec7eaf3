"""The Python of a tool kept in an environment of its own (its pins conflict with the
service's): the KServe SDK (``make kserve-venv``), MLServer (``make mlserver-venv``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def tool_python(variable: str, default: str, make_target: str) -> Path:
    """``make test`` names the environment in ``variable``, and then it must be there;
    elsewhere a missing one skips the test."""
    named = os.environ.get(variable)
    python = REPO_ROOT / (named or default) / "bin" / "python"
    if not python.exists():
        if named:
            pytest.fail(f"{variable}={named} has no bin/python: `make {make_target}` makes it")
        pytest.skip(f"{default} is missing: `make {make_target}` makes it (make test does)")
    return python
