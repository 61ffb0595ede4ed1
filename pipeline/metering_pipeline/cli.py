"""The `metering` command: local stack, ClickHouse migrations, demo."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from metering_pipeline import logs, tables
from metering_pipeline.settings import Settings
from metering_pipeline.stack.local import LocalStack, StackConfig, StackError, default_broker


@click.group()
@click.option("--log-level", default="INFO", show_default=True, envvar="METERING_LOG_LEVEL")
@click.pass_context
def main(ctx: click.Context, log_level: str) -> None:
    """Usage metering: Kafka in, exact rollups in ClickHouse, threshold alerts out."""
    logs.configure(log_level)
    ctx.obj = Settings()


def _data_dir_option(function):
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Stack data dir (servers' data, logs, pid files). [default: $METERING_STACK_DIR or ~/.local/share/metering/stack]",
    )(function)


@main.group()
def stack() -> None:
    """A real Kafka broker and ClickHouse endpoint on loopback, for demo, tests and benchmarks."""


@stack.command("up")
@click.option("--broker", type=click.Choice(["apache", "tansu"]), default=None,
              help="apache: Apache Kafka from Maven Central (needs java+mvn); tansu: JVM-free, memory only. "
                   "[default: $METERING_STACK_BROKER, else apache where java and mvn exist]")
@click.option("--kafka-port", type=int, default=9092, show_default=True)
@click.option("--clickhouse-port", type=int, default=8123, show_default=True)
@_data_dir_option
@click.pass_obj
def stack_up(settings: Settings, broker: str | None, kafka_port: int, clickhouse_port: int, data_dir: Path | None) -> None:
    """Start the stack (idempotent) and wait until Kafka and ClickHouse answer."""
    config = StackConfig(
        data_dir=data_dir or settings.stack_dir,
        broker=broker or settings.stack_broker or default_broker(),
        kafka_port=kafka_port,
        clickhouse_port=clickhouse_port,
        kafka_version=settings.kafka_version,
        kafka_heap=settings.stack_kafka_heap,
        cache_dir=settings.cache_dir,
    )
    try:
        state = LocalStack(config.data_dir).up(config)
    except StackError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"Kafka ({state.broker}) bootstrap: {state.kafka_bootstrap}")
    click.echo(f"ClickHouse URL:             {state.clickhouse_url}")
    click.echo(f"export METERING_KAFKA_BOOTSTRAP={state.kafka_bootstrap} METERING_CLICKHOUSE_URL={state.clickhouse_url}")


@stack.command("down")
@_data_dir_option
@click.pass_obj
def stack_down(settings: Settings, data_dir: Path | None) -> None:
    """Stop the servers this data dir started (and nothing else)."""
    stopped = LocalStack(data_dir or settings.stack_dir).down()
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@stack.command("status")
@_data_dir_option
@click.pass_obj
def stack_status(settings: Settings, data_dir: Path | None) -> None:
    """Tell what runs, where, and where its log is; exits 1 unless everything runs."""
    services = LocalStack(data_dir or settings.stack_dir).status()
    rows = [(s.name, "running" if s.running else "stopped", s.pid or "-", s.address, s.log_file) for s in services]
    click.echo(tables.render(["service", "state", "pid", "address", "log"], rows))
    sys.exit(0 if all(s.running for s in services) else 1)


@main.command()
@click.pass_obj
def migrate(settings: Settings) -> None:
    """Create the ClickHouse database and apply pending schema migrations."""
    from metering_pipeline.warehouse.migrations import migrate as apply_migrations

    applied = apply_migrations(settings)
    if applied:
        click.echo(tables.render(["version", "migration"], [(m.version, m.name) for m in applied]))
    else:
        click.echo(f"database {settings.clickhouse_database} is up to date")


@main.command()
@click.option("--records", type=int, default=1000, show_default=True, help="Sample usage records to publish.")
@click.pass_context
def demo(ctx: click.Context, records: int) -> None:
    """Bring the local stack up, migrate ClickHouse and publish sample usage to usage.recorded."""
    import asyncio

    from metering_pipeline.demo import publish, sample_records

    settings: Settings = ctx.obj
    ctx.invoke(stack_up)
    ctx.invoke(migrate)
    published = asyncio.run(publish(settings.kafka_client_options(), sample_records(records)))
    rows = [(metric, subject, count) for (metric, subject), count in sorted(published.items())]
    click.echo(tables.render(["metric", "subject", "records published"], rows))


if __name__ == "__main__":
    main()
