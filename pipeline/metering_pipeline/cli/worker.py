"""`metering worker`: run one worker process (scale out by running more in the same group)."""

from __future__ import annotations

from typing import Any

import click
from pydantic import ValidationError

from metering_pipeline.cli.params import field_errors
from metering_pipeline.settings import Settings


@click.command()
@click.option("--web-port", type=int, default=6066, show_default=True, help="Port of /health and /metrics.")
@click.option(
    "--flush-interval", type=float, default=None, help="Seconds between checkpoints. [env: METERING_FLUSH_INTERVAL]"
)
@click.option(
    "--processing-guarantee",
    type=click.Choice(["exactly_once", "at_least_once"]),
    default=None,
    help="exactly_once needs Kafka transactions (Apache Kafka); tansu needs at_least_once. "
    "[env: METERING_PROCESSING_GUARANTEE]",
)
@click.option(
    "--partitions",
    type=int,
    default=None,
    help="Partitions of topics the worker creates. [env: METERING_USAGE_PARTITIONS]",
)
@click.option(
    "--allowed-lateness", default=None, help="ISO 8601 duration or seconds, e.g. P35D. [env: METERING_ALLOWED_LATENESS]"
)
@click.option(
    "--dedup-window", default=None, help="ISO 8601 duration or seconds, e.g. PT24H. [env: METERING_DEDUP_WINDOW]"
)
@click.option(
    "--loglevel", default="info", show_default=True, type=click.Choice(["crit", "error", "warn", "info", "debug"])
)
def worker(
    web_port: int,
    flush_interval: float | None,
    processing_guarantee: str | None,
    partitions: int | None,
    allowed_lateness: str | None,
    dedup_window: str | None,
    loglevel: str,
) -> None:
    """Consume usage.recorded, roll it up exactly once into ClickHouse, publish usage.aggregated."""
    from faust.worker import Worker

    from metering_pipeline import logs
    from metering_pipeline.worker import allocator, garbage
    from metering_pipeline.worker.app import PipelineService, create_app, prepare

    logs.configure({"crit": "CRITICAL", "warn": "WARNING"}.get(loglevel, loglevel.upper()))
    garbage.tune()
    allocator.tune()

    overrides: dict[str, Any] = {
        "flush_interval": flush_interval,
        "processing_guarantee": processing_guarantee,
        "usage_partitions": partitions,
        "allowed_lateness": allowed_lateness,
        "dedup_window": dedup_window,
    }
    try:  # validated like the env vars they override
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        raise click.UsageError(field_errors(error)) from None
    prepare(settings)
    app, pipeline = create_app(settings, web_port)
    try:
        worker_ = Worker(app, PipelineService(pipeline), loglevel=loglevel, quiet=True)
        # Faust's terminal spinner, at --loglevel warn or above, lowers the root logger to DEBUG so that it can spin
        # on every record: each of aiokafka's debug lines (several per fetch and produce) was then built and handled.
        worker_.spinner = None
        worker_.execute_from_commandline()
    except SystemExit as exit_:
        # A failed stage stops the worker with SIGTERM, after which mode exits 0 like after any SIGTERM:
        # a supervisor must see the failure.
        if not exit_.code and pipeline.failure is not None:
            raise SystemExit(1) from None
        raise
