"""Credentials: a ClickHouse endpoint that requires a user and password is reached by every client
of the product (migrations, the worker's sink, the CLI), and the password never shows in their output.
TLS: the same clients reach ClickHouse over https, verified against a CA file, and are refused without it.
(Kafka over SASL_SSL: test_kafka_sasl.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import urllib.request

import pytest

from metering_pipeline.warehouse.client import connect
from support import ClickHouseEndpoint, WorkerProcess, define, eventually, metric, publish, settings_env, usage

pytestmark = pytest.mark.integration


def _ten_records_through_worker_and_cli(
    settings, new_worker
) -> tuple[WorkerProcess, dict[str, str], subprocess.CompletedProcess]:
    """A worker counts ten records into ClickHouse and `metering summary` reads their exact total back."""
    asyncio.run(define(settings, metric("tokens", "SUM")))
    worker = new_worker().start()
    worker.wait_healthy()
    asyncio.run(publish(settings, [usage(f"r{n}", "tokens", "org:o1", "2.5") for n in range(10)]))
    with connect(settings) as client:
        eventually(
            lambda: client.query("SELECT count() FROM usage_records FINAL").result_rows[0][0] >= 10,
            60,
            message=worker.log_tail,
        )
    env = {**os.environ, **settings_env(settings)}
    summary = subprocess.run(
        [
            sys.executable,
            "-m",
            "metering_pipeline.cli",
            "summary",
            "--metric",
            "tokens",
            "--subject",
            "org:o1",
            "--period",
            "MONTHLY",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert summary.returncode == 0 and "25" in summary.stdout, summary.stderr
    return worker, env, summary


def test_clickhouse_credentials_reach_every_client_and_the_password_never_shows(
    apache_stack, isolated, unique_name, tmp_path
):
    secret = f"pw-{os.urandom(8).hex()}"
    endpoint = ClickHouseEndpoint(tmp_path / "clickhouse", tmp_path / "clickhouse.log", "metering", secret).start()
    stack = dataclasses.replace(
        apache_stack, clickhouse_url=endpoint.url, clickhouse_user="metering", clickhouse_password=secret
    )
    try:
        with isolated(stack, unique_name, tmp_path) as (settings, new_worker):  # migrations ran with the credentials
            worker, env, summary = _ten_records_through_worker_and_cli(settings, new_worker)

            wrong = subprocess.run(
                [sys.executable, "-m", "metering_pipeline.cli", "summary", "--metric", "tokens", "--subject", "org:o1"],
                env={**env, "METERING_CLICKHOUSE_PASSWORD": secret + "x"},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert wrong.returncode != 0 and "Authentication failed" in wrong.stdout + wrong.stderr
            with urllib.request.urlopen(f"{worker.url}/metrics", timeout=5) as response:
                metrics_text = response.read().decode()
            for output in (
                wrong.stdout,
                wrong.stderr,
                summary.stdout,
                summary.stderr,
                worker.log_tail(10**7),
                metrics_text,
            ):
                assert secret not in output
    finally:
        endpoint.stop()


def test_clickhouse_over_https_is_verified_with_the_stack_ca_and_refused_clearly_without_it(
    secured_stack, isolated, unique_name, tmp_path
):
    assert secured_stack.clickhouse_url.startswith("https://") and secured_stack.clickhouse_ca_cert
    with isolated(secured_stack, unique_name, tmp_path) as (settings, new_worker):  # migrations ran over https
        _, env, _ = _ten_records_through_worker_and_cli(settings, new_worker)  # the sink and the CLI over https

        # Without the CA, the same https URL is refused: one clear line from the CLI, and a worker exits.
        without_ca = {k: v for k, v in env.items() if k != "METERING_CLICKHOUSE_CA_CERT"}
        host_port = secured_stack.clickhouse_url.removeprefix("https://")
        for command in (["summary", "--metric", "tokens", "--subject", "org:o1"], ["migrate"]):
            refused = subprocess.run(
                [sys.executable, "-m", "metering_pipeline.cli", *command],
                env=without_ca,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
            assert [line for line in refused.stderr.splitlines() if line.startswith("Error:")] == [
                f"Error: ClickHouse at {host_port}: its TLS certificate is not trusted (self-signed certificate in "
                f"certificate chain); set METERING_CLICKHOUSE_CA_CERT to the CA that signed it"
            ], refused.stderr
        refused_worker = WorkerProcess(
            {k: v for k, v in without_ca.items() if k.startswith("METERING_")}, tmp_path / "refused-worker.log"
        ).start()
        assert refused_worker.process is not None and refused_worker.process.wait(timeout=60) != 0
        assert "TLS certificate is not trusted" in refused_worker.log_tail()

        # And plain HTTP to the TLS port gets nothing done.
        plain = subprocess.run(
            [sys.executable, "-m", "metering_pipeline.cli", "summary", "--metric", "tokens", "--subject", "org:o1"],
            env={**env, "METERING_CLICKHOUSE_URL": f"http://{host_port}"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plain.returncode == 1 and "Traceback" not in plain.stderr, plain.stderr
