"""`metering demo`: the whole product on one machine in a minute.

Brings the local stack up, defines three metrics, runs a worker, publishes synthetic usage
with a progress bar, then prints the rollups it reads back from ClickHouse.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

from aiokafka import AIOKafkaProducer

from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_pipeline.warehouse.client import connect
from metering_pipeline.worker.process import WorkerProcess
from metering_schemas import AggregationType, MetricDefinition, ResetPeriod, UsageRecord

DEMO_METRICS = [
    MetricDefinition(id="api_calls", key="api_calls", name="API calls", unit="calls",
                     aggregation_type=AggregationType.COUNT, reset_period=ResetPeriod.MONTHLY),
    MetricDefinition(id="llm_tokens", key="llm_tokens", name="LLM tokens", unit="tokens",
                     aggregation_type=AggregationType.SUM, reset_period=ResetPeriod.MONTHLY),
    MetricDefinition(id="storage_gb", key="storage_gb", name="Storage (peak)", unit="GB",
                     aggregation_type=AggregationType.MAX, reset_period=ResetPeriod.DAILY),
]


def sample_records(count: int, seed: int = 1) -> list[UsageRecord]:
    """Deterministic sample usage: a few orgs calling APIs, spending tokens and storing data over the last day."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    quantity: dict[str, Callable[[], Decimal]] = {
        "api_calls": lambda: Decimal(1),
        "llm_tokens": lambda: Decimal(rng.randint(10, 4000)),
        "storage_gb": lambda: Decimal(rng.randint(100, 50_000)) / 100,
    }
    return [
        UsageRecord(
            id=f"demo-{seed}-{n}",
            metric_key=(metric := rng.choice(sorted(quantity))),
            subject_type="org",
            subject_id=f"org-{rng.randint(1, 5)}",
            quantity=quantity[metric](),
            timestamp=now - timedelta(seconds=rng.randint(0, 86_400)),
        )
        for n in range(count)
    ]


async def define_metrics(settings: Settings, metrics: list[MetricDefinition]) -> None:
    producer = AIOKafkaProducer(**settings.kafka_client_options(), acks="all")
    await producer.start()
    try:
        for metric in metrics:
            await producer.send_and_wait(Topics.of(settings).metrics, metric.to_json(), key=metric.id.encode())
    finally:
        await producer.stop()


async def publish(settings: Settings, records: list[UsageRecord], progress: Callable[[int], None]) -> None:
    """One record per message, keyed by subject, as most producers send them."""
    producer = AIOKafkaProducer(**settings.kafka_client_options(), acks="all", linger_ms=5)
    await producer.start()
    try:
        topic = Topics.of(settings).usage_recorded
        for start in range(0, len(records), 500):
            chunk = records[start:start + 500]
            sends = [await producer.send(topic, r.to_json(), key=f"{r.subject_type}:{r.subject_id}".encode()) for r in chunk]
            await asyncio.gather(*sends)
            progress(len(chunk))
    finally:
        await producer.stop()


def wait_until_counted(settings: Settings, seed: int, expected: int, timeout: float = 120) -> int:
    """Poll ClickHouse until every published record is in usage_records (or time runs out)."""
    deadline = time.monotonic() + timeout
    counted = 0
    with connect(settings) as client:
        while time.monotonic() < deadline:
            counted = client.query(
                "SELECT count() FROM usage_records FINAL WHERE startsWith(id, {prefix:String})",
                parameters={"prefix": f"demo-{seed}-"},
            ).result_rows[0][0]
            if counted >= expected:
                break
            time.sleep(0.5)
    return counted


def monthly_rollups(settings: Settings) -> list[tuple]:
    with connect(settings) as client:
        return client.query(
            "SELECT metric_key, subject_type || ':' || subject_id, total_quantity, record_count FROM usage_summary "
            "WHERE period_type = {period:String} AND period_start = toStartOfMonth(now('UTC')) "
            "ORDER BY metric_key, subject_id",
            parameters={"period": "MONTHLY"},
        ).result_rows


def start_worker(settings: Settings, log_path: Path, at_least_once: bool) -> WorkerProcess:
    env = {"METERING_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "METERING_CLICKHOUSE_URL": settings.clickhouse_url}
    if at_least_once:
        env["METERING_PROCESSING_GUARANTEE"] = "at_least_once"
    worker = WorkerProcess(env, log_path).start()
    worker.wait_healthy()
    return worker
