"""The one error root: every ApplianceError lives in appliance/errors.py, drawn in its tree."""

from __future__ import annotations

import ast
from pathlib import Path

from appliance import errors

PACKAGE = Path(errors.__file__).resolve().parent
ROOTS = {
    name
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, errors.ApplianceError)
}


def test_no_appliance_error_is_defined_outside_errors_py() -> None:
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == Path(errors.__file__).resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {
                b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
            }
            if bases & ROOTS:
                outside.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert outside == []


def test_the_docstring_draws_every_error_class() -> None:
    tree = errors.__doc__ or ""
    assert all(name in tree for name in ROOTS), sorted(n for n in ROOTS if n not in tree)
