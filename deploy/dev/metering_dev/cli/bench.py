"""`metering bench`: the benchmark (not a test): throughput, alert latency, freshness, memory; `--soak` for a long
steady run."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import click
from pydantic import TypeAdapter, ValidationError

from metering_dev.bench.runner import ALIASES, PHASES
from metering_dev.settings import StackSettings
from metering_pipeline.settings import Settings, seconds_or_iso_duration


@click.command()
@click.option("--quick", is_flag=True, help="A smaller run (under a minute or two) to check the harness.")
@click.option(
    "--records",
    type=int,
    default=None,
    help="Records per throughput phase (not history's or rebalance's). [default: 1,000,000]",
)
@click.option(
    "--history-records",
    type=click.IntRange(min=1),
    default=None,
    help="Records of the history phase; its RSS is sampled at 200,000 and halfway. More than 1M shows where memory "
    "levels off once METERING_STATE_CACHE_MB has filled. [default: 1,000,000]",
)
@click.option("--output", type=click.Path(path_type=Path), default=Path("bench-results.json"), show_default=True)
@click.option(
    "--soak",
    is_flag=True,
    help="Instead of the phases: one worker at a steady rate for --soak-minutes, sampling RSS, lag and "
    "error log lines; writes <output>-soak.json, .csv and .png beside --output.",
)
@click.option(
    "--soak-minutes",
    type=click.FloatRange(min=0.5),
    default=30.0,
    show_default=True,
    help="How long the soak publishes.",
)
@click.option(
    "--soak-rate",
    type=click.FloatRange(min=1),
    default=None,
    help="Records/s during the soak. [default: half the capacity of one worker, measured first]",
)
@click.option(
    "--soak-dedup-window",
    default=None,
    help="The soak worker's METERING_DEDUP_WINDOW (ISO 8601 duration or seconds). [default: a quarter "
    "of the soak, so identities expire before the second half whose RSS slope is judged]",
)
@click.option(
    "--hot-path",
    is_flag=True,
    help="Instead of the phases: the worker's per-record steps in this process, without Kafka or ClickHouse "
    "(µs of CPU per record per step); --records sets how many [default: 200,000].",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --hot-path: records per usage.recorded message.",
)
@click.option(
    "--steady-rate",
    type=click.FloatRange(min=1),
    default=None,
    help="Records/s of the steady phase (to compare two commits or settings at the same load). [default: half "
    "of what one worker reached in this run]",
)
@click.option(
    "--zoned-share",
    type=click.FloatRange(min=0, max=1),
    default=0.0,
    show_default=True,
    help="Share of the throughput and steady phases' subjects given a time zone other than UTC (their rollups are "
    "cut in that zone only).",
)
@click.option(
    "--phase",
    "phase_names",
    multiple=True,
    type=click.Choice(PHASES + tuple(ALIASES)),
    help="Run only these phases (repeatable): steady (one worker at half its capacity: CPU per record against its "
    "cost on a backlog, alert latency, usage_summary freshness; `latency` is its former name); history (worker "
    "RSS over 30 days of event time, restart on the same state dir, restore on a fresh one) and rebalance (a "
    "second worker joins while one partition's changelog holds "
    "millions of dedup identities; alert latency meanwhile) measure the worker's state. [default: all, in order]",
)
@click.pass_context
def bench(
    ctx: click.Context,
    quick: bool,
    records: int | None,
    history_records: int | None,
    output: Path,
    soak: bool,
    soak_minutes: float,
    soak_rate: float | None,
    soak_dedup_window: str | None,
    hot_path: bool,
    batch: int,
    steady_rate: float | None,
    zoned_share: float,
    phase_names: tuple[str, ...],
) -> None:
    """Publish a workload, then measure the baseline consumer and the worker side by side on the local stack."""
    if hot_path:
        _hot_path(records, batch)
        return
    from metering_dev.bench.runner import Plan, render, run, write
    from metering_dev.cli.stack import stack_up
    from metering_dev.stack.local import LocalStack

    settings: Settings = ctx.obj
    stack_dir = StackSettings().stack_dir
    log_dir = stack_dir / "logs" / "bench"
    # Bad input fails before the stack starts.
    dedup_window = _duration(soak_dedup_window) if soak_dedup_window else None
    ctx.invoke(stack_up)
    state = LocalStack(stack_dir).state()
    if state is not None and state.broker == "tansu":
        settings = settings.model_copy(update={"processing_guarantee": "at_least_once"})
    if soak:
        _soak(settings, SoakArgs(soak_minutes, soak_rate, dedup_window), output, log_dir)
        return
    plan = Plan.quick() if quick else Plan()
    if records:
        plan = Plan(**{**plan.__dict__, "records": records})
    if history_records:
        sample_at = min(plan.history_sample_at, history_records // 2)
        plan = Plan(**{**plan.__dict__, "history_records": history_records, "history_sample_at": sample_at})
    if steady_rate:
        plan = Plan(**{**plan.__dict__, "steady_rate": steady_rate})
    if zoned_share:
        plan = Plan(**{**plan.__dict__, "zoned_share": zoned_share})
    if phase_names:
        wanted = {ALIASES.get(name, name) for name in phase_names}
        plan = Plan(**{**plan.__dict__, "phases": tuple(name for name in PHASES if name in wanted)})
    summary = run(settings, plan, log_dir, lambda text: click.echo(text, err=True))
    write(summary, output)
    click.echo(render(summary))
    click.echo(f"written to {output}")


class SoakArgs(NamedTuple):
    minutes: float
    rate: float | None
    dedup_window: timedelta | None


def _duration(text: str) -> timedelta:
    """ISO 8601 or plain seconds, as METERING_DEDUP_WINDOW takes it."""
    try:
        return TypeAdapter(timedelta).validate_python(seconds_or_iso_duration(text))
    except ValidationError:
        raise click.BadParameter(
            f"{text!r} is not an ISO 8601 duration or seconds", param_hint="--soak-dedup-window"
        ) from None


def _soak(settings: Settings, args: SoakArgs, output: Path, log_dir: Path) -> None:
    from metering_dev.bench.soak import SoakPlan, render, run_soak, write_outputs

    plan = SoakPlan(minutes=args.minutes, rate=args.rate, dedup_window=args.dedup_window)
    result, samples = run_soak(settings, plan, log_dir, lambda text: click.echo(text, err=True))
    paths = write_outputs(result, samples, output)
    click.echo(render(result))
    click.echo("written to " + ", ".join(str(path) for path in paths.values()))
    if result["failure"] or not result["totals_exact"]:
        raise click.ClickException(result["failure"] or "the ClickHouse totals differ from the published records")


def _hot_path(records: int | None, batch: int) -> None:
    from metering_dev.bench.hot_path import HotPathPlan, render_state_costs, run_hot_path, state_costs
    from metering_pipeline import tables

    plan = HotPathPlan(**({"records": records} if records else {}), batch=batch)
    click.echo(
        f"{plan.records:,} records, {plan.subjects:,} subjects, {batch} per message, a checkpoint every "
        f"{plan.checkpoint_every:,} records ...",
        err=True,
    )
    steps, mismatches = run_hot_path(plan)
    rows = [(step.name, f"{step.cpu_seconds:.2f}", f"{step.per_record(plan.records):.2f}") for step in steps]
    total = sum(step.cpu_seconds for step in steps)
    rows.append(("total", f"{total:.2f}", f"{total / plan.records * 1e6:.2f}"))
    click.echo(tables.render(["step", "CPU s", "µs per record"], rows))
    click.echo(f"monthly totals: {'exact' if mismatches == 0 else f'{mismatches} wrong'}")
    click.echo(render_state_costs(state_costs()))
    if mismatches:
        raise click.ClickException("the rolled-up totals differ from the workload's")
