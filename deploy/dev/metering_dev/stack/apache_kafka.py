"""Apache Kafka brokers in KRaft mode (one, or a cluster of a few on loopback), resolved from Maven Central.

Apache's download site is not reachable from our machines, but Maven Central is: the
broker is `kafka.Kafka` from `org.apache.kafka:kafka_2.13` and its dependencies, copied
once into a cache outside the repository and started with a generated server.properties.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from metering_dev.stack.certificates import ServerCertificate

# deploy/kafka/pom.xml, symlinked beside this module.
KAFKA_POM = Path(__file__).resolve().parent / "kafka-pom.xml"

_COMPLETE_MARKER = ".complete"


class KafkaUnavailable(RuntimeError):
    """Apache Kafka cannot be run here (no java/mvn, or the jars did not resolve)."""


def java_and_maven_available() -> bool:
    return shutil.which("java") is not None and shutil.which("mvn") is not None


def resolve_jars(cache_dir: Path, version: str) -> Path:
    """Copy the broker's jars into ``cache_dir/kafka-<version>`` unless already there."""
    jar_dir = cache_dir / f"kafka-{version}"
    if (jar_dir / _COMPLETE_MARKER).exists():
        return jar_dir
    if not java_and_maven_available():
        raise KafkaUnavailable("Apache Kafka needs java and mvn on PATH; use --broker tansu without them")
    jar_dir.mkdir(parents=True, exist_ok=True)
    command = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(KAFKA_POM),
        "dependency:copy-dependencies",
        f"-Dkafka.version={version}",
        f"-DoutputDirectory={jar_dir}",
        "-DincludeScope=runtime",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise KafkaUnavailable(
            f"mvn could not resolve Kafka {version}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    (jar_dir / _COMPLETE_MARKER).write_text(version)
    return jar_dir


SCRAM_ITERATIONS = 8192


@dataclass(frozen=True)
class ScramUser:
    """A SCRAM user of the SASL_SSL listener (created in the metadata log when the storage is formatted)."""

    mechanism: str  # SCRAM-SHA-256 | SCRAM-SHA-512
    username: str
    password: str

    @classmethod
    def generate(cls, mechanism: str = "SCRAM-SHA-512", username: str = "metering") -> ScramUser:
        return cls(mechanism, username, secrets.token_urlsafe(24))

    def storage_argument(self) -> str:
        """`--add-scram` with a salted password, so the clear password is never on a command line (ps)."""
        salt = secrets.token_bytes(16)
        digest = "sha512" if self.mechanism.endswith("512") else "sha256"
        salted = hashlib.pbkdf2_hmac(digest, self.password.encode(), salt, SCRAM_ITERATIONS)
        return (
            f"{self.mechanism}=[name={self.username},iterations={SCRAM_ITERATIONS},"
            f'salt="{base64.b64encode(salt).decode()}",saltedpassword="{base64.b64encode(salted).decode()}"]'
        )


@dataclass(frozen=True)
class SaslListener:
    """An extra SASL_SSL listener for clients; the inter-broker and controller listeners stay PLAINTEXT on loopback."""

    port: int
    mechanism: str
    certificate: ServerCertificate


@dataclass(frozen=True)
class Quorum:
    """The nodes of a local KRaft cluster, each broker and controller at once: node i (from 1) serves clients on
    ``client_ports[i-1]`` and votes on ``controller_ports[i-1]``; all of them are formatted with ``cluster_id``."""

    cluster_id: str
    client_ports: tuple[int, ...]
    controller_ports: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.client_ports)

    @property
    def voters(self) -> str:
        return ",".join(f"{node}@127.0.0.1:{port}" for node, port in enumerate(self.controller_ports, 1))


