"""Fixtures for tests that run real `metering worker` (and `metering api`) processes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from metering_pipeline.settings import Settings
from metering_pipeline.topics import ensure_topics, internal_topics, public_topics
from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.migrations import migrate
from support import PARTITIONS, ClickHouseEndpoint, WorkerProcess, settings_env


@contextmanager
def isolated_pipeline(
    stack, name: str, log_dir: Path, **overrides: object
) -> Iterator[tuple[Settings, Callable[[], WorkerProcess]]]:
    """Settings and worker env isolated by topic prefix, group prefix and database; workers stopped after.
    `overrides` are further settings (e.g. replication_factor) for everything the pipeline runs."""
    settings = stack.settings(
        **{
            "topic_prefix": f"{name}.",
            "consumer_group_prefix": name,
            "clickhouse_database": name,
            "usage_partitions": PARTITIONS,
            "flush_interval": 0.5,
            **overrides,
        }
    )
    env = settings_env(settings)
    migrate(settings)
    asyncio.run(ensure_topics(settings, public_topics(settings) + internal_topics(settings)))
    workers: list[WorkerProcess] = []

    def new_worker(**overrides: str) -> WorkerProcess:
        """A worker of this pipeline; `overrides` are further METERING_* variables for this one."""
        worker = WorkerProcess({**env, **overrides}, log_dir / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    try:
        yield settings, new_worker
    finally:
        for worker in workers:
            worker.stop()
        with connect(settings, database="default") as admin:
            admin.command(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def pipeline(apache_stack, unique_name, tmp_path):
    with isolated_pipeline(apache_stack, unique_name, tmp_path) as running:
        yield running


@pytest.fixture(scope="module")
def module_pipeline(apache_stack, request, tmp_path_factory):
    """One isolated pipeline shared by a module's tests (for expensive set-ups such as the API)."""
    name = f"m_{request.module.__name__.rsplit('.', 1)[-1]}_{os.urandom(3).hex()}"
    with isolated_pipeline(apache_stack, name, tmp_path_factory.mktemp(name)) as running:
        yield running


@pytest.fixture
def private_clickhouse_pipeline(apache_stack, unique_name, tmp_path):
    """(endpoint, settings, new_worker): a pipeline whose ClickHouse endpoint is this test's own, so that the
    test can stop, hang or restart it (it must be answering again when the test ends)."""
    endpoint = ClickHouseEndpoint(tmp_path / "clickhouse", tmp_path / "clickhouse.log").start()
    try:
        stack = dataclasses.replace(apache_stack, clickhouse_url=endpoint.url)
        with isolated_pipeline(stack, unique_name, tmp_path) as (settings, new_worker):
            yield endpoint, settings, new_worker
    finally:
        endpoint.stop()


@pytest.fixture
def isolated():
    """`isolated_pipeline` itself, for tests that bring their own stack parts (e.g. a private ClickHouse endpoint)."""
    return isolated_pipeline
