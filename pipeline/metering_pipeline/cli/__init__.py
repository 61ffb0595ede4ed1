"""The `metering` command. Each concern's subcommands live in a module of this package."""

from __future__ import annotations

import asyncio
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import urlsplit

import click
from pydantic import ValidationError

from metering_pipeline import logs, tables
from metering_pipeline.cli.api import api, api_key
from metering_pipeline.cli.billing import invoice, plan, subscription
from metering_pipeline.cli.check import check
from metering_pipeline.cli.metric import metric
from metering_pipeline.cli.notifier import notifier
from metering_pipeline.cli.produce import produce
from metering_pipeline.cli.subject import subject
from metering_pipeline.cli.summary import summary
from metering_pipeline.cli.threshold import threshold
from metering_pipeline.cli.webhook import webhook, webhooks
from metering_pipeline.cli.worker import worker
from metering_pipeline.settings import Settings


class _Main(click.Group):
    """Servers that refuse or cannot be reached are the user's to fix: one clear line, exit 1, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from aiokafka.errors import KafkaConnectionError, KafkaError
        from clickhouse_connect.driver.exceptions import ClickHouseError

        from metering_pipeline.topics import TopicLayoutError

        try:
            return super().invoke(ctx)
        except ClickHouseError as error:
            where = urlsplit(ctx.obj.clickhouse_url) if ctx.obj else None  # never the URL's user:password part
            from metering_pipeline.warehouse.errors import untrusted_certificate

            untrusted = untrusted_certificate(error)
            cause = (
                (
                    f"its TLS certificate is not trusted ({untrusted.verify_message}); "
                    f"set METERING_CLICKHOUSE_CA_CERT to the CA that signed it"
                )
                if untrusted is not None
                else str(error)
            )
            raise click.ClickException(
                f"ClickHouse at {where.hostname}:{where.port or ''}: {cause}" if where else f"ClickHouse: {cause}"
            ) from None
        except KafkaConnectionError as error:  # aiokafka logged the cause; name it in the one line
            from metering_pipeline.kafka_errors import explain_connection_failure

            explained = explain_connection_failure(ctx.obj) if ctx.obj else None
            raise click.ClickException(
                explained or f"Kafka at {ctx.obj.kafka_bootstrap if ctx.obj else '?'}: {error}"
            ) from None
        except KafkaError as error:
            raise click.ClickException(f"Kafka at {ctx.obj.kafka_bootstrap if ctx.obj else '?'}: {error}") from None
        except TopicLayoutError as error:
            raise click.ClickException(str(error)) from None


@click.group(cls=_Main)
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    envvar="METERING_LOG_LEVEL",
    help="Of the CLI commands; `metering worker` has its own --loglevel.",
)
@click.pass_context
def main(ctx: click.Context, log_level: str) -> None:
    """Usage metering: Kafka in, exact rollups in ClickHouse, threshold alerts out."""
    logs.configure(log_level)
    try:
        ctx.obj = Settings()
    except ValidationError as error:  # a bad METERING_* variable: say which, in one line
        raise click.ClickException(f"settings: {_settings_errors(error)}") from None


def _settings_errors(error: ValidationError) -> str:
    """Per problem: the env var (fields map to METERING_<FIELD>) and the message, never the rejected value."""
    return "; ".join(
        (f"METERING_{'_'.join(str(p) for p in e['loc']).upper()}: " if e["loc"] else "") + e["msg"]
        for e in error.errors()
    )


main.add_command(worker)
main.add_command(summary)
main.add_command(metric)
main.add_command(produce)
main.add_command(threshold)
main.add_command(subject)
main.add_command(check)
main.add_command(notifier)
main.add_command(webhook)
main.add_command(webhooks)
main.add_command(api)
main.add_command(api_key)
main.add_command(plan)
main.add_command(subscription)
main.add_command(invoice)
# `metering stack`, `bench` and `demo`: development commands, registered by the development distribution (deploy/dev)
# when it is installed, as in a checkout after deploy/bootstrap.sh; the product alone does not ship them.
for _command in entry_points(group="metering.commands"):
    main.add_command(_command.load(), _command.name)


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
    """Create the product's Kafka topics that do not exist yet (partitions: METERING_USAGE_PARTITIONS; replicas:
    METERING_REPLICATION_FACTOR, of which METERING_MIN_INSYNC_REPLICAS acknowledge a write) and check the existing
    ones."""
    from metering_pipeline.topics import check_partitioning, ensure_topics, public_topics

    created = asyncio.run(ensure_topics(settings, public_topics(settings)))
    asyncio.run(check_partitioning(settings))
    click.echo(f"created: {', '.join(created)}" if created else "all topics exist")


@main.command()
@click.option("--partitions", type=click.IntRange(min=2), required=True, help="The new partition count (larger).")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds to wait for stopped workers to leave their groups  [default: METERING_KAFKA_SESSION_TIMEOUT + 5]",
)
@click.pass_obj
def repartition(settings: Settings, partitions: int, wait: float | None) -> None:
    """Grow the workers' internal topics to PARTITIONS partitions, moving each subject's state to its new partition.

    Stop every worker first; start them again once this is done (they refuse to until then). Safe to run again
    after an interruption: it finishes the move."""
    from metering_pipeline.worker.repartition import RepartitionError, repartition as grow

    try:
        moves = asyncio.run(grow(settings, partitions, settings.kafka_session_timeout + 5 if wait is None else wait))
    except RepartitionError as error:
        raise click.ClickException(str(error)) from None
    rows: list[tuple[object, int, int]] = [(m.partition, m.rerouted_records, m.moved_entries) for m in moves]
    rows.append(("total", sum(m.rerouted_records for m in moves), sum(m.moved_entries for m in moves)))
    click.echo(tables.render(["partition", "uncounted records re-routed", "state entries moved"], rows))
    click.echo(f"the internal topics have {partitions} partitions; start the workers")
