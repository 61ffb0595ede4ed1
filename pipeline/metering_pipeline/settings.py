"""One typed settings object for the whole product, read from ``METERING_*`` env vars.

Every adapter (Kafka producers/consumers, Faust, ClickHouse clients)
takes its connection details from here, so a deployment configures them in one place.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from metering_pipeline.webhooks.schedule import DEFAULT_SCHEDULE, parse_schedule
from metering_schemas.subject import TimeZoneName

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def _default_home() -> Path:
    return Path.home() / ".local" / "share" / "metering"


def seconds_or_iso_duration(value: object) -> object:
    """`300` or `300.5` (seconds) as well as `PT5M`, for a timedelta field: pydantic alone misreads a bare number
    string."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


_LONGEST_MONTH = timedelta(days=31)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERING_", extra="ignore")

    # Kafka
    kafka_bootstrap: str = "localhost:9092"
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    usage_partitions: int = Field(
        default=12, ge=1, description="Partitions of the usage topics when the product creates them"
    )
    replication_factor: int = Field(default=1, ge=1, description="Replication factor of topics the product creates")
    dead_letter_retention: timedelta | None = Field(
        default=None,
        description="How long usage.recorded.dlq keeps dead letters, set when the product creates it. Default: the "
        "broker's (7 days unless changed); keep them as long as someone may still replay or credit them",
    )
    usage_aggregated_retention: timedelta | None = Field(
        default=None,
        description="How long usage.aggregated keeps its events, set when the product creates it. Default: the "
        "broker's",
    )
    alerts_retention: timedelta | None = Field(
        default=None,
        description="How long metering.alerts keeps alerts, set when the product creates it (threshold_events in "
        "ClickHouse keeps them regardless). Default: the broker's",
    )
    records_ttl: timedelta | None = Field(
        default=None,
        description="How long usage_records keeps a raw record after its timestamp (a ClickHouse TTL, applied by the "
        "migrations: existing rows go as their parts merge). Rollups, summaries and FINAL invoices are kept "
        "regardless; raw records back usage.get, exports, UNIQUE_COUNT and LATEST across dimension subsets, and the "
        "invoice of a month until it is FINAL, so at least METERING_ALLOWED_LATENESS + 31 days (a month's first "
        "record lives until its invoice closes). Default: kept",
    )
    min_insync_replicas: int | None = Field(
        default=None,
        ge=1,
        description="min.insync.replicas of topics the product creates: replicas that must hold a write before it is "
        "acknowledged (every producer of the product sends with acks=all). Default: METERING_REPLICATION_FACTOR - 1, "
        "at least 1 (with 3 replicas, a write survives the loss of any one broker and one broker may be down)",
    )

    # Worker
    flush_interval: float = Field(default=1.0, gt=0, description="Seconds between checkpoints (ClickHouse freshness)")
    allowed_lateness: timedelta = Field(
        default=timedelta(days=35), description="Older records go to the DLQ as too_late"
    )
    future_skew: timedelta = Field(default=timedelta(minutes=5), description="Records further ahead go to the DLQ")
    default_time_zone: TimeZoneName = Field(
        default="UTC",
        description="The time zone of subjects that have none of their own (`PUT /v1/subjects/{type}/{id}`, `metering "
        "subject set`): the zone summaries are answered in when a query names none",
    )
    dedup_window: timedelta = Field(
        default=timedelta(hours=24), description="A record id seen within it is not counted again"
    )
    processing_guarantee: Literal["exactly_once", "at_least_once"] = Field(
        default="exactly_once", description="exactly_once needs Kafka transactions (Apache Kafka; not tansu)"
    )
    threshold_approaching_fraction: Decimal = Field(
        default=Decimal("0.8"), gt=0, lt=1, description="threshold.approaching fires at this fraction of the threshold"
    )
    publish_usage_aggregated: bool = Field(
        default=True,
        description="Publish a usage.aggregated event for every rollup a checkpoint changed (hourly, daily, monthly). "
        "Turn off where nothing consumes that topic: ClickHouse, the API, thresholds and alerts do not read it, and "
        "it costs about 7 % of a worker's CPU (measured at a steady load and on a backlog)",
    )
    worker_url: str | None = Field(
        default=None,
        description="How other workers reach this one's web server (entitlement routing); "
        "default http://<hostname>:<web port>",
    )
    max_poll_records: int = Field(default=20_000, ge=1)
    max_dimension_combinations: int = Field(
        default=1_000,
        ge=1,
        description="Dimension rows a grouped metric may have per subject and period; a record "
        "with a new combination past it is dead-lettered cardinality_limit",
    )
    max_distinct_values: int = Field(
        default=100_000,
        ge=1,
        description="Distinct values a UNIQUE_COUNT rollup may hold (per subject, period and "
        "dimension row); a record with a new value past it is dead-lettered "
        "cardinality_limit",
    )
    state_dir: Path = Field(
        default_factory=lambda: _default_home() / "state",
        description="Where a worker keeps its partitions' state on local disk (one RocksDB store per partition; "
        "a volume in production, one per worker): a restart on the same directory replays only the changelog's tail",
    )
    state_cache_mb: int = Field(
        default=256,
        ge=16,
        description="Memory for state in RAM: hot rollups and the store's block cache and write buffers; "
        "the rest of a partition's state stays on disk",
    )
    max_buffered_records: int = Field(
        default=30_000,
        ge=1,
        description="Counted records a worker holds in flight (not yet committed with their rollups in ClickHouse), "
        "most while ClickHouse is slow or down; beyond this it pauses consumption (backpressure) until writes catch "
        "up, and a checkpoint is taken as soon as a quarter of it waits for one. Also what bounds the worker's RAM "
        "beyond METERING_STATE_CACHE_MB: lower it to trade catch-up speed for memory",
    )
    publish_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds the API (`POST /v1/usage`, `/v1/usage/batch`) and `metering produce` wait for Kafka to "
        "acknowledge records before giving up: 503 `kafka_unavailable` instead of a request that hangs while too few "
        "replicas are in sync. A record not acknowledged may still be written later; a retry with the same id counts "
        "it once",
    )
    writer_unhealthy_after: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a worker's ClickHouse writer may keep failing (retrying) before "
        "/ready answers 503 (/health, the liveness probe, stays 200): long enough for a ClickHouse restart, short "
        "enough to page",
    )
    kafka_session_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds without a heartbeat before a worker's consumers leave their groups "
        "(aiokafka's 10 s is easily missed by a busy worker; longer delays failover)",
    )
    kafka_group_instance_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="A name this worker keeps across restarts (its host or pod name): its router, rollup and alert "
        "archive consumers join their groups as static members, so a worker restarted under the same name takes its "
        "partitions back at once, without a rebalance, instead of after METERING_KAFKA_SESSION_TIMEOUT; a static "
        "member that stops keeps its partitions until that timeout. Unset: dynamic members",
    )
    consumer_group_prefix: str = Field(
        default="metering", description="Prefix of the worker's consumer groups and transactional ids"
    )
    topic_prefix: str = Field(default="", description="Prefix of every topic name (default none: the documented names)")

    # SMTP (threshold alert e-mails, `metering notifier`)
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_security: Literal["none", "starttls", "tls"] = Field(
        default="none", description="starttls upgrades; tls connects over TLS"
    )
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "metering@localhost"
    smtp_timeout: float = Field(default=10.0, gt=0)
    notify_max_attempts: int = Field(
        default=8, ge=1, description="Sends per (alert, address) before it is recorded as failed"
    )

    # Webhooks (`metering webhooks`)
    webhook_allow_http: bool = Field(
        default=False,
        description="Allow endpoints with http:// URLs (default: https only; for tests and local receivers)",
    )
    webhook_allow_private: bool = Field(
        default=False,
        description="Allow endpoints at private, loopback and link-local addresses, after DNS resolution too (default: "
        "refused, so a URL cannot make the sender probe the network it runs in)",
    )
    webhook_timeout: float = Field(
        default=15.0, gt=0, description="Seconds a receiver has to answer a delivery; no answer is a failed attempt"
    )
    webhook_retry_schedule: str = Field(
        default=DEFAULT_SCHEDULE,
        description="The delay before each attempt of a delivery, the first included (ms, s, m, h); once spent, the "
        "delivery has failed. The default is Standard Webhooks': at once, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h",
    )
    webhook_max_in_flight: int = Field(
        default=4,
        ge=1,
        le=100,
        description="Deliveries sent to one endpoint at a time (a slow receiver holds only these)",
    )
    webhook_max_body_bytes: int = Field(
        default=256 * 1024, ge=1024, description="The largest event body sent; a larger one fails without a request"
    )
    webhook_rotation_overlap: timedelta = Field(
        default=timedelta(hours=24),
        description="How long deliveries after a secret rotation are signed with the old secret too",
    )

    # HTTP API (`metering api`)
    api_keys_file: Path = Field(
        default_factory=lambda: _default_home() / "api-keys.jsonl",
        description="JSON lines of hashed API keys (`metering api-key create`)",
    )
    api_max_batch_records: int = Field(default=500, ge=1, le=100_000, description="Records per POST /v1/usage/batch")
    api_max_request_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Bytes of a request body; a larger one is refused with 413 before it is read",
    )

    # ClickHouse (HTTP interface)
    clickhouse_url: str = "http://localhost:8123"
    clickhouse_user: str = "default"
    clickhouse_password: SecretStr = SecretStr("")
    clickhouse_database: str = "metering"
    clickhouse_cluster: str | None = Field(
        default=None, description="Run migrations ON CLUSTER with Replicated engines"
    )
    clickhouse_verify_tls: bool = True
    clickhouse_ca_cert: Path | None = None
    clickhouse_connect_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds to open a connection to ClickHouse; also how long a starting worker "
        "tries its migrations before it starts without ClickHouse",
    )
    clickhouse_request_timeout: float = Field(
        default=60.0, gt=0, description="Seconds a ClickHouse request may go without a byte of answer"
    )

    @property
    def insync_replicas(self) -> int:
        """min.insync.replicas of the topics the product creates."""
        return self.min_insync_replicas or max(1, self.replication_factor - 1)

    @model_validator(mode="after")
    def _insync_within_replicas(self) -> Settings:
        """More in-sync replicas than replicas would refuse every write."""
        if self.min_insync_replicas is not None and self.min_insync_replicas > self.replication_factor:
            raise ValueError(
                f"METERING_MIN_INSYNC_REPLICAS ({self.min_insync_replicas}) exceeds METERING_REPLICATION_FACTOR "
                f"({self.replication_factor}): every write would be refused"
            )
        return self

    @model_validator(mode="after")
    def _records_outlive_lateness(self) -> Settings:
        """A month's raw records back its invoice until that closes, its end plus the allowed lateness."""
        if self.records_ttl is not None and self.records_ttl < self.allowed_lateness + _LONGEST_MONTH:
            raise ValueError(
                f"METERING_RECORDS_TTL ({self.records_ttl}) is shorter than METERING_ALLOWED_LATENESS "
                f"({self.allowed_lateness}) + 31 days: a month's records would expire before its invoice closes"
            )
        return self

    @model_validator(mode="after")
    def _sasl_needs_a_sasl_protocol(self) -> Settings:
        """aiokafka ignores a mechanism under PLAINTEXT/SSL while Faust would use it: refuse the ambiguity."""
        sasl_protocol = self.kafka_security_protocol.startswith("SASL_")
        if (self.kafka_sasl_mechanism is not None) != sasl_protocol:
            raise ValueError(
                "METERING_KAFKA_SASL_MECHANISM needs METERING_KAFKA_SECURITY_PROTOCOL SASL_SSL or "
                "SASL_PLAINTEXT, and those need a mechanism (got "
                f"{self.kafka_sasl_mechanism or 'no mechanism'} with {self.kafka_security_protocol})"
            )
        return self

    @field_validator(
        "allowed_lateness",
        "dedup_window",
        "dead_letter_retention",
        "usage_aggregated_retention",
        "alerts_retention",
        "records_ttl",
        "webhook_rotation_overlap",
        mode="before",
    )
    @classmethod
    def _seconds_or_iso_duration(cls, value: object) -> object:
        return seconds_or_iso_duration(value)

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _a_retry_schedule(cls, value: str) -> str:
        parse_schedule(value)  # ValueError naming the bad delay
        return value

    @property
    def webhook_delays(self) -> tuple[timedelta, ...]:
        return parse_schedule(self.webhook_retry_schedule)

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile", "clickhouse_ca_cert", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        """`METERING_KAFKA_SSL_CAFILE=` means "no file", not the current directory."""
        return None if isinstance(value, str) and not value.strip() else value

    def kafka_group_options(self) -> dict[str, object]:
        """For the worker's group consumers: heartbeats every few seconds, generous session timeout."""
        session_ms = int(self.kafka_session_timeout * 1000)
        options: dict[str, object] = {
            "session_timeout_ms": session_ms,
            "heartbeat_interval_ms": max(1000, session_ms // 10),
        }
        if self.kafka_group_instance_id is not None:
            options["group_instance_id"] = self.kafka_group_instance_id
        return options

    def kafka_client_options(self) -> dict[str, Any]:
        """Keyword arguments shared by every aiokafka client the product creates."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            options["sasl_mechanism"] = self.kafka_sasl_mechanism
            options["sasl_plain_username"] = self.kafka_sasl_username
            options["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            )
        if self.kafka_security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(
                cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None,
                certfile=str(self.kafka_ssl_certfile) if self.kafka_ssl_certfile else None,
                keyfile=str(self.kafka_ssl_keyfile) if self.kafka_ssl_keyfile else None,
            )
        return options

    def clickhouse_client_options(self) -> dict[str, Any]:
        """Keyword arguments for ``clickhouse_connect.get_client``."""
        url = urlsplit(self.clickhouse_url)
        secure = url.scheme == "https"
        options: dict[str, Any] = {
            "host": url.hostname or "localhost",
            "port": url.port or (8443 if secure else 8123),
            "interface": url.scheme or "http",
            "username": self.clickhouse_user,
            "password": self.clickhouse_password.get_secret_value(),
            "connect_timeout": self.clickhouse_connect_timeout,
            "send_receive_timeout": self.clickhouse_request_timeout,
        }
        if secure:
            options["verify"] = self.clickhouse_verify_tls
            if self.clickhouse_ca_cert:
                options["ca_cert"] = str(self.clickhouse_ca_cert)
        return options