def write_config(kafka_dir: Path, quorum: Quorum, node_id: int = 1, sasl: SaslListener | None = None) -> Path:
    """server.properties for node `node_id` of `quorum` on loopback, sized for one machine.

    Kafka's own topics (offsets, transactions) are replicated to every node, up to three, with a min ISR one
    below; the product's topics get their replication and min ISR from the product's settings, never from here."""
    kafka_dir.mkdir(parents=True, exist_ok=True)
    port, controller_port = quorum.client_ports[node_id - 1], quorum.controller_ports[node_id - 1]
    listeners = [f"PLAINTEXT://127.0.0.1:{port}", f"CONTROLLER://127.0.0.1:{controller_port}"]
    advertised = [f"PLAINTEXT://127.0.0.1:{port}"]
    if sasl is not None:
        listeners.append(f"SASL_SSL://127.0.0.1:{sasl.port}")
        advertised.append(f"SASL_SSL://127.0.0.1:{sasl.port}")
    replicas = min(quorum.size, 3)
    min_isr = str(max(1, replicas - 1))
    properties = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "controller.quorum.voters": quorum.voters,
        "listeners": ",".join(listeners),
        "advertised.listeners": ",".join(advertised),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
        "log.dirs": str(kafka_dir / "data"),
        "num.partitions": "4",
        "default.replication.factor": str(replicas),
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": str(replicas),
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": str(replicas),
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": "8",
        "share.coordinator.state.topic.replication.factor": str(replicas),
        "share.coordinator.state.topic.min.isr": min_isr,
        "group.initial.rebalance.delay.ms": "0",
        "log.segment.bytes": str(64 * 1024 * 1024),
    }
    if sasl is not None:
        prefix = "listener.name.sasl_ssl."
        properties |= {
            f"{prefix}sasl.enabled.mechanisms": sasl.mechanism,
            f"{prefix}{sasl.mechanism.lower()}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            f"{prefix}ssl.keystore.type": "PEM",
            f"{prefix}ssl.keystore.location": str(sasl.certificate.keystore_file),
            f"{prefix}ssl.client.auth": "none",
        }
    config = kafka_dir / "server.properties"
    config.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    log_config = kafka_dir / "log4j2.properties"
    log_config.write_text(
        "status = warn\n"
        "appender.console.type = Console\n"
        "appender.console.name = STDOUT\n"
        "appender.console.layout.type = PatternLayout\n"
        "appender.console.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = INFO\n"
        "rootLogger.appenderRef.console.ref = STDOUT\n"
        "logger.controller.name = org.apache.kafka.controller\n"
        "logger.controller.level = WARN\n"
        "logger.coordinator.name = org.apache.kafka.coordinator\n"
        "logger.coordinator.level = WARN\n"
    )
    return config


def _java(jar_dir: Path, heap: str, kafka_dir: Path) -> list[str]:
    return [
        "java",
        f"-Xms{heap}",
        f"-Xmx{heap}",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={kafka_dir / 'log4j2.properties'}",
        "-cp",
        f"{jar_dir}/*",
    ]


def new_cluster_id() -> str:
    """A KRaft cluster id (URL-safe base64 of a UUID); like Kafka's own, never starting with '-',
    which the storage tool's argument parser would read as an option."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def is_formatted(kafka_dir: Path) -> bool:
    return (kafka_dir / "data" / "meta.properties").exists()


def format_storage(jar_dir: Path, kafka_dir: Path, cluster_id: str, scram_users: tuple[ScramUser, ...] = ()) -> None:
    """Format the KRaft log dir once; a formatted dir keeps its cluster id (and SCRAM users) across restarts."""
    if is_formatted(kafka_dir):
        return
    command = [
        *_java(jar_dir, "256m", kafka_dir),
        "kafka.tools.StorageTool",
        "format",
        "-t",
        cluster_id,
        "-c",
        str(kafka_dir / "server.properties"),
        "--ignore-formatted",
    ]
    for user in scram_users:
        command += ["--add-scram", user.storage_argument()]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise KafkaUnavailable(f"kafka-storage format failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def broker_command(jar_dir: Path, kafka_dir: Path, heap: str) -> list[str]:
    return [*_java(jar_dir, heap, kafka_dir), "kafka.Kafka", str(kafka_dir / "server.properties")]
