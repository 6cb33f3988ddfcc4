"""The lint gate: ruff (lint and format) and mypy, as configured in pyproject.toml."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests import background

pytest.importorskip("ruff")
pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["appliance", "tests", "benchmarks"]


@pytest.mark.parametrize(
    "args",
    [
        ["ruff", "check", *PATHS],
        ["ruff", "format", "--check", *PATHS],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_lint(args: list[str]) -> None:
    # mypy was started in the background at collection (tests/conftest.py).
    code, output = background.result(args[0], [sys.executable, "-m", *args], ROOT, timeout=300)
    assert code == 0, f"{' '.join(args)} failed:\n{output}"
