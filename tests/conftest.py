"""Session fixtures: the real local stack (Apache Kafka or tansu, plus the chdb ClickHouse endpoint).

Started once per test session in a temporary data dir on free loopback ports, unless
METERING_KAFKA_BOOTSTRAP and METERING_CLICKHOUSE_URL name a running stack to use instead
(that stack's broker counts as the Apache Kafka one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from metering_pipeline.settings import Settings
from metering_pipeline.stack.local import LocalStack, StackConfig
from support import free_port


@dataclass(frozen=True)
class RunningStack:
    broker: str
    kafka_bootstrap: str
    clickhouse_url: str
    clickhouse_user: str = "default"
    clickhouse_password: str = ""

    def settings(self, **overrides: object) -> Settings:
        return Settings(kafka_bootstrap=self.kafka_bootstrap, clickhouse_url=self.clickhouse_url,
                        clickhouse_user=self.clickhouse_user, clickhouse_password=self.clickhouse_password, **overrides)


def _start_stack(broker: str, data_dir: Path) -> tuple[LocalStack, RunningStack]:
    stack, _, running = _start_stack_with_config(broker, data_dir)
    return stack, running


def _start_stack_with_config(broker: str, data_dir: Path) -> tuple[LocalStack, StackConfig, RunningStack]:
    settings = Settings()
    config = StackConfig(
        data_dir=data_dir,
        broker=broker,
        kafka_port=free_port(),
        clickhouse_port=free_port(),
        kafka_version=settings.kafka_version,
        kafka_heap=settings.stack_kafka_heap,
        cache_dir=settings.cache_dir,
    )
    stack = LocalStack(data_dir)
    state = stack.up(config)
    return stack, config, RunningStack(broker, state.kafka_bootstrap, state.clickhouse_url)


def _external_stack() -> RunningStack | None:
    bootstrap = os.environ.get("METERING_KAFKA_BOOTSTRAP")
    clickhouse = os.environ.get("METERING_CLICKHOUSE_URL")
    if bootstrap and clickhouse:
        return RunningStack("apache", bootstrap, clickhouse)
    return None


@pytest.fixture(scope="session")
def apache_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    external = _external_stack()
    if external:
        yield external
        return
    stack, running = _start_stack("apache", tmp_path_factory.mktemp("stack-apache"))
    try:
        yield running
    finally:
        stack.down()


@pytest.fixture
def private_apache_stack(tmp_path: Path) -> Iterator[tuple[LocalStack, StackConfig, RunningStack]]:
    """A stack of this test's own, for faults that stop its servers (`stack.kafka.stop()`, then `stack.up(config)`)."""
    stack, config, running = _start_stack_with_config("apache", tmp_path / "stack")
    try:
        yield stack, config, running
    finally:
        stack.down()


@pytest.fixture(scope="session")
def tansu_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    stack, running = _start_stack("tansu", tmp_path_factory.mktemp("stack-tansu"))
    try:
        yield running
    finally:
        stack.down()


@pytest.fixture(params=["apache", "tansu"])
def any_stack(request: pytest.FixtureRequest) -> RunningStack:
    """For smoke tests that must pass on both brokers."""
    return request.getfixturevalue(f"{request.param}_stack")


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """Topic/table names unique per test, so tests share one stack without seeing each other's data."""
    safe = "".join(c if c.isalnum() else "_" for c in request.node.name)[:60]
    return f"t_{safe}_{os.urandom(3).hex()}"
