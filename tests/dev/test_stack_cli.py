"""`metering stack up | status | down` as a user runs them (real processes, tansu for speed)."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from support import free_port

pytestmark = pytest.mark.integration


def metering(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metering_pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "METERING_LOG_LEVEL": "WARNING"},
    )


def test_stack_up_is_idempotent_status_reports_and_down_stops_only_its_own(tmp_path):
    kafka_port, clickhouse_port = free_port(), free_port()
    ports = ["--kafka-port", str(kafka_port), "--clickhouse-port", str(clickhouse_port)]
    data_dir = ["--data-dir", str(tmp_path / "stack")]
    other_dir = ["--data-dir", str(tmp_path / "other")]
    try:
        first = metering("stack", "up", "--broker", "tansu", *ports, *data_dir)
        assert first.returncode == 0, first.stderr
        assert f"127.0.0.1:{kafka_port}" in first.stdout
        assert f"http://127.0.0.1:{clickhouse_port}" in first.stdout
        status = metering("stack", "status", *data_dir)
        assert status.returncode == 0
        pids = [line.split()[3] for line in status.stdout.splitlines()[2:]]

        again = metering("stack", "up", "--broker", "tansu", *ports, *data_dir)
        assert again.returncode == 0, again.stderr
        assert [line.split()[3] for line in metering("stack", "status", *data_dir).stdout.splitlines()[2:]] == pids

        # Another data dir does not own these servers: nothing to stop there, they keep running.
        assert "nothing was running" in metering("stack", "down", *other_dir).stdout
        with socket.create_connection(("127.0.0.1", kafka_port), timeout=2):
            pass
    finally:
        down = metering("stack", "down", *data_dir)
    assert "kafka" in down.stdout and "clickhouse" in down.stdout
    stopped = metering("stack", "status", *data_dir)
    assert stopped.returncode == 1
    assert "stopped" in stopped.stdout and "running" not in stopped.stdout


def test_stack_up_on_a_taken_port_fails_with_a_clear_message(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = metering(
            "stack",
            "up",
            "--broker",
            "tansu",
            "--kafka-port",
            str(port),
            "--clickhouse-port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "stack"),
        )
    metering("stack", "down", "--data-dir", str(tmp_path / "stack"))
    assert result.returncode != 0
    assert f"port {port} for Kafka is taken" in result.stderr


def test_stack_up_serves_clickhouse_over_https_with_its_own_ca_and_refuses_sasl_on_tansu(tmp_path):
    clickhouse_port = free_port()
    data_dir = tmp_path / "stack"
    ports = ["--kafka-port", str(free_port()), "--clickhouse-port", str(clickhouse_port), "--data-dir", str(data_dir)]
    refused = metering("stack", "up", "--broker", "tansu", "--sasl-port", str(free_port()), *ports)
    assert refused.returncode == 1 and "needs --broker apache" in refused.stderr, refused.stderr
    try:
        up = metering("stack", "up", "--broker", "tansu", "--clickhouse-tls", *ports)
        assert up.returncode == 0, up.stderr
        ca_file = data_dir / "tls" / "ca.pem"
        assert (
            f"METERING_CLICKHOUSE_URL=https://127.0.0.1:{clickhouse_port} METERING_CLICKHOUSE_CA_CERT={ca_file}"
            in up.stdout
        )
        status = metering("stack", "status", "--data-dir", str(data_dir))
        assert status.returncode == 0 and f"https://127.0.0.1:{clickhouse_port}" in status.stdout
        trusting = ssl.create_default_context(cafile=str(ca_file))
        with urllib.request.urlopen(
            f"https://127.0.0.1:{clickhouse_port}/?query=SELECT%201", context=trusting
        ) as answer:
            assert answer.read() == b"1\n"
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"https://127.0.0.1:{clickhouse_port}/ping", context=ssl.create_default_context())
    finally:
        metering("stack", "down", "--data-dir", str(data_dir))
