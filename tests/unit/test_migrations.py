"""Reading migration files: statement splitting and file naming (no I/O beyond tmp files)."""

from __future__ import annotations

import pytest

from metering_pipeline.warehouse.migrations import load, split_statements


def test_statements_split_on_line_ending_semicolons_and_drop_comment_lines():
    sql = (
        "-- a comment;\nCREATE TABLE a (x String DEFAULT ';')\nENGINE = Memory;\n\n"
        "CREATE TABLE b (y UInt8) ENGINE = Memory;\n"
    )
    assert split_statements(sql) == (
        "CREATE TABLE a (x String DEFAULT ';')\nENGINE = Memory",
        "CREATE TABLE b (y UInt8) ENGINE = Memory",
    )


def test_migrations_load_in_version_order(tmp_path):
    (tmp_path / "0002_second.sql").write_text("SELECT 2;")
    (tmp_path / "0001_first.sql").write_text("SELECT 1;")
    assert [(m.version, m.name) for m in load(tmp_path)] == [(1, "first"), (2, "second")]


@pytest.mark.parametrize("bad_name", ["1_short.sql", "0001-dash.sql", "0001_Upper.sql"])
def test_badly_named_migration_files_are_refused(tmp_path, bad_name):
    (tmp_path / bad_name).write_text("SELECT 1;")
    with pytest.raises(ValueError, match="0001_name.sql"):
        load(tmp_path)


def test_duplicate_versions_are_refused(tmp_path):
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="duplicate"):
        load(tmp_path)


def test_cluster_placeholders_render_on_cluster_and_replicated_engines():
    from metering_pipeline.warehouse.migrations import render

    statement = "CREATE TABLE t {on_cluster} (x UInt8) ENGINE = {replicated}ReplacingMergeTree ORDER BY x"
    assert render(statement, None) == "CREATE TABLE t  (x UInt8) ENGINE = ReplacingMergeTree ORDER BY x"
    assert render(statement, "metering_cluster") == (
        "CREATE TABLE t ON CLUSTER `metering_cluster` (x UInt8) ENGINE = ReplicatedReplacingMergeTree ORDER BY x"
    )
    with pytest.raises(ValueError):
        render(statement, "bad name; DROP")


def test_shipped_migrations_use_the_cluster_placeholders_for_every_table():
    from metering_pipeline.resources import clickhouse_migrations_dir

    for migration in load(clickhouse_migrations_dir()):
        for statement in migration.statements:
            if statement.startswith("CREATE"):
                assert "{on_cluster}" in statement, statement
            if "MergeTree" in statement:
                assert "{replicated}" in statement, statement
