"""`pytest -m "not integration"` runs the unit tests alone: every integration module must say it is one.

That is every module under tests/integration/, and every module under tests/dev/ that talks to servers: one that
starts processes (imports subprocess) or asks for one of the local stack's fixtures.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
STACK_FIXTURES = {"apache_stack", "private_apache_stack", "secured_stack", "tansu_stack", "any_stack"}


def _declares_integration_marker(tree: ast.Module) -> bool:
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
            and "pytest.mark.integration" in ast.unparse(node.value)
        ):
            return True
    return False


def _talks_to_servers(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(alias.name == "subprocess" for alias in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "subprocess":
            return True
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and STACK_FIXTURES & {
            arg.arg for arg in node.args.args
        }:
            return True
    return False


def _integration_modules() -> list[Path]:
    dev = [path for path in sorted((TESTS / "dev").glob("test_*.py")) if _talks_to_servers(ast.parse(path.read_text()))]
    return sorted((TESTS / "integration").glob("test_*.py")) + dev


@pytest.mark.parametrize("path", _integration_modules(), ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_integration_module_is_marked_integration(path: Path) -> None:
    assert _declares_integration_marker(ast.parse(path.read_text())), (
        f"{path.parent.name}/{path.name} lacks `pytestmark = pytest.mark.integration`"
    )


def test_the_dev_modules_that_talk_to_servers_are_found() -> None:
    """The rule above is not vacuous: it picks the ClickHouse endpoint's and `metering stack`'s tests out of
    tests/dev/."""
    found = {path.name for path in _integration_modules() if path.parent.name == "dev"}
    assert {"test_clickhouse_endpoint.py", "test_stack_cli.py"} <= found
    assert "test_clickhouse_endpoint_parts.py" not in found  # pure parts of the endpoint: a unit module
