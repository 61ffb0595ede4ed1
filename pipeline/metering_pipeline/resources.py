"""Files the product ships that live in `deploy/` (symlinked into the package, copied into wheels)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def clickhouse_migrations_dir() -> Path:
    return _PACKAGE_DIR / "warehouse" / "migrations"
