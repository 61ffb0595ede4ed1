"""`metering demo`: the whole product on one machine in a minute.

Brings the local stack up, defines three metrics, runs a worker, publishes synthetic usage
with a progress bar, then prints the rollups it reads back from ClickHouse.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from metering_dev.worker_process import WorkerProcess, settings_env
from metering_pipeline.definitions import DefinitionWriter
from metering_pipeline.producer import UsageProducer
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_pipeline.warehouse.client import connect
from metering_schemas import AggregationType, MetricDefinition, ResetPeriod, UsageRecord

DEMO_METRICS = [
    MetricDefinition(
        id="api_calls",
        key="api_calls",
        name="API calls",
        unit="calls",
        aggregation_type=AggregationType.COUNT,
        reset_period=ResetPeriod.MONTHLY,
    ),
    MetricDefinition(
        id="llm_tokens",
        key="llm_tokens",
        name="LLM tokens",
        unit="tokens",
        aggregation_type=AggregationType.SUM,
        reset_period=ResetPeriod.MONTHLY,
    ),
    MetricDefinition(
        id="storage_gb",
        key="storage_gb",
        name="Storage (peak)",
        unit="GB",
        aggregation_type=AggregationType.MAX,
        reset_period=ResetPeriod.DAILY,
    ),
]


def sample_records(count: int, seed: int = 1) -> list[UsageRecord]:
    """Deterministic sample usage: a few orgs calling APIs, spending tokens and storing data over the last day."""
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(microsecond=0)
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
    async with DefinitionWriter(settings, Topics.of(settings).metrics) as writer:
        for metric in metrics:
            await writer.put(metric.id, metric)


async def publish(settings: Settings, records: list[UsageRecord], progress: Callable[[int], None]) -> None:
    """One record per message, keyed by subject, as most producers send them."""
    async with UsageProducer(settings) as producer:
        await producer.publish(records, progress=progress)


def wait_until_counted(settings: Settings, seed: int, expected: int, timeout: float = 120) -> int:
    """Poll ClickHouse until every published record is in usage_records and this month's rollups have
    caught up with them (rollups are written after the records' checkpoint commits), or time runs out."""
    deadline = time.monotonic() + timeout
    counted = 0
    with connect(settings) as client:
        while time.monotonic() < deadline:
            counted, this_month, rolled_up = client.query(
                "SELECT (SELECT count() FROM usage_records FINAL WHERE startsWith(id, {prefix:String})), "
                "(SELECT count() FROM usage_records FINAL WHERE timestamp >= toStartOfMonth(now('UTC'))), "
                "(SELECT sum(record_count) FROM usage_summary WHERE period_type = 'MONTHLY' "
                # Total rows: dimension rows repeat them.
                "AND period_start = toStartOfMonth(now('UTC')) AND empty(dimensions) AND time_zone = 'UTC')",
                parameters={"prefix": f"demo-{seed}-"},
            ).result_rows[0]
            if counted >= expected and rolled_up >= this_month:
                break
            time.sleep(0.5)
    return counted


def monthly_rollups(settings: Settings) -> list[tuple]:
    with connect(settings) as client:
        return client.query(
            "SELECT metric_key, subject_type || ':' || subject_id, total_quantity, record_count FROM usage_summary "
            "WHERE period_type = {period:String} AND period_start = toStartOfMonth(now('UTC')) AND empty(dimensions) "
            "AND time_zone = 'UTC' "
            "ORDER BY metric_key, subject_id",
            parameters={"period": "MONTHLY"},
        ).result_rows


def start_worker(settings: Settings, log_path: Path) -> WorkerProcess:
    worker = WorkerProcess(settings_env(settings), log_path).start()
    worker.wait_healthy()
    return worker
