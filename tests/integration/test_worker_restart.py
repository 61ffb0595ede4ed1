"""A worker restarted under the same METERING_KAFKA_GROUP_INSTANCE_ID takes its partitions back at once.

Without it, a SIGKILLed worker's partitions wait for its Kafka session to time out (METERING_KAFKA_SESSION_TIMEOUT)
before any worker counts or alerts for them, whatever ClickHouse does; as a static member, its successor is given
them as soon as it joins."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest

from metering_pipeline.topics import Topics
from metering_pipeline.warehouse.client import connect
from support import (
    define,
    eventually,
    metric,
    publish,
    read_json,
    set_thresholds,
    summary_rows,
    threshold,
    usage,
    while_running,
)

pytestmark = pytest.mark.integration

SESSION_TIMEOUT = "45"  # seconds: a takeover that waited for it could not pass the test


def _stored(settings) -> int:
    with connect(settings) as client:
        [[count]] = client.query("SELECT count() FROM usage_records FINAL WHERE metric_key = 'tokens'").result_rows
    return int(count)


def test_a_worker_restarted_under_its_instance_id_counts_and_alerts_without_waiting_for_the_session(pipeline):
    settings, new_worker = pipeline
    asyncio.run(define(settings, metric("tokens", "SUM")))
    asyncio.run(set_thresholds(settings, threshold("cap", "tokens", "org:loud", "5")))
    static = {"METERING_KAFKA_GROUP_INSTANCE_ID": "worker-a", "METERING_KAFKA_SESSION_TIMEOUT": SESSION_TIMEOUT}
    first = new_worker(**static).start()
    first.wait_healthy()
    asyncio.run(publish(settings, [usage(f"r{n}", "tokens", f"org:o{n % 20}", "0.5") for n in range(300)]))
    # State to restore: the successor reads it back from the changelog.
    eventually(while_running(first, lambda: _stored(settings) >= 300), 60, interval=0.5, message=first.log_tail)

    first.kill()
    restarted = time.monotonic()
    successor = new_worker(**static).start()
    successor.wait_healthy()
    asyncio.run(publish(settings, [usage("loud-1", "tokens", "org:loud", "10")]))
    alerts = asyncio.run(read_json(settings.kafka_bootstrap, Topics.of(settings).alerts, 2, timeout=60))
    took = time.monotonic() - restarted
    assert sorted(a["type"] for a in alerts) == ["threshold.approaching", "threshold.exceeded"]
    assert took < 20, f"alerts {took:.1f} s after the restart: the successor waited for the old session to expire"

    def all_counted() -> tuple[Decimal, int]:
        monthly = _monthly(settings)
        assert monthly[1] >= 301, monthly  # every record once, restored state included
        return monthly

    monthly = eventually(while_running(successor, all_counted), 60, interval=0.5, message=successor.log_tail)
    assert monthly == (Decimal("0.5") * 300 + 10, 301)
    assert _stored(settings) == 301
    # Not what this test is about: a successor that took over under a static instance id often does not finish
    # its SIGTERM shutdown within 30 s (seen since a207ebf, at least; open). Killed after 5 s instead of 30.
    successor.stop(timeout=5)


def _monthly(settings) -> tuple[Decimal, int]:
    """The sum and record count of the `tokens` monthly total rows of every subject."""
    rows = [value for key, value in summary_rows(settings, ["tokens"]).items() if key[2] == "MONTHLY" and not key[4]]
    return sum((total for total, _ in rows), Decimal(0)), sum(count for _, count in rows)
