"""`metering stack up | down | status`: a real Kafka broker and ClickHouse endpoint on loopback.

Each data dir is one stack: its servers' pid files, logs, Kafka log dirs and ClickHouse
data live under it, and a `stack.json` records how it was started so `up` is idempotent
and `down` stops only what this data dir started.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from metering_pipeline.stack import apache_kafka, tansu
from metering_pipeline.stack.processes import ManagedProcess

KAFKA = "kafka"
CLICKHOUSE = "clickhouse"


class StackError(RuntimeError):
    """The local stack could not be started as asked; the message says why and what to do."""


@dataclass(frozen=True)
class StackConfig:
    data_dir: Path
    broker: str  # "apache" | "tansu"
    kafka_port: int
    clickhouse_port: int
    kafka_version: str
    kafka_heap: str
    cache_dir: Path


@dataclass(frozen=True)
class StackState:
    broker: str
    kafka_port: int
    clickhouse_port: int
    kafka_version: str

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def clickhouse_url(self) -> str:
        return f"http://127.0.0.1:{self.clickhouse_port}"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    address: str
    log_file: Path


def default_broker() -> str:
    return "apache" if apache_kafka.java_and_maven_available() else "tansu"


class LocalStack:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.kafka = ManagedProcess(KAFKA, self.data_dir)
        self.clickhouse = ManagedProcess(CLICKHOUSE, self.data_dir)

    @property
    def _state_file(self) -> Path:
        return self.data_dir / "stack.json"

    def state(self) -> StackState | None:
        try:
            return StackState(**json.loads(self._state_file.read_text()))
        except FileNotFoundError:
            return None

    def up(self, config: StackConfig, timeout: float = 90.0) -> StackState:
        """Start whatever is not running yet and wait until both servers answer."""
        state = self.state()
        if state and (self.kafka.is_running() or self.clickhouse.is_running()):
            wanted = StackState(config.broker, config.kafka_port, config.clickhouse_port, config.kafka_version)
            if state != wanted:
                raise StackError(
                    f"the stack in {self.data_dir} already runs as {asdict(state)}; "
                    f"run `metering stack down --data-dir {self.data_dir}` before starting it as {asdict(wanted)}"
                )
        state = StackState(config.broker, config.kafka_port, config.clickhouse_port, config.kafka_version)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._state_file.write_text(json.dumps(asdict(state)))
        to_start = [
            (process, port, what)
            for process, port, what in (
                (self.clickhouse, config.clickhouse_port, "ClickHouse"),
                (self.kafka, config.kafka_port, "Kafka"),
            )
            if not process.is_running()
        ]
        for _, port, what in to_start:
            _require_free_port(port, what)
        for process, _, _ in to_start:
            command = _clickhouse_command(config) if process is self.clickhouse else _kafka_command(config, self.data_dir)
            process.start(command)
        deadline = time.monotonic() + timeout
        self._wait(self.clickhouse, lambda: _clickhouse_answers(state.clickhouse_url), deadline)
        self._wait(self.kafka, lambda: _kafka_answers(state.kafka_bootstrap), deadline)
        return state

    def down(self) -> list[str]:
        """Stop this data dir's servers; returns the names of those that were running."""
        stopped = [p.name for p in (self.kafka, self.clickhouse) if p.stop()]
        return stopped

    def status(self) -> list[ServiceStatus]:
        state = self.state()
        return [
            ServiceStatus(
                name=f"kafka ({state.broker})" if state else "kafka",
                running=self.kafka.is_running(),
                pid=self.kafka.pid(),
                address=state.kafka_bootstrap if state else "-",
                log_file=self.kafka.log_file,
            ),
            ServiceStatus(
                name="clickhouse (chdb)",
                running=self.clickhouse.is_running(),
                pid=self.clickhouse.pid(),
                address=state.clickhouse_url if state else "-",
                log_file=self.clickhouse.log_file,
            ),
        ]

    @staticmethod
    def _wait(process: ManagedProcess, answers, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not process.is_running():
                raise StackError(f"{process.name} exited during start-up; its log says:\n{process.log_tail()}")
            if answers():
                return
            time.sleep(0.25)
        raise StackError(f"{process.name} did not answer in time; its log says:\n{process.log_tail()}")


def _clickhouse_command(config: StackConfig) -> list[str]:
    return [
        sys.executable, "-m", "metering_pipeline.stack.clickhouse_endpoint",
        "--host", "127.0.0.1",
        "--port", str(config.clickhouse_port),
        "--data-dir", str(config.data_dir.expanduser().resolve() / CLICKHOUSE),
    ]


def _kafka_command(config: StackConfig, data_dir: Path) -> list[str]:
    if config.broker == "tansu":
        try:
            return tansu.broker_command(config.kafka_port, data_dir)
        except tansu.TansuUnavailable as error:
            raise StackError(str(error)) from error
    try:
        jar_dir = apache_kafka.resolve_jars(config.cache_dir, config.kafka_version)
        kafka_dir = data_dir / KAFKA
        apache_kafka.write_config(kafka_dir, config.kafka_port, _free_port())
        apache_kafka.format_storage(jar_dir, kafka_dir)
    except apache_kafka.KafkaUnavailable as error:
        raise StackError(str(error)) from error
    return apache_kafka.broker_command(jar_dir, kafka_dir, config.kafka_heap)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _require_free_port(port: int, what: str) -> None:
    """Refuse a port something listens on; connections of a just-stopped server (TIME_WAIT) do not count."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as error:
            raise StackError(f"port {port} for {what} is taken by another process; choose another port") from error


def _clickhouse_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _kafka_answers(bootstrap: str) -> bool:
    """True once the broker serves metadata with itself in it (listening is not enough)."""
    from aiokafka.admin import AIOKafkaAdminClient

    host, _, port = bootstrap.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
            return bool(cluster.get("brokers"))
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False
        finally:
            await admin.close()

    return asyncio.run(probe())
