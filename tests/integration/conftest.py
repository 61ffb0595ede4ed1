"""Fixtures for tests that run real `metering worker` processes."""

from __future__ import annotations

import asyncio

import pytest
from support import PARTITIONS, WorkerProcess, settings_env

from metering_pipeline.topics import ensure_topics, internal_topics, public_topics
from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.migrations import migrate


@pytest.fixture
def pipeline(apache_stack, unique_name, tmp_path):
    """Settings and worker env isolated by topic prefix, group prefix and database."""
    settings = apache_stack.settings(
        topic_prefix=f"{unique_name}.",
        consumer_group_prefix=unique_name,
        clickhouse_database=unique_name,
        usage_partitions=PARTITIONS,
        flush_interval=0.5,
    )
    env = settings_env(settings)
    migrate(settings)
    asyncio.run(ensure_topics(settings, public_topics(settings) + internal_topics(settings)))
    workers: list[WorkerProcess] = []

    def new_worker() -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield settings, new_worker
    for worker in workers:
        worker.stop()
    with connect(settings, database="default") as admin:
        admin.command(f"DROP DATABASE IF EXISTS {unique_name}")
