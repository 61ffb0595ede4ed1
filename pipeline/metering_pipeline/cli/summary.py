"""`metering summary`: a subject's rollups for one metric, read from ClickHouse."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import click

from metering_pipeline import tables
from metering_pipeline.cli.params import subject as parse_subject
from metering_pipeline.cli.params import utc
from metering_pipeline.settings import Settings
from metering_schemas import PeriodType


@click.command()
@click.option("--metric", "metric_key", required=True, help="Metric key, e.g. api_calls.")
@click.option("--subject", required=True, help="TYPE:ID, e.g. org:org-123.")
@click.option("--period", type=click.Choice([p.value for p in PeriodType], case_sensitive=False), default="DAILY", show_default=True)
@click.option("--from", "start", type=click.DateTime(), default=None, help="First period start (UTC). [default: 30 days ago]")
@click.option("--to", "end", type=click.DateTime(), default=None, help="Periods starting before this (UTC). [default: now + 1 day]")
@click.option("--json", "as_json", is_flag=True, help="JSON lines (the seed's UsageSummary) instead of a table.")
@click.pass_obj
def summary(settings: Settings, metric_key: str, subject: str, period: str, start: datetime | None,
            end: datetime | None, as_json: bool) -> None:
    """Print a subject's usage summary per period (the seed's usage.getSummary)."""
    from metering_pipeline.warehouse.client import connect
    from metering_pipeline.warehouse.queries import usage_summaries

    subject_type, subject_id = parse_subject(subject)
    now = datetime.now(timezone.utc)
    with connect(settings) as client:
        rows = usage_summaries(client, metric_key, subject_type, subject_id, PeriodType(period.upper()),
                               utc(start) or now - timedelta(days=30), utc(end) or now + timedelta(days=1))
    if as_json:
        for row in rows:
            click.echo(row.to_json())
        return
    click.echo(tables.render(
        ["period start (UTC)", "period end", "total", "records"],
        [(r.period_start.strftime("%Y-%m-%d %H:%M"), r.period_end.strftime("%Y-%m-%d %H:%M"),
          tables.decimal_text(r.total_quantity), r.record_count) for r in rows],
    ))
