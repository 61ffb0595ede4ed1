"""`metering repartition`: the internal topics grown to more partitions with every subject's state moved along, so
that totals, de-duplication and alerts carry on exactly as if the count had always been the new one; a run stopped
midway is finished by the next."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import defaultdict
from decimal import Decimal

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

from metering_pipeline.topics import Topics
from metering_pipeline.worker.routing import subject_partition
from support import (
    PARTITIONS,
    define,
    eventually,
    metric,
    publish,
    read_json,
    routing_progress,
    set_thresholds,
    settings_env,
    summary_rows,
    threshold,
    usage,
    while_running,
)

pytestmark = pytest.mark.integration

GROWN = PARTITIONS + 3
SUBJECTS = [f"s{n}" for n in range(40)]
SESSION = {"METERING_KAFKA_SESSION_TIMEOUT": "6"}  # the killed worker leaves its groups soon: the tool waits for that


def run_repartition(settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metering_pipeline.cli", "repartition", "--partitions", str(GROWN), *args],
        env={**os.environ, **settings_env(settings), **SESSION},
        capture_output=True,
        text=True,
        timeout=180,
    )


def hourly_totals(settings) -> dict[str, tuple[Decimal, int]]:
    """Per subject: its hourly rollups summed (the test may cross an hour)."""
    totals: dict[str, tuple[Decimal, int]] = defaultdict(lambda: (Decimal(0), 0))
    for (_metric, subject, period, *_), (total, count) in summary_rows(settings, ["tokens"]).items():
        if period == "HOURLY":
            totals[subject] = (totals[subject][0] + total, totals[subject][1] + count)
    return dict(totals)


async def grow_routed_topic(settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_partitions({Topics.of(settings).routed: NewPartitions(GROWN)})
    finally:
        await admin.close()


async def partition_counts(settings) -> dict[str, int]:
    topics = Topics.of(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topics.routed, topics.rollup_changelog])
    finally:
        await admin.close()
    return {d["topic"]: len(d["partitions"]) for d in described}


@pytest.mark.slow  # about a minute: two workers' starts, a ClickHouse outage, the move
def test_repartition_moves_state_and_uncounted_records_so_totals_dedup_and_alerts_stay_exact(
    private_clickhouse_pipeline,
):
    endpoint, settings, new_worker = private_clickhouse_pipeline
    assert sum(subject_partition("org", s, PARTITIONS) != subject_partition("org", s, GROWN) for s in SUBJECTS) > 20
    asyncio.run(define(settings, metric("tokens", "SUM")))
    asyncio.run(set_thresholds(settings, threshold("cap", "tokens", "org:*", "5")))
    worker = new_worker(METERING_MAX_BUFFERED_RECORDS="20", **SESSION).start()
    worker.wait_healthy()
    # Counted and committed: two records per subject, over the threshold (approaching and exceeded, once each).
    asyncio.run(publish(settings, [usage(f"a{n}-{s}", "tokens", f"org:{s}", "3") for s in SUBJECTS for n in (1, 2)]))
    eventually(while_running(worker, lambda: hourly_totals(settings) == dict.fromkeys(SUBJECTS, (6, 2))), 60)

    refused = run_repartition(settings, "--wait", "0")
    assert refused.returncode == 1 and "stop every worker first" in refused.stderr, refused.stderr

    # Routed but never counted: ClickHouse is down, so no checkpoint commits, and the worker is killed.
    endpoint.stop()
    routed_before, _ = asyncio.run(routing_progress(settings))
    resent = [usage(f"a1-{s}", "tokens", f"org:{s}", "3") for s in SUBJECTS]  # a producer's retry: a duplicate
    asyncio.run(publish(settings, [usage(f"b-{s}", "tokens", f"org:{s}", "2") for s in SUBJECTS] + resent))
    eventually(while_running(worker, lambda: asyncio.run(routing_progress(settings))[1] == 0), 30)
    assert asyncio.run(routing_progress(settings))[0] > routed_before
    worker.kill()
    endpoint.start()
    # As a run stopped between growing the two topics leaves them: the next run finishes the move.
    asyncio.run(grow_routed_topic(settings))

    moved = run_repartition(settings)
    assert moved.returncode == 0, moved.stderr
    total = moved.stdout.splitlines()[-2].split()  # the table's last row
    assert total[0] == "total" and int(total[1]) > 0 and int(total[2]) > 0, moved.stdout
    assert asyncio.run(partition_counts(settings)) == dict.fromkeys(
        [Topics.of(settings).routed, Topics.of(settings).rollup_changelog], GROWN
    )

    successor = new_worker().start()
    successor.wait_healthy()
    # Again duplicates of what was counted before the move and of what waited in the routed topic, and one new record.
    again = [usage(f"{n}-{s}", "tokens", f"org:{s}", "9") for s in SUBJECTS for n in ("a2", "b")]
    asyncio.run(publish(settings, again + [usage(f"c-{s}", "tokens", f"org:{s}", "1") for s in SUBJECTS]))
    expected = dict.fromkeys(SUBJECTS, (Decimal(9), 4))  # 3 + 3 + 2 + 1, each record once
    eventually(while_running(successor, lambda: hourly_totals(settings) == expected), 90, message=successor.log_tail)

    alerts = asyncio.run(read_json(settings.kafka_bootstrap, Topics.of(settings).alerts, 2 * len(SUBJECTS), settle=3))
    by_subject = defaultdict(list)
    for alert in alerts:
        by_subject[alert["subjectId"]].append(alert["type"])
    assert {s: sorted(types) for s, types in by_subject.items()} == dict.fromkeys(
        SUBJECTS, ["threshold.approaching", "threshold.exceeded"]
    )  # the markers moved with their subjects: nothing alerted twice
