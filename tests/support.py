"""Helpers the integration tests share (real clients against the local stack)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from metering_dev import worker_process
from metering_dev.bench.state_phases import metric as metric_value
from metering_dev.worker_process import WorkerProcess, free_port
from metering_pipeline.api.keys import KeyRing
from metering_pipeline.topics import Topics, router_group

__all__ = [
    "FIXED_SEED",
    "PARTITIONS",
    "ClickHouseEndpoint",
    "WorkerProcess",
    "create_topics",
    "define",
    "delete_threshold",
    "eventually",
    "free_port",
    "metric",
    "publish",
    "read_json",
    "running_api",
    "set_thresholds",
    "settings_env",
    "threshold",
    "usage",
    "while_running",
]

PARTITIONS = 4  # of the usage topics in worker tests: enough to spread over two workers
# Property tests against running processes use a fixed seed, so a CI run is reproducible;
# METERING_FUZZ_RANDOM=1 explores new inputs on every run.
FIXED_SEED = os.environ.get("METERING_FUZZ_RANDOM") != "1"


T = TypeVar("T")


def eventually(
    condition: Callable[[], T], timeout: float, interval: float = 0.3, message: str | Callable[[], str] = ""
) -> T:
    """Call `condition()` every `interval` seconds until it returns a truthy value, and return that value.

    The condition is called at least once. An AssertionError it raises counts as "not yet" (so a condition may
    assert, and its message says what still differs); any other exception, such as `while_running`'s failure,
    ends the wait and the test at once. When `timeout` seconds have passed, the test fails with an AssertionError
    that gives `message` (a string, or a function that gives it then, e.g. a log's tail) and the condition's last
    value or assertion. In an async test, wait in a thread: `await asyncio.to_thread(eventually, condition, 30)`.
    """
    deadline = time.monotonic() + timeout
    while True:
        value: T | None = None
        failed: AssertionError | None = None
        try:
            value = condition()
        except AssertionError as error:
            failed = error
        if value:
            return value
        if time.monotonic() >= deadline:
            said = message() if callable(message) else message
            last = f"{type(failed).__name__}: {failed}" if failed is not None else repr(value)
            raise AssertionError(f"{said or 'condition not met'} after {timeout:g} s; last: {last}") from failed
        time.sleep(interval)


def while_running(worker: WorkerProcess, condition: Callable[[], T]) -> Callable[[], T]:
    """`condition` for `eventually`, failing the test at once (with the worker's log) when it does not hold (or raises)
    and the worker has exited, instead of waiting out the timeout for a worker that is gone."""

    def checked() -> T:
        held = False
        try:
            value = condition()
            held = bool(value)
            return value
        finally:
            if not held and worker.process.poll() is not None:
                pytest.fail(f"the worker exited with status {worker.process.returncode}:\n{worker.log_tail()}")

    return checked


def settings_env(settings) -> dict[str, str]:
    """The METERING_* variables that make a worker or CLI process use these (isolated) settings."""
    # Killed workers leave their groups within seconds, so the fault tests stay short.
    return worker_process.settings_env(settings) | {"METERING_KAFKA_SESSION_TIMEOUT": "10"}


async def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names])
    finally:
        await admin.close()


def metric(
    metric_id: str, aggregation: str, org_id: str | None = None, key: str | None = None, reset: str = "MONTHLY"
) -> dict:
    return {
        "id": metric_id,
        "key": key or metric_id,
        "name": metric_id,
        "aggregationType": aggregation,
        "resetPeriod": reset,
        "orgId": org_id,
    }


def threshold(
    threshold_id: str, metric_key: str, subject: str, limit: str, action: str = "ALERT", emails: tuple[str, ...] = ()
) -> dict:
    subject_type, subject_id = subject.split(":", 1)
    return {
        "id": threshold_id,
        "metricKey": metric_key,
        "subjectType": subject_type,
        "subjectId": subject_id,
        "threshold": limit,
        "action": action,
        "notifyEmails": list(emails),
    }


async def set_thresholds(settings, *thresholds: dict) -> None:
    await publish(
        settings, [(t["id"].encode(), orjson.dumps(t), None) for t in thresholds], Topics.of(settings).thresholds
    )


async def delete_threshold(settings, threshold_id: str) -> None:
    await publish(settings, [(threshold_id.encode(), None, None)], Topics.of(settings).thresholds)


def usage(
    record_id: str, metric_key: str, subject: str, quantity: str = "1", at: datetime | None = None
) -> tuple[bytes, bytes, None]:
    """One usage.recorded message (key, value, partition) as a producer would send it."""
    subject_type, subject_id = subject.split(":", 1)
    record = {
        "id": record_id,
        "metricKey": metric_key,
        "subjectType": subject_type,
        "subjectId": subject_id,
        "quantity": quantity,
    }
    if at is not None:
        record["timestamp"] = at.isoformat()
    return subject.encode(), orjson.dumps(record), None


async def publish(settings, messages: list[tuple[bytes | None, bytes, int | None]], topic: str | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        sends = [
            await producer.send(topic or Topics.of(settings).usage_recorded, value, key=key, partition=partition)
            for key, value, partition in messages
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def define(settings, *definitions: dict) -> None:
    await publish(
        settings, [(d["id"].encode(), orjson.dumps(d), None) for d in definitions], Topics.of(settings).metrics
    )


async def read_json(bootstrap: str, topic: str, count: int, timeout: float = 60, settle: float = 0) -> list[dict]:
    """The topic's first `count` JSON values (from the beginning); with `settle`, also whatever arrives in that many
    more seconds."""
    return [json.loads(value) for value in await read_values(bootstrap, topic, count, timeout, settle)]


async def read_values(bootstrap: str, topic: str, count: int, timeout: float = 60, settle: float = 0) -> list[bytes]:
    """`read_json`'s values as the bytes on the topic."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", isolation_level="read_committed"
    )  # as the product's consumers read
    await consumer.start()
    found: list[bytes] = []
    try:
        async with asyncio.timeout(timeout):
            while len(found) < count:
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    found.extend(m.value for m in messages)
        if settle:
            await asyncio.sleep(settle)
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                found.extend(m.value for m in messages)
    finally:
        await consumer.stop()
    return found


@dataclass
class Api:
    url: str
    keys: dict[str, str]  # admin (read, write), reader (read), org1 (read, write for org-1)
    settings: object

    def client(self, key: str | None = "admin") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@contextmanager
def running_api(settings, workdir: Path, extra_env: dict[str, str] | None = None) -> Iterator[Api]:
    """A `metering api` process on a free port with three keys, until the block ends."""
    ring = KeyRing(workdir / "keys.jsonl")
    keys = {
        "admin": ring.add("admin", ["read", "write"], None),
        "reader": ring.add("reader", ["read"], None),
        "org1": ring.add("org1", ["read", "write"], "org-1"),
    }
    port = free_port()
    env = {
        **os.environ,
        **settings_env(settings),
        "METERING_API_KEYS_FILE": str(workdir / "keys.jsonl"),
        **(extra_env or {}),
    }
    with (workdir / "api.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "metering_pipeline.cli", "api", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            pytest.fail(f"`metering api` exited:\n{(workdir / 'api.log').read_text()[-3000:]}")
        return False

    try:
        eventually(
            healthy, 60, message=lambda: f"`metering api` not healthy:\n{(workdir / 'api.log').read_text()[-3000:]}"
        )
        yield Api(url, keys, settings)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a failure of its own, without leaving the process behind
            process.kill()
            process.wait()
            pytest.fail("`metering api` did not exit within 30 s of SIGTERM")


class ClickHouseEndpoint:
    """A private ClickHouse endpoint process, so a test can stop it or require credentials without touching the shared
    stack."""

    def __init__(self, data_dir: Path, log: Path, user: str | None = None, password: str | None = None) -> None:
        self.port = free_port()
        self.credentials = [] if user is None else ["--user", user, "--password", password or ""]
        self.data_dir = data_dir
        self.log = log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ClickHouseEndpoint:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "metering_dev.clickhouse_endpoint",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                    "--log-level",
                    "WARNING",
                    *self.credentials,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def answering() -> bool:
            if self.answers():
                return True
            if self.process.poll() is not None:
                pytest.fail(f"the ClickHouse endpoint exited:\n{self.log.read_text()[-2000:]}")
            return False

        eventually(
            answering, 60, message=lambda: f"the ClickHouse endpoint does not answer:\n{self.log.read_text()[-2000:]}"
        )
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


@contextmanager
def headless_chromium(profile: Path) -> Iterator[Any]:
    """A headless Chromium (selenium WebDriver) for the dashboard tests, quit when the block ends."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def summary_rows(settings, metric_keys: Sequence[str]) -> dict[tuple, tuple[Decimal, int]]:
    """These metrics' usage_summary: (metric, subject id, period, start, sorted dimension pairs) -> (total, count)."""
    from metering_pipeline.warehouse.client import connect

    with connect(settings) as client:
        rows = client.query(
            "SELECT metric_key, subject_id, period_type, period_start, dimensions, total_quantity, "
            "record_count FROM usage_summary WHERE metric_key IN {keys:Array(String)}",
            parameters={"keys": list(metric_keys)},
        ).result_rows
    return {
        (m, s, p, start, tuple(sorted(d.items()))): (Decimal(total), count) for m, s, p, start, d, total, count in rows
    }


def worker_metric(worker, name: str) -> float:
    """A counter or gauge of the worker's /metrics (a counter by its name without `_total`)."""
    found = metric_value(worker.metrics(), name)
    assert found is not None, f"{name} not in /metrics"
    return found


async def routing_progress(settings) -> tuple[int, int]:
    """Messages in the routed topic, and messages of usage.recorded the router has not committed yet."""
    topics = Topics.of(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(router_group(settings))
        ends = {}
        for described in await admin.describe_topics([topics.routed, topics.usage_recorded]):
            topic = described["topic"]
            ends[topic] = await consumer.end_offsets(
                [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
            )
    finally:
        await consumer.stop()
        await admin.close()
    routed = sum(ends[topics.routed].values())
    unrouted = sum(
        end - (committed[tp].offset if tp in committed else 0) for tp, end in ends[topics.usage_recorded].items()
    )
    return routed, unrouted
