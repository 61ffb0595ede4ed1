"""`pytest -m "not integration"` runs the unit tests alone: every integration module must say it is one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

INTEGRATION = Path(__file__).resolve().parent.parent / "integration"


def _declares_integration_marker(path: Path) -> bool:
    for node in ast.parse(path.read_text()).body:
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
                and "pytest.mark.integration" in ast.unparse(node.value)):
            return True
    return False


@pytest.mark.parametrize("path", sorted(INTEGRATION.glob("test_*.py")), ids=lambda path: path.name)
def test_every_integration_module_is_marked_integration(path: Path) -> None:
    assert _declares_integration_marker(path), f'{path.name} lacks `pytestmark = pytest.mark.integration`'
