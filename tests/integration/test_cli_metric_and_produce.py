"""`metering metric ...` and `metering produce` against the real broker, worker and ClickHouse endpoint."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

from metering_pipeline.cli import main
from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.queries import usage_summaries
from metering_schemas import PeriodType
from support import eventually, settings_env

pytestmark = pytest.mark.integration


def cli(settings, *args: str, stdin: str | None = None):
    return CliRunner().invoke(main, list(args), env=settings_env(settings), input=stdin, catch_exceptions=False)


def test_metric_commands_define_update_get_list_and_delete(pipeline):
    settings, _ = pipeline
    defined = cli(
        settings,
        "metric",
        "define",
        "--key",
        "api_calls",
        "--name",
        "API calls",
        "--aggregation",
        "count",
        "--reset-period",
        "monthly",
        "--unit",
        "calls",
    )
    assert defined.exit_code == 0, defined.output
    assert "api_calls" in defined.stdout and "COUNT" in defined.stdout and "MONTHLY" in defined.stdout

    again = cli(settings, "metric", "define", "--key", "api_calls", "--name", "Again", "--aggregation", "sum")
    assert again.exit_code == 2 and "already defined" in again.stderr

    scoped = cli(
        settings, "metric", "define", "--key", "tokens", "--name", "Tokens", "--aggregation", "SUM", "--org-id", "org-1"
    )
    assert scoped.exit_code == 0, scoped.output
    assert cli(settings, "metric", "update", "api_calls", "--name", "API requests").exit_code == 0

    listed = [json.loads(line) for line in cli(settings, "metric", "list", "--json").stdout.splitlines()]
    assert {d["id"]: (d["name"], d["aggregationType"], d["orgId"]) for d in listed} == {
        "api_calls": ("API requests", "COUNT", None),
        "org-1:tokens": ("Tokens", "SUM", "org-1"),
    }
    assert json.loads(cli(settings, "metric", "get", "tokens", "--json").stdout)["id"] == "org-1:tokens"

    assert cli(settings, "metric", "delete", "tokens").exit_code == 0
    assert [json.loads(line)["id"] for line in cli(settings, "metric", "list", "--json").stdout.splitlines()] == [
        "api_calls"
    ]
    missing = cli(settings, "metric", "get", "tokens")
    assert missing.exit_code == 2 and "no metric definition" in missing.stderr

    invalid = cli(settings, "metric", "define", "--key", "bad key", "--name", "x", "--aggregation", "sum")
    assert invalid.exit_code == 2 and "key:" in invalid.stderr


def hourly_total(settings, hour: datetime, expected_count: int, timeout: float = 60) -> tuple[Decimal, int]:
    with connect(settings) as client:

        def counted() -> tuple[Decimal, int]:
            rows = usage_summaries(client, "tokens", "org", "org-1", PeriodType.HOURLY, hour, hour + timedelta(hours=1))
            assert rows and rows[0].record_count >= expected_count, rows
            return rows[0].total_quantity, rows[0].record_count

        return eventually(counted, timeout)


def test_produce_from_flags_and_json_lines_is_counted_exactly_and_bad_lines_are_reported(pipeline):
    settings, new_worker = pipeline
    assert (
        cli(settings, "metric", "define", "--key", "tokens", "--name", "Tokens", "--aggregation", "sum").exit_code == 0
    )
    worker = new_worker().start()
    worker.wait_healthy()
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    at = (hour + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S")

    flags = cli(
        settings,
        "produce",
        "--metric",
        "tokens",
        "--subject",
        "org:org-1",
        "--quantity",
        "0.1",
        "--count",
        "3",
        "--timestamp",
        at,
    )
    assert flags.exit_code == 0, flags.output
    assert flags.stdout.splitlines()[2].split()[:2] == ["3", "0"]

    good = {"metricKey": "tokens", "subjectType": "org", "subjectId": "org-1", "timestamp": at + "Z"}
    lines = [
        json.dumps({**good, "id": "f-1"})[:-1] + ', "quantity": 12345678901234567890.123456789012345678}',
        "{not json",
        json.dumps({"metricKey": "tokens", "subjectType": "org"}),
        json.dumps({**good, "id": "f-2", "quantity": "0.000000000000000001"}),
        "",
        json.dumps({**good, "id": "f-1", "quantity": 5}),  # a replay of f-1: deduplicated by the worker
    ]
    from_file = cli(settings, "produce", "--file", "-", "--batch-size", "2", stdin="\n".join(lines) + "\n")
    assert from_file.exit_code == 1
    reported = [json.loads(line) for line in from_file.stderr.splitlines() if line.startswith('{"line"')]
    assert [r["line"] for r in reported] == [2, 3]
    assert "subjectId" in reported[1]["error"]
    assert from_file.stdout.splitlines()[2].split()[:2] == ["3", "2"]

    total, count = hourly_total(settings, hour, expected_count=5)
    assert (total, count) == (Decimal("12345678901234567890.423456789012345679"), 5)


def test_threshold_commands_create_update_list_and_delete(pipeline):
    settings, _ = pipeline
    assert (
        cli(settings, "metric", "define", "--key", "api_calls", "--name", "API", "--aggregation", "count").exit_code
        == 0
    )
    created = cli(
        settings,
        "threshold",
        "create",
        "--metric",
        "api_calls",
        "--subject",
        "org:*",
        "--threshold",
        "1000",
        "--action",
        "block",
        "--notify",
        "ops@example.com",
        "--id",
        "t1",
    )
    assert created.exit_code == 0, created.output
    assert "org:*" in created.stdout and "BLOCK" in created.stdout
    assert (
        cli(
            settings,
            "threshold",
            "create",
            "--metric",
            "api_calls",
            "--subject",
            "org:o1",
            "--threshold",
            "5",
            "--id",
            "t1",
        ).exit_code
        == 2
    )
    unknown_metric = cli(
        settings, "threshold", "create", "--metric", "nope", "--subject", "org:o1", "--threshold", "5", "--id", "t2"
    )
    assert unknown_metric.exit_code == 0 and "no metric 'nope' is defined" in unknown_metric.stderr
    bad = cli(settings, "threshold", "create", "--metric", "api_calls", "--subject", "org:o1", "--threshold", "NaN")
    assert bad.exit_code == 2 and "threshold" in bad.stderr

    assert cli(settings, "threshold", "update", "t1", "--threshold", "2500.5", "--clear-notify").exit_code == 0
    listed = {t["id"]: t for t in map(json.loads, cli(settings, "threshold", "list", "--json").stdout.splitlines())}
    assert (listed["t1"]["threshold"], listed["t1"]["notifyEmails"], listed["t1"]["action"]) == ("2500.5", [], "BLOCK")
    only_o1 = [
        json.loads(line)["id"]
        for line in cli(settings, "threshold", "list", "--subject", "org:o1", "--json").stdout.splitlines()
    ]
    assert sorted(only_o1) == ["t1", "t2"]  # t1 applies to every org

    assert cli(settings, "threshold", "delete", "t2").exit_code == 0
    assert cli(settings, "threshold", "delete", "t2").exit_code == 2
    assert [json.loads(line)["id"] for line in cli(settings, "threshold", "list", "--json").stdout.splitlines()] == [
        "t1"
    ]
