"""`metering worker`: run one worker process (scale out by running more in the same group)."""

from __future__ import annotations

import click

from metering_pipeline.settings import Settings


@click.command()
@click.option("--web-port", type=int, default=6066, show_default=True, help="Port of /health and /metrics.")
@click.option("--flush-interval", type=float, default=None, help="Seconds between checkpoints. [env: METERING_FLUSH_INTERVAL]")
@click.option("--processing-guarantee", type=click.Choice(["exactly_once", "at_least_once"]), default=None,
              help="exactly_once needs Kafka transactions (Apache Kafka); tansu needs at_least_once. [env: METERING_PROCESSING_GUARANTEE]")
@click.option("--partitions", type=int, default=None, help="Partitions of topics the worker creates. [env: METERING_USAGE_PARTITIONS]")
@click.option("--loglevel", default="info", show_default=True, type=click.Choice(["crit", "error", "warn", "info", "debug"]))
@click.pass_obj
def worker(settings: Settings, web_port: int, flush_interval: float | None, processing_guarantee: str | None,
           partitions: int | None, loglevel: str) -> None:
    """Consume usage.recorded, roll it up exactly once into ClickHouse, publish usage.aggregated."""
    from faust.worker import Worker

    from metering_pipeline.worker.app import create_app, prepare

    overrides = {
        "flush_interval": flush_interval,
        "processing_guarantee": processing_guarantee,
        "usage_partitions": partitions,
    }
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    prepare(settings)
    app = create_app(settings, web_port)
    Worker(app, loglevel=loglevel, quiet=True).execute_from_commandline()
