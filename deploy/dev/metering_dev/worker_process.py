"""A `metering worker` child process: what the demo, the tests and the benchmark start, kill and restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from metering_pipeline.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """The METERING_* variables that make a worker (or CLI) process use these settings: how it reaches Kafka and
    ClickHouse, credentials and certificates included, and what it is isolated by (topic and group prefixes,
    database)."""
    optional = (
        ("METERING_KAFKA_SASL_MECHANISM", settings.kafka_sasl_mechanism),
        ("METERING_KAFKA_SASL_USERNAME", settings.kafka_sasl_username),
        (
            "METERING_KAFKA_SASL_PASSWORD",
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None,
        ),
        ("METERING_KAFKA_SSL_CAFILE", settings.kafka_ssl_cafile),
        ("METERING_CLICKHOUSE_CA_CERT", settings.clickhouse_ca_cert),
    )
    return {
        "METERING_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "METERING_KAFKA_SECURITY_PROTOCOL": settings.kafka_security_protocol,
        "METERING_CLICKHOUSE_URL": settings.clickhouse_url,
        "METERING_CLICKHOUSE_USER": settings.clickhouse_user,
        "METERING_CLICKHOUSE_PASSWORD": settings.clickhouse_password.get_secret_value(),
        "METERING_TOPIC_PREFIX": settings.topic_prefix,
        "METERING_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
        "METERING_CLICKHOUSE_DATABASE": settings.clickhouse_database,
        "METERING_USAGE_PARTITIONS": str(settings.usage_partitions),
        "METERING_REPLICATION_FACTOR": str(settings.replication_factor),
        "METERING_PROCESSING_GUARANTEE": settings.processing_guarantee,
        "METERING_FLUSH_INTERVAL": str(settings.flush_interval),
        **{name: str(value) for name, value in optional if value is not None},
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class WorkerProcess:
    """One worker process. Its METERING_STATE_DIR is `state_dir`; None: start() makes a fresh directory beside the
    log (so the many workers of a test or bench run on one machine never share a store) and keeps it in `state_dir`,
    for a `WorkerProcess(..., state_dir=old.state_dir)` that restarts on the same state. A METERING_STATE_DIR in `env`
    wins over both."""

    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    web_port: int = field(default_factory=free_port)
    state_dir: Path | None = None

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if "METERING_STATE_DIR" in self.env:
            self.state_dir = Path(self.env["METERING_STATE_DIR"])
        elif self.state_dir is None:
            self.state_dir = self.log_path.parent / f"state-{self.web_port}-{time.time_ns()}"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "metering_pipeline.cli",
                    "worker",
                    "--web-port",
                    str(self.web_port),
                    "--loglevel",
                    "warn",
                ],
                env={
                    **os.environ,
                    "METERING_WORKER_URL": self.url,
                    "METERING_STATE_DIR": str(self.state_dir),
                    **self.env,
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def wait_healthy(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"worker exited; its log ends with:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"worker not healthy after {timeout}s; its log ends with:\n{self.log_tail()}")

    def health(self) -> tuple[int, dict]:
        """/health's status and body (liveness): 200 {"healthy": true}, or 503 with the reason."""
        return self.probe("/health")

    def ready(self) -> tuple[int, dict]:
        """/ready's status and body (readiness): 200 {"ready": true, ...}, or 503 with what it waits for."""
        return self.probe("/ready")

    def probe(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=2) as response:
            return response.read().decode()

    def kill(self) -> None:
        """SIGKILL: no checkpoint, no goodbye, like a crashed machine."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM: the worker checkpoints and leaves its groups."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except FileNotFoundError:
            return ""
