"""`metering bench`: the benchmark (not a test): throughput, alert latency, freshness, memory."""

from __future__ import annotations

from pathlib import Path

import click

from metering_pipeline.settings import Settings


@click.command()
@click.option("--quick", is_flag=True, help="A smaller run (under a minute or two) to check the harness.")
@click.option("--records", type=int, default=None, help="Records per throughput phase. [default: 1,000,000]")
@click.option("--output", type=click.Path(path_type=Path), default=Path("bench-results.json"), show_default=True)
@click.pass_context
def bench(ctx: click.Context, quick: bool, records: int | None, output: Path) -> None:
    """Publish a workload, then measure the baseline consumer and the worker side by side on the local stack."""
    from metering_pipeline.bench.runner import Plan, render, run, write
    from metering_pipeline.cli.stack import stack_up
    from metering_pipeline.stack.local import LocalStack

    settings: Settings = ctx.obj
    ctx.invoke(stack_up)
    state = LocalStack(settings.stack_dir).state()
    if state is not None and state.broker == "tansu":
        settings = settings.model_copy(update={"processing_guarantee": "at_least_once"})
    plan = Plan.quick() if quick else Plan()
    if records:
        plan = Plan(**{**plan.__dict__, "records": records})
    summary = run(settings, plan, settings.stack_dir / "logs" / "bench", lambda text: click.echo(text, err=True))
    write(summary, output)
    click.echo(render(summary))
    click.echo(f"written to {output}")
