"""`metering stack up | status | down` as a user runs them (real processes, tansu for speed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from support import free_port


def metering(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metering_pipeline.cli", *args],
        capture_output=True, text=True, timeout=180, env={**os.environ, "METERING_LOG_LEVEL": "WARNING"},
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
            "stack", "up", "--broker", "tansu", "--kafka-port", str(port),
            "--clickhouse-port", str(free_port()), "--data-dir", str(tmp_path / "stack"),
        )
    metering("stack", "down", "--data-dir", str(tmp_path / "stack"))
    assert result.returncode != 0
    assert f"port {port} for Kafka is taken" in result.stderr
