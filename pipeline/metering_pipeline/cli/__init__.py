"""The `metering` command. Each concern's subcommands live in a module of this package."""

from __future__ import annotations

import asyncio

import click

from metering_pipeline import logs, tables
from metering_pipeline.cli.stack import stack, stack_up
from metering_pipeline.cli.worker import worker
from metering_pipeline.settings import Settings


@click.group()
@click.option("--log-level", default="INFO", show_default=True, envvar="METERING_LOG_LEVEL")
@click.pass_context
def main(ctx: click.Context, log_level: str) -> None:
    """Usage metering: Kafka in, exact rollups in ClickHouse, threshold alerts out."""
    logs.configure(log_level)
    ctx.obj = Settings()


main.add_command(stack)
main.add_command(worker)


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


@main.command("topics")
@click.pass_obj
def create_topics(settings: Settings) -> None:
    """Create the product's Kafka topics that do not exist yet (partitions: METERING_USAGE_PARTITIONS)."""
    from metering_pipeline.topics import ensure_topics, public_topics

    created = asyncio.run(ensure_topics(settings, public_topics(settings)))
    click.echo(f"created: {', '.join(created)}" if created else "all topics exist")


@main.command()
@click.option("--records", type=int, default=1000, show_default=True, help="Sample usage records to publish.")
@click.pass_context
def demo(ctx: click.Context, records: int) -> None:
    """Bring the local stack up, migrate ClickHouse and publish sample usage to usage.recorded."""
    from metering_pipeline.demo import publish, sample_records

    settings: Settings = ctx.obj
    ctx.invoke(stack_up)
    ctx.invoke(migrate)
    ctx.invoke(create_topics)
    published = asyncio.run(publish(settings.kafka_client_options(), sample_records(records)))
    rows = [(metric, subject, count) for (metric, subject), count in sorted(published.items())]
    click.echo(tables.render(["metric", "subject", "records published"], rows))
