"""`metering stack up | down | status`: a real Kafka broker (or a cluster of a few) and ClickHouse endpoint on loopback.

Each data dir is one stack: its servers' pid files, logs, Kafka log dirs and ClickHouse
data live under it, and a `stack.json` records how it was started so `up` is idempotent
and `down` stops only what this data dir started. A Kafka cluster's identity (its id and
its controllers' ports) is kept in `kafka-quorum.json`, so one node restarts into it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from metering_dev.stack import apache_kafka, tansu
from metering_dev.stack.certificates import (
    CertificatesUnavailable,
    ServerCertificate,
    ensure_server_certificate,
    write_private,
)
from metering_dev.stack.processes import ManagedProcess

KAFKA = "kafka"
CLICKHOUSE = "clickhouse"
SASL_MECHANISM = "SCRAM-SHA-512"
SASL_CLIENT_ENV = "kafka-sasl.env"  # METERING_KAFKA_* of the SASL_SSL listener, password included (mode 0600)
TLS_DIR = "tls"
QUORUM_FILE = "kafka-quorum.json"


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
    # An extra SASL_SSL listener (SCRAM user and TLS certificate generated per data dir; Apache Kafka only).
    sasl_port: int | None = None
    # ClickHouse over HTTPS (with the data dir's generated certificate) instead of HTTP.
    clickhouse_tls: bool = False
    # The client ports of brokers 2..N: a KRaft cluster of 1 + len(...) nodes (Apache Kafka only).
    more_kafka_ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class StackState:
    broker: str
    kafka_port: int
    clickhouse_port: int
    kafka_version: str
    sasl_port: int | None = None
    clickhouse_tls: bool = False
    more_kafka_ports: tuple[int, ...] = ()

    @classmethod
    def of(cls, config: StackConfig) -> StackState:
        return cls(
            config.broker,
            config.kafka_port,
            config.clickhouse_port,
            config.kafka_version,
            config.sasl_port,
            config.clickhouse_tls,
            config.more_kafka_ports,
        )

    @property
    def kafka_ports(self) -> tuple[int, ...]:
        return (self.kafka_port, *self.more_kafka_ports)

    def kafka_address(self, node: int) -> str:
        return f"127.0.0.1:{self.kafka_ports[node - 1]}"

    @property
    def kafka_bootstrap(self) -> str:
        """Every broker's address, comma-separated, as clients of a cluster are given it."""
        return ",".join(self.kafka_address(node) for node in range(1, len(self.kafka_ports) + 1))

    @property
    def kafka_sasl_bootstrap(self) -> str | None:
        return f"127.0.0.1:{self.sasl_port}" if self.sasl_port else None

    @property
    def clickhouse_url(self) -> str:
        return f"{'https' if self.clickhouse_tls else 'http'}://127.0.0.1:{self.clickhouse_port}"


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

    @property
    def sasl_client_env_file(self) -> Path:
        """The METERING_KAFKA_* settings of a client of the SASL_SSL listener (`set -a; . FILE`), mode 0600."""
        return self.data_dir / SASL_CLIENT_ENV

    @property
    def ca_file(self) -> Path:
        """The CA that signed the TLS listeners' certificate: what clients must trust."""
        return self.data_dir / TLS_DIR / "ca.pem"

    def certificate(self) -> ServerCertificate:
        try:
            return ensure_server_certificate(self.data_dir / TLS_DIR)
        except CertificatesUnavailable as error:
            raise StackError(str(error)) from error

    def sasl_client_env(self) -> dict[str, str]:
        """The SASL_SSL listener's client settings as written by `up` (empty when it has none)."""
        try:
            lines = self.sasl_client_env_file.read_text().splitlines()
        except FileNotFoundError:
            return {}
        return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))

    def _sasl_user(self, kafka_dir: Path) -> apache_kafka.ScramUser:
        """The data dir's SCRAM user: created once, when the storage is formatted, and kept in the client env file."""
        known = self.sasl_client_env()
        if known.get("METERING_KAFKA_SASL_PASSWORD"):
            return apache_kafka.ScramUser(
                known["METERING_KAFKA_SASL_MECHANISM"],
                known["METERING_KAFKA_SASL_USERNAME"],
                known["METERING_KAFKA_SASL_PASSWORD"],
            )
        if apache_kafka.is_formatted(kafka_dir):
            raise StackError(
                f"the Kafka storage in {kafka_dir} was formatted without a SASL user; run `metering stack down "
                f"--data-dir {self.data_dir}` and remove {kafka_dir} (its topics go with it), or use another --data-dir"
            )
        return apache_kafka.ScramUser.generate(SASL_MECHANISM)

    def _write_sasl_client_env(self, state: StackState, user: apache_kafka.ScramUser) -> None:
        settings = {
            "METERING_KAFKA_BOOTSTRAP": state.kafka_sasl_bootstrap,
            "METERING_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "METERING_KAFKA_SASL_MECHANISM": user.mechanism,
            "METERING_KAFKA_SASL_USERNAME": user.username,
            "METERING_KAFKA_SASL_PASSWORD": user.password,
            "METERING_KAFKA_SSL_CAFILE": str(self.ca_file),
        }
        header = "# Kafka's SASL_SSL listener of this local stack: set -a; . THIS_FILE; set +a\n"
        write_private(self.sasl_client_env_file, (header + "".join(f"{k}={v}\n" for k, v in settings.items())).encode())

    def state(self) -> StackState | None:
        try:
            fields = json.loads(self._state_file.read_text())
        except FileNotFoundError:
            return None
        return StackState(**fields | {"more_kafka_ports": tuple(fields.get("more_kafka_ports", ()))})

    def kafka_node(self, node: int) -> ManagedProcess:
        """Node `node` (from 1) of the Kafka cluster; node 1 keeps the single broker's names (`kafka`)."""
        return self.kafka if node == 1 else ManagedProcess(f"{KAFKA}-{node}", self.data_dir)

    def kafka_nodes(self, state: StackState | None = None) -> list[ManagedProcess]:
        state = state or self.state()
        return [self.kafka_node(node) for node in range(1, len(state.kafka_ports) + 1 if state else 2)]

    def _quorum(self, state: StackState) -> apache_kafka.Quorum:
        """The cluster's id and controller ports: kept while any node runs (a restarted node must find the others'
        controllers where they are), chosen afresh when none does; a cluster of another size is refused."""
        nodes = self.kafka_nodes(state)
        dirs = [self.data_dir / node.name for node in nodes]
        try:
            known = json.loads((self.data_dir / QUORUM_FILE).read_text())
        except FileNotFoundError:
            known = {"cluster_id": _formatted_cluster_id(dirs[0]), "controller_ports": [0]}
        formatted = [d for d in dirs if apache_kafka.is_formatted(d)]
        if formatted and len(known["controller_ports"]) != len(nodes):
            raise StackError(
                f"the Kafka storage in {self.data_dir} belongs to a cluster of {len(known['controller_ports'])} "
                f"broker(s), not {len(nodes)}; run `metering stack down --data-dir {self.data_dir}` and remove its "
                "kafka* dirs (their topics go with them), or use another --data-dir"
            )
        if any(node.is_running() for node in nodes):
            controller_ports = tuple(known["controller_ports"])
        else:
            controller_ports = tuple(_free_port() for _ in nodes)
        quorum = apache_kafka.Quorum(
            known["cluster_id"] or apache_kafka.new_cluster_id(), state.kafka_ports, controller_ports
        )
        (self.data_dir / QUORUM_FILE).write_text(
            json.dumps({"cluster_id": quorum.cluster_id, "controller_ports": list(controller_ports)})
        )
        return quorum

    def up(self, config: StackConfig, timeout: float = 90.0) -> StackState:
        """Start whatever is not running yet and wait until both servers answer."""
        state = self.state()
        wanted = StackState.of(config)
        if state and (self.kafka.is_running() or self.clickhouse.is_running()):
            if state != wanted:
                raise StackError(
                    f"the stack in {self.data_dir} already runs as {asdict(state)}; "
                    f"run `metering stack down --data-dir {self.data_dir}` before starting it as {asdict(wanted)}"
                )
        if config.sasl_port is not None and config.broker != "apache":
            raise StackError("a SASL_SSL listener (--sasl-port) needs --broker apache; tansu has no SASL")
        if config.more_kafka_ports and (config.broker != "apache" or config.sasl_port is not None):
            raise StackError("a cluster of brokers (--brokers) needs --broker apache and no --sasl-port")
        state = wanted
        self.data_dir.mkdir(parents=True, exist_ok=True)
        certificate = self.certificate() if config.sasl_port is not None or config.clickhouse_tls else None
        self._state_file.write_text(json.dumps(asdict(state)))
        nodes = self.kafka_nodes(state)
        to_start = [
            (process, port, what)
            for process, port, what in (
                (self.clickhouse, config.clickhouse_port, "ClickHouse"),
                *(
                    (node, port, f"Kafka node {n}" if len(nodes) > 1 else "Kafka")
                    for n, (node, port) in enumerate(zip(nodes, state.kafka_ports, strict=True), 1)
                ),
                (self.kafka, config.sasl_port, "Kafka's SASL_SSL listener"),
            )
            if port is not None and not process.is_running()
        ]
        for _, port, what in to_start:
            _require_free_port(port, what)
        starting = list(dict.fromkeys(process for process, _, _ in to_start))
        quorum = self._quorum(state) if config.broker == "apache" and set(starting) & set(nodes) else None
        for process in starting:
            if process is self.clickhouse:
                command = _clickhouse_command(config, certificate)
            else:
                command = self._kafka_command(config, state, certificate, nodes.index(process) + 1, quorum)
            process.start(command)
        deadline = time.monotonic() + timeout
        self._wait(self.clickhouse, lambda: _clickhouse_answers(state.clickhouse_url, self.ca_file), deadline)
        for n, node in enumerate(nodes, 1):  # each node answers with the whole cluster in its metadata
            self._wait(node, lambda n=n: _kafka_answers(state.kafka_address(n), len(nodes)), deadline)
        if state.kafka_sasl_bootstrap:
            self._wait(self.kafka, lambda: _listens(state.kafka_sasl_bootstrap), deadline)
        return state

    def _kafka_command(
        self,
        config: StackConfig,
        state: StackState,
        certificate: ServerCertificate | None,
        node: int,
        quorum: apache_kafka.Quorum | None,
    ) -> list[str]:
        if config.broker == "tansu" or quorum is None:  # no quorum exactly when the broker is tansu
            try:
                return tansu.broker_command(config.kafka_port, self.data_dir)
            except tansu.TansuUnavailable as error:
                raise StackError(str(error)) from error
        kafka_dir = self.data_dir / self.kafka_node(node).name
        sasl, users = None, ()
        if config.sasl_port is not None and certificate is not None:
            user = self._sasl_user(kafka_dir)
            self._write_sasl_client_env(state, user)
            sasl, users = apache_kafka.SaslListener(config.sasl_port, user.mechanism, certificate), (user,)
        try:
            jar_dir = apache_kafka.resolve_jars(config.cache_dir, config.kafka_version)
            apache_kafka.write_config(kafka_dir, quorum, node, sasl)
            apache_kafka.format_storage(jar_dir, kafka_dir, quorum.cluster_id, users)
        except apache_kafka.KafkaUnavailable as error:
            raise StackError(str(error)) from error
        return apache_kafka.broker_command(jar_dir, kafka_dir, config.kafka_heap)

    def down(self) -> list[str]:
        """Stop this data dir's servers; returns the names of those that were running."""
        stopped = [p.name for p in (*self.kafka_nodes(), self.clickhouse) if p.stop()]
        return stopped

    def status(self) -> list[ServiceStatus]:
        """One row per listener; the SASL_SSL one names its mechanism and user, never the password."""
        state = self.state()
        sasl = []
        if state and state.kafka_sasl_bootstrap:
            user = self.sasl_client_env().get("METERING_KAFKA_SASL_USERNAME", "?")
            sasl.append(
                ServiceStatus(
                    name="kafka (sasl_ssl)",
                    running=self.kafka.is_running(),
                    pid=self.kafka.pid(),
                    address=f"{state.kafka_sasl_bootstrap} SASL_SSL {SASL_MECHANISM} user={user}",
                    log_file=self.kafka.log_file,
                )
            )
        kafka = [
            ServiceStatus(
                name=f"{node.name} ({state.broker})" if state else node.name,
                running=node.is_running(),
                pid=node.pid(),
                address=state.kafka_address(n) if state else "-",
                log_file=node.log_file,
            )
            for n, node in enumerate(self.kafka_nodes(state), 1)
        ]
        return [
            *kafka,
            *sasl,
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


def _clickhouse_command(config: StackConfig, certificate: ServerCertificate | None) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "metering_dev.clickhouse_endpoint",
        "--host",
        "127.0.0.1",
        "--port",
        str(config.clickhouse_port),
        "--data-dir",
        str(config.data_dir.expanduser().resolve() / CLICKHOUSE),
    ]
    if config.clickhouse_tls and certificate is not None:
        command += ["--tls-cert", str(certificate.cert_file), "--tls-key", str(certificate.key_file)]
    return command


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


def _clickhouse_answers(url: str, ca_file: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca_file)) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2, context=context) as response:
            return response.status == 200
    except OSError:
        return False


def _listens(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def _formatted_cluster_id(kafka_dir: Path) -> str | None:
    """The cluster id a log dir was formatted with (a data dir from before `kafka-quorum.json` existed)."""
    try:
        lines = (kafka_dir / "data" / "meta.properties").read_text().splitlines()
    except FileNotFoundError:
        return None
    return dict(line.split("=", 1) for line in lines if "=" in line).get("cluster.id")


def _kafka_answers(address: str, brokers: int) -> bool:
    """True once the broker at `address` serves metadata naming `brokers` brokers (listening is not enough)."""
    from aiokafka.admin import AIOKafkaAdminClient

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=address, request_timeout_ms=3000)
        try:
            await admin.start()
            cluster = await admin.describe_cluster()
            return len(cluster.get("brokers") or ()) >= brokers
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False
        finally:
            await admin.close()

    return asyncio.run(probe())
