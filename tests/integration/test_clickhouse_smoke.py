"""clickhouse-connect against the stack's ClickHouse endpoint, as the product's code uses it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.migrations import applied_versions, migrate
from metering_pipeline.warehouse.sink import RECORD_COLUMNS

pytestmark = pytest.mark.integration


@pytest.fixture
def client(apache_stack, unique_name):
    settings = apache_stack.settings(clickhouse_database=unique_name)
    with connect(settings, database="default") as admin:
        admin.command(f"CREATE DATABASE {unique_name}")
    with connect(settings) as client:
        yield client
    with connect(settings, database="default") as admin:
        admin.command(f"DROP DATABASE {unique_name}")


def test_native_insert_and_parameterized_select_keep_decimals_exact(client):
    client.command(
        "CREATE TABLE usage (subject String, ts DateTime64(3, 'UTC'), quantity Decimal(38, 18)) "
        "ENGINE = MergeTree ORDER BY (subject, ts)"
    )
    at = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    rows = [["org-1", at, Decimal("0.1")], ["org-1", at, Decimal("0.2")], ["org-2", at, Decimal("5")]]
    client.insert("usage", rows, column_names=["subject", "ts", "quantity"])

    result = client.query(
        "SELECT sum(quantity), count() FROM usage WHERE subject = {subject:String} AND ts >= {since:DateTime64(3)}",
        parameters={"subject": "org-1", "since": at},
    )
    assert result.result_rows == [(Decimal("0.3"), 2)]


def test_engine_errors_reach_the_client_as_database_errors_with_clickhouse_codes(client):
    with pytest.raises(DatabaseError, match="Code: 60"):
        client.query("SELECT * FROM no_such_table")


def test_migrations_apply_once_in_order(apache_stack, unique_name, tmp_path):
    (tmp_path / "0001_events.sql").write_text(
        "CREATE TABLE events (id String) ENGINE = MergeTree ORDER BY id;\nINSERT INTO events VALUES ('first');\n"
    )
    (tmp_path / "0002_more.sql").write_text("ALTER TABLE events ADD COLUMN n UInt8 DEFAULT 7;\n")
    settings = apache_stack.settings(clickhouse_database=unique_name)
    try:
        assert [m.version for m in migrate(settings, tmp_path)] == [1, 2]
        assert migrate(settings, tmp_path) == []
        with connect(settings) as client:
            assert applied_versions(client) == {1, 2}
            assert client.query("SELECT id, n FROM events").result_rows == [("first", 7)]
    finally:
        with connect(settings, database="default") as admin:
            admin.command(f"DROP DATABASE IF EXISTS {unique_name}")


def test_records_ttl_follows_the_setting_and_drops_raw_records_past_it(apache_stack, unique_name):
    settings = apache_stack.settings(clickhouse_database=unique_name)

    def table_ttl() -> str:
        with connect(settings) as client:
            [[create]] = client.query(
                "SELECT create_table_query FROM system.tables WHERE database = currentDatabase() "
                "AND name = 'usage_records'"
            ).result_rows
        return create

    try:
        migrate(settings.model_copy(update={"records_ttl": timedelta(days=70)}))
        assert "TTL toDateTime(timestamp) + toIntervalSecond(6048000)" in table_ttl()
        now = datetime.now(UTC)
        with connect(settings) as client:
            client.insert(
                "usage_records",
                [
                    ["org", "o1", "tokens", "old", now - timedelta(days=71), Decimal("1"), "{}", "tokens", {}, ""],
                    ["org", "o1", "tokens", "new", now - timedelta(days=69), Decimal("2"), "{}", "tokens", {}, ""],
                ],
                column_names=RECORD_COLUMNS,
            )
            client.command("OPTIMIZE TABLE usage_records FINAL")
            kept = {row[0] for row in client.query("SELECT id FROM usage_records").result_rows}
        assert kept == {"new"}

        migrate(settings.model_copy(update={"records_ttl": timedelta(days=90)}))
        assert "toIntervalSecond(7776000)" in table_ttl()
        migrate(settings)  # unset: kept again
        assert " TTL " not in table_ttl()
    finally:
        with connect(settings, database="default") as admin:
            admin.command(f"DROP DATABASE IF EXISTS {unique_name}")
