"""Kafka over SASL_SSL: `metering produce`, the API and a worker reach the broker through its SASL_SSL listener
only (SCRAM-SHA-512, certificate checked against the local stack's generated CA) and the totals in ClickHouse are
exact; a wrong password is one clear error line from the CLI and a worker that exits; the password never shows."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.queries import usage_summaries
from metering_schemas import PeriodType
from support import WorkerProcess, eventually, running_api, settings_env

pytestmark = pytest.mark.integration


def metering(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metering_pipeline.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def test_usage_flows_over_sasl_ssl_only_and_the_password_never_shows(secured_stack, isolated, unique_name, tmp_path):
    stack = secured_stack.over_sasl()
    password = stack.kafka_sasl_password
    assert password and stack.kafka_bootstrap == secured_stack.kafka_sasl_bootstrap != secured_stack.kafka_bootstrap
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with isolated(stack, unique_name, tmp_path) as (settings, new_worker):  # topics created over SASL_SSL
        env = settings_env(settings)
        assert env["METERING_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        defined = metering(env, "metric", "define", "--key", "tokens", "--name", "Tokens", "--aggregation", "sum")
        assert defined.returncode == 0, defined.stderr
        worker = new_worker().start()
        worker.wait_healthy()

        produced = metering(
            env,
            "produce",
            "--metric",
            "tokens",
            "--subject",
            "org:o1",
            "--quantity",
            "2.5",
            "--count",
            "4",
            "--timestamp",
            hour.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        assert produced.returncode == 0, produced.stderr
        with running_api(settings, tmp_path) as api, api.client() as client:
            for n in range(2):
                accepted = client.post(
                    "/v1/usage",
                    json={
                        "id": f"api-{n}",
                        "metricKey": "tokens",
                        "subjectType": "org",
                        "subjectId": "o1",
                        "quantity": "1.25",
                        "timestamp": hour.isoformat(),
                    },
                )
                assert accepted.status_code == 202, accepted.text
            api_health = client.get("/health").text
            api_metrics = client.get("/metrics").text

        sent = time.monotonic()
        with connect(settings) as clickhouse:

            def all_six() -> list:
                rows = usage_summaries(
                    clickhouse, "tokens", "org", "o1", PeriodType.HOURLY, hour, hour.replace(minute=59)
                )
                assert rows and rows[0].record_count >= 6, rows
                return rows

            rows = eventually(all_six, 40, message=worker.log_tail)
        assert [(r.total_quantity, r.record_count) for r in rows] == [(Decimal("12.5"), 6)], worker.log_tail()
        with connect(settings) as clickhouse:  # mirrored by the worker's Faust agent, which also consumes over SASL_SSL
            mirrored = eventually(
                lambda: clickhouse.query("SELECT key FROM metric_definitions FINAL").result_rows,
                sent + 60 - time.monotonic(),
                message=worker.log_tail,
            )  # within a minute of the records
        assert mirrored == [("tokens",)]
        summary = metering(env, "summary", "--metric", "tokens", "--subject", "org:o1", "--period", "HOURLY")
        assert summary.returncode == 0 and "12.5" in summary.stdout, summary.stderr

        # A wrong password: the CLI says so in one line; a worker exits instead of retrying silently.
        wrong_env = {**env, "METERING_KAFKA_SASL_PASSWORD": password + "x"}
        refused = metering(wrong_env, "produce", "--metric", "tokens", "--subject", "org:o1")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert [line.split(" refused the credentials")[0] for line in error_lines(refused)] == [
            f"Error: Kafka at {settings.kafka_bootstrap}"
        ], refused.stderr
        refused_worker = WorkerProcess(wrong_env, tmp_path / "refused-worker.log").start()
        assert refused_worker.process is not None
        assert refused_worker.process.wait(timeout=60) != 0
        assert "refused the credentials" in refused_worker.log_tail() and "Traceback" not in refused_worker.log_tail()

        status = metering({}, "stack", "status", "--data-dir", secured_stack.stack_dir)
        assert status.returncode == 0 and f"{secured_stack.kafka_sasl_bootstrap} SASL_SSL" in status.stdout, (
            status.stdout
        )
        with urllib.request.urlopen(f"{worker.url}/metrics", timeout=5) as response:
            metrics_text = response.read().decode()
        outputs = {
            "define": defined.stdout + defined.stderr,
            "produce": produced.stdout + produced.stderr,
            "summary": summary.stdout + summary.stderr,
            "refused": refused.stdout + refused.stderr,
            "status": status.stdout + status.stderr,
            "worker log": worker.log_tail(10**7),
            "refused worker log": refused_worker.log_tail(10**7),
            "worker /metrics": metrics_text,
            "api log": (tmp_path / "api.log").read_text(errors="replace"),
            "api /health": api_health,
            "api /metrics": api_metrics,
        }
        assert [name for name, text in outputs.items() if password in text] == []
