"""`metering stack up | down | status`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from metering_dev.settings import StackSettings
from metering_dev.stack.local import LocalStack, StackConfig, StackError, default_broker
from metering_pipeline import tables


def _data_dir_option(function):
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Stack data dir (servers' data, logs, pid files). "
        "[default: $METERING_STACK_DIR or ~/.local/share/metering/stack]",
    )(function)


@click.group()
def stack() -> None:
    """A real Kafka broker and ClickHouse endpoint on loopback, for demo, tests and benchmarks."""


@stack.command("up")
@click.option(
    "--broker",
    type=click.Choice(["apache", "tansu"]),
    default=None,
    help="apache: Apache Kafka from Maven Central (needs java+mvn); tansu: JVM-free, memory only. "
    "[default: $METERING_STACK_BROKER, else apache where java and mvn exist]",
)
@click.option("--kafka-port", type=int, default=9092, show_default=True, help="Port of the first broker.")
@click.option(
    "--brokers",
    type=click.IntRange(1, 9),
    default=1,
    show_default=True,
    help="Run a KRaft cluster of this many Apache Kafka brokers (each also a controller) on --kafka-port, "
    "--kafka-port+1, …; Kafka's own topics are replicated to three of them. The product's topics get their "
    "replication from METERING_REPLICATION_FACTOR (set it to 3) and their min ISR from the product.",
)
@click.option("--clickhouse-port", type=int, default=8123, show_default=True)
@click.option(
    "--sasl-port",
    type=int,
    default=None,
    help="Also serve Kafka on a SASL_SSL listener on this port (SCRAM-SHA-512; the user, its password and a "
    "TLS certificate are generated for the data dir; the client settings are written to "
    "DATA_DIR/kafka-sasl.env, mode 0600). Apache Kafka only.",
)
@click.option(
    "--clickhouse-tls",
    is_flag=True,
    default=False,
    help="Serve ClickHouse over HTTPS with the data dir's generated certificate (clients trust DATA_DIR/tls/ca.pem).",
)
@_data_dir_option
def stack_up(
    broker: str | None,
    kafka_port: int,
    clickhouse_port: int,
    data_dir: Path | None,
    sasl_port: int | None = None,
    clickhouse_tls: bool = False,
    brokers: int = 1,
) -> None:
    """Start the stack (idempotent) and wait until Kafka and ClickHouse answer."""
    settings = StackSettings()
    config = StackConfig(
        data_dir=data_dir or settings.stack_dir,
        broker=broker or settings.stack_broker or default_broker(),
        kafka_port=kafka_port,
        clickhouse_port=clickhouse_port,
        kafka_version=settings.kafka_version,
        kafka_heap=settings.stack_kafka_heap,
        cache_dir=settings.cache_dir,
        sasl_port=sasl_port,
        clickhouse_tls=clickhouse_tls,
        more_kafka_ports=tuple(range(kafka_port + 1, kafka_port + brokers)),
    )
    local = LocalStack(config.data_dir)
    try:
        state = local.up(config)
    except StackError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"Kafka ({state.broker}) bootstrap: {state.kafka_bootstrap}")
    if state.more_kafka_ports:
        click.echo(
            f"A cluster of {len(state.kafka_ports)} brokers: give clients the whole list, and the product "
            f"METERING_REPLICATION_FACTOR={min(len(state.kafka_ports), 3)}"
        )
    if state.kafka_sasl_bootstrap:
        click.echo(
            f"Kafka SASL_SSL bootstrap:   {state.kafka_sasl_bootstrap} (SCRAM-SHA-512; "
            f"client settings with the password: set -a; . {local.sasl_client_env_file}; set +a)"
        )
    click.echo(f"ClickHouse URL:             {state.clickhouse_url}")
    ca = f" METERING_CLICKHOUSE_CA_CERT={local.ca_file}" if state.clickhouse_tls else ""
    replication = f" METERING_REPLICATION_FACTOR={min(len(state.kafka_ports), 3)}" if state.more_kafka_ports else ""
    click.echo(
        f"export METERING_KAFKA_BOOTSTRAP={state.kafka_bootstrap} "
        f"METERING_CLICKHOUSE_URL={state.clickhouse_url}{ca}{replication}"
    )


@stack.command("down")
@_data_dir_option
def stack_down(data_dir: Path | None) -> None:
    """Stop the servers this data dir started (and nothing else)."""
    stopped = LocalStack(data_dir or StackSettings().stack_dir).down()
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack.command("status")
@_data_dir_option
def stack_status(data_dir: Path | None) -> None:
    """Tell what runs, where, and where its log is; exits 1 unless everything runs."""
    local = LocalStack(data_dir or StackSettings().stack_dir)
    services = local.status()
    rows = [(s.name, "running" if s.running else "stopped", s.pid or "-", s.address, s.log_file) for s in services]
    click.echo(tables.render(["service", "state", "pid", "address", "log"], rows))
    state = local.state()
    if state is not None and state.kafka_sasl_bootstrap:
        click.echo(f"SASL_SSL client settings (password included, mode 0600): {local.sasl_client_env_file}")
    if state is not None and (state.clickhouse_tls or state.kafka_sasl_bootstrap):
        click.echo(f"CA of the TLS certificates: {local.ca_file}")
    sys.exit(0 if all(s.running for s in services) else 1)
