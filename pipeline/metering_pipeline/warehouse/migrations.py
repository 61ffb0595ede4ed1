"""Forward-only ClickHouse schema migrations, applied in file-name order and recorded once.

Migration files (`NNNN_description.sql`) use unqualified table names: they run with the
client bound to the product's database, so one set of files serves any database name.
On a ClickHouse cluster (`METERING_CLICKHOUSE_CLUSTER`), `{on_cluster}` becomes
`ON CLUSTER <name>` and `{replicated}` turns MergeTree engines into their Replicated forms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from clickhouse_connect.driver.client import Client

from metering_pipeline.resources import clickhouse_migrations_dir
from metering_pipeline.settings import Settings
from metering_pipeline.warehouse.client import connect, quote_identifier

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_TTL = re.compile(r"\bTTL (.+?)(?: SETTINGS |$)")  # a table TTL in system.tables' create_table_query

_LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations {on_cluster}
(
    version UInt32,
    name String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = {replicated}ReplacingMergeTree
ORDER BY version
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def load(directory: Path) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file name must look like 0001_name.sql: {path.name}")
        migrations.append(Migration(int(match[1]), match[2], split_statements(path.read_text())))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {directory}")
    return migrations


def split_statements(sql: str) -> tuple[str, ...]:
    """Statements end with `;` at the end of a line; `--` comment lines are dropped."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    chunks = re.split(r";\s*$", "\n".join(lines), flags=re.MULTILINE)
    return tuple(chunk.strip() for chunk in chunks if chunk.strip())


def render(statement: str, cluster: str | None) -> str:
    """Fill the cluster placeholders; the cluster name comes from settings and must be a plain identifier."""
    on_cluster = f"ON CLUSTER {quote_identifier(cluster)}" if cluster else ""
    return statement.replace("{on_cluster}", on_cluster).replace("{replicated}", "Replicated" if cluster else "")


def applied_versions(client: Client) -> set[int]:
    return {row[0] for row in client.query("SELECT DISTINCT version FROM schema_migrations").result_rows}


def migrate(settings: Settings, directory: Path | None = None, timeout: float | None = None) -> list[Migration]:
    """Create the database if needed and apply pending migrations; returns those applied. Every statement is
    idempotent, so several processes may migrate at once, and one cut off by `timeout` can be run again."""
    cluster = settings.clickhouse_cluster
    with connect(settings, database="default", timeout=timeout) as admin:
        admin.command(
            render(
                f"CREATE DATABASE IF NOT EXISTS {quote_identifier(settings.clickhouse_database)} {{on_cluster}}",
                cluster,
            )
        )
    applied: list[Migration] = []
    with connect(settings, timeout=timeout) as client:
        client.command(render(_LEDGER_DDL, cluster))
        done = applied_versions(client)
        for migration in load(directory or clickhouse_migrations_dir()):
            if migration.version in done:
                continue
            for statement in migration.statements:
                client.command(render(statement, cluster))
            client.insert("schema_migrations", [[migration.version, migration.name]], column_names=["version", "name"])
            applied.append(migration)
        if directory is None:  # the product's own schema: its tables exist now
            apply_records_ttl(client, settings)
    return applied


def records_ttl(ttl: timedelta | None) -> str | None:
    """usage_records' TTL expression for METERING_RECORDS_TTL (None: rows are kept)."""
    if ttl is None:
        return None
    return f"toDateTime(timestamp) + toIntervalSecond({int(ttl.total_seconds())})"


def apply_records_ttl(client: Client, settings: Settings) -> None:
    """Sets, changes or removes usage_records' TTL to match the setting. Parts already written get it as they are
    merged (`materialize_ttl_after_modify` off: no rewrite of the whole table at start-up)."""
    [[create]] = client.query(
        "SELECT create_table_query FROM system.tables WHERE database = currentDatabase() AND name = 'usage_records'"
    ).result_rows
    wanted = records_ttl(settings.records_ttl)
    has = _TTL.search(create)
    if wanted is None and has is None:
        return
    if has is not None and wanted is not None and has[1].replace(" ", "") == wanted.replace(" ", ""):
        return
    change = "REMOVE TTL" if wanted is None else f"MODIFY TTL {wanted}"
    client.command(
        render(f"ALTER TABLE usage_records {{on_cluster}} {change}", settings.clickhouse_cluster),
        settings={"materialize_ttl_after_modify": 0},
    )
