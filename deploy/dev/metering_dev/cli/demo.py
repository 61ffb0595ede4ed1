"""`metering demo`: the local stack, a worker and synthetic usage, end to end (the README's first command)."""

from __future__ import annotations

import asyncio
import time

import click

from metering_dev.cli.stack import stack_up
from metering_dev.settings import StackSettings
from metering_pipeline import tables
from metering_pipeline.settings import Settings


@click.command()
@click.option("--records", type=int, default=20_000, show_default=True, help="Synthetic usage records to publish.")
@click.pass_context
def demo(ctx: click.Context, records: int) -> None:
    """Stack up, define metrics, run a worker, publish synthetic usage, print the rollups from ClickHouse."""
    from metering_dev import demo as run
    from metering_dev.stack.local import LocalStack
    from metering_pipeline.worker.app import prepare

    settings: Settings = ctx.obj
    stack_dir = StackSettings().stack_dir
    ctx.invoke(stack_up)
    state = LocalStack(stack_dir).state()
    if state is not None and state.broker == "tansu":  # no producer ids or transactions there
        settings = settings.model_copy(update={"processing_guarantee": "at_least_once"})
    prepare(settings)
    asyncio.run(run.define_metrics(settings, run.DEMO_METRICS))
    click.echo(f"defined metrics: {', '.join(m.key for m in run.DEMO_METRICS)}; starting a worker...")
    worker = run.start_worker(settings, stack_dir / "logs" / "demo-worker.log")
    try:
        seed = int(time.time())
        sample = run.sample_records(records, seed)
        with click.progressbar(length=len(sample), label="publishing usage.recorded") as bar:
            asyncio.run(run.publish(settings, sample, bar.update))
        counted = run.wait_until_counted(settings, seed, len(sample))
        click.echo(f"{counted} of {len(sample)} records rolled up; this month's rollups in ClickHouse (usage_summary):")
        rows = [
            (metric, subject, tables.decimal_text(total), count)
            for metric, subject, total, count in run.monthly_rollups(settings)
        ]
        click.echo(tables.render(["metric", "subject", "total", "records"], rows))
        click.echo("Query it yourself: metering summary --metric llm_tokens --subject org:org-1 --period HOURLY")
    except KeyboardInterrupt:
        click.echo("interrupted; stopping the worker")
    finally:
        worker.stop()
