"""Credentials: a ClickHouse endpoint that requires a user and password is reached by every client
of the product (migrations, the worker's sink, the CLI), and the password never shows in their output."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from support import ClickHouseEndpoint, define, metric, publish, settings_env, usage

from metering_pipeline.warehouse.client import connect

pytestmark = pytest.mark.integration


def test_clickhouse_credentials_reach_every_client_and_the_password_never_shows(apache_stack, isolated, unique_name,
                                                                                 tmp_path):
    secret = f"pw-{os.urandom(8).hex()}"
    endpoint = ClickHouseEndpoint(tmp_path / "clickhouse", tmp_path / "clickhouse.log", "metering", secret).start()
    stack = dataclasses.replace(apache_stack, clickhouse_url=endpoint.url, clickhouse_user="metering",
                                clickhouse_password=secret)
    try:
        with isolated(stack, unique_name, tmp_path) as (settings, new_worker):  # migrations ran with the credentials
            asyncio.run(define(settings, metric("tokens", "SUM")))
            worker = new_worker().start()
            worker.wait_healthy()
            asyncio.run(publish(settings, [usage(f"r{n}", "tokens", "org:o1", "2.5") for n in range(10)]))
            deadline = time.monotonic() + 60
            with connect(settings) as client:
                while client.query("SELECT count() FROM usage_records FINAL").result_rows[0][0] < 10:
                    assert time.monotonic() < deadline, worker.log_tail()
                    time.sleep(0.3)

            env = {**os.environ, **settings_env(settings)}
            summary = subprocess.run([sys.executable, "-m", "metering_pipeline.cli", "summary", "--metric", "tokens",
                                      "--subject", "org:o1", "--period", "MONTHLY"], env=env, capture_output=True,
                                     text=True, timeout=60)
            assert summary.returncode == 0 and "25" in summary.stdout, summary.stderr

            wrong = subprocess.run([sys.executable, "-m", "metering_pipeline.cli", "summary", "--metric", "tokens",
                                    "--subject", "org:o1"], env={**env, "METERING_CLICKHOUSE_PASSWORD": secret + "x"},
                                   capture_output=True, text=True, timeout=60)
            assert wrong.returncode != 0 and "Authentication failed" in wrong.stdout + wrong.stderr
            with urllib.request.urlopen(f"{worker.url}/metrics", timeout=5) as response:
                metrics_text = response.read().decode()
            for output in (wrong.stdout, wrong.stderr, summary.stdout, summary.stderr, worker.log_tail(10**7), metrics_text):
                assert secret not in output
    finally:
        endpoint.stop()
