"""Session fixtures: the real local stack (Apache Kafka or tansu, plus the chdb ClickHouse endpoint).

Started once per test session in a temporary data dir on free loopback ports, unless
METERING_KAFKA_BOOTSTRAP and METERING_CLICKHOUSE_URL name a running stack to use instead
(that stack's broker counts as the Apache Kafka one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from metering_dev.settings import StackSettings
from metering_dev.stack.local import LocalStack, StackConfig
from metering_pipeline.settings import Settings
from support import free_port


@dataclass(frozen=True)
class RunningStack:
    broker: str
    kafka_bootstrap: str
    clickhouse_url: str
    clickhouse_user: str = "default"
    clickhouse_password: str = ""
    clickhouse_ca_cert: str | None = None
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: str | None = None
    # The secured stack's SASL_SSL listener, whose client settings are the sasl_client_env file's
    kafka_sasl_bootstrap: str | None = None
    sasl_client_env: tuple[tuple[str, str], ...] = ()
    stack_dir: str | None = None  # the data dir of a stack the tests started (for `metering stack status`)

    def settings(self, **overrides: object) -> Settings:
        return Settings(
            **{
                "kafka_bootstrap": self.kafka_bootstrap,
                "clickhouse_url": self.clickhouse_url,
                "clickhouse_user": self.clickhouse_user,
                "clickhouse_password": self.clickhouse_password,
                "clickhouse_ca_cert": self.clickhouse_ca_cert,
                "kafka_security_protocol": self.kafka_security_protocol,
                "kafka_sasl_mechanism": self.kafka_sasl_mechanism,
                "kafka_sasl_username": self.kafka_sasl_username,
                "kafka_sasl_password": self.kafka_sasl_password,
                "kafka_ssl_cafile": self.kafka_ssl_cafile,
                **overrides,
            }
        )

    def over_sasl(self, password: str | None = None) -> RunningStack:
        """This stack with Kafka reached only through its SASL_SSL listener (optionally with another password)."""
        env = dict(self.sasl_client_env)
        assert self.kafka_sasl_bootstrap and env, "this stack has no SASL_SSL listener (use secured_stack)"
        return replace(
            self,
            kafka_bootstrap=env["METERING_KAFKA_BOOTSTRAP"],
            kafka_security_protocol=env["METERING_KAFKA_SECURITY_PROTOCOL"],
            kafka_sasl_mechanism=env["METERING_KAFKA_SASL_MECHANISM"],
            kafka_sasl_username=env["METERING_KAFKA_SASL_USERNAME"],
            kafka_sasl_password=env["METERING_KAFKA_SASL_PASSWORD"] if password is None else password,
            kafka_ssl_cafile=env["METERING_KAFKA_SSL_CAFILE"],
        )


def _start_stack(broker: str, data_dir: Path) -> tuple[LocalStack, RunningStack]:
    stack, _, running = _start_stack_with_config(broker, data_dir)
    return stack, running


def _start_stack_with_config(
    broker: str, data_dir: Path, brokers: int = 1
) -> tuple[LocalStack, StackConfig, RunningStack]:
    settings = StackSettings()
    config = StackConfig(
        data_dir=data_dir,
        broker=broker,
        kafka_port=free_port(),
        clickhouse_port=free_port(),
        kafka_version=settings.kafka_version,
        kafka_heap=settings.stack_kafka_heap,
        cache_dir=settings.cache_dir,
        more_kafka_ports=tuple(free_port() for _ in range(brokers - 1)),
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


@pytest.fixture
def private_kafka_cluster(tmp_path: Path) -> Iterator[tuple[LocalStack, StackConfig, RunningStack]]:
    """Like `private_apache_stack`, with three Kafka brokers (`metering stack up --brokers 3`): `stack.kafka_node(n)`
    is broker n's process (`kill()` it, then `stack.up(config)` restarts it on its log dir)."""
    stack, config, running = _start_stack_with_config("apache", tmp_path / "stack", brokers=3)
    try:
        yield stack, config, running
    finally:
        stack.down()


@pytest.fixture(scope="session")
def secured_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """Apache Kafka with an extra SASL_SSL listener (SCRAM-SHA-512) and ClickHouse over HTTPS only, both with
    the certificate `metering stack up --sasl-port N --clickhouse-tls` generates. `kafka_bootstrap` is the
    PLAINTEXT listener (for set-up); `over_sasl()` gives the SASL_SSL-only view."""
    settings = StackSettings()
    data_dir = tmp_path_factory.mktemp("stack-secured")
    config = StackConfig(
        data_dir=data_dir,
        broker="apache",
        kafka_port=free_port(),
        clickhouse_port=free_port(),
        kafka_version=settings.kafka_version,
        kafka_heap="384m",
        cache_dir=settings.cache_dir,
        sasl_port=free_port(),
        clickhouse_tls=True,
    )
    stack = LocalStack(data_dir)
    try:
        state = stack.up(config)
        yield RunningStack(
            "apache",
            state.kafka_bootstrap,
            state.clickhouse_url,
            clickhouse_ca_cert=str(stack.ca_file),
            kafka_sasl_bootstrap=state.kafka_sasl_bootstrap,
            sasl_client_env=tuple(stack.sasl_client_env().items()),
            stack_dir=str(data_dir),
        )
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
