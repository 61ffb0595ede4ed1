"""`metering summary`: a subject's rollups for one metric, read from ClickHouse."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click

from metering_pipeline import tables
from metering_pipeline.cli.params import subject as parse_subject
from metering_pipeline.settings import Settings
from metering_pipeline.warehouse.grouping import DimensionError, DimensionQuery, check_names, pairs_from_options
from metering_schemas import MetricDefinition, PeriodType, SubjectSettings


def _definition(settings: Settings, metric_key: str, org: str | None) -> MetricDefinition:
    """The definition the subject's records are counted by (its org's, else the global one, else the only one), read
    from the metrics topic: its groupBy names the dimensions a query may use."""
    from metering_pipeline.cli import catalog
    from metering_pipeline.topics import Topics
    from metering_pipeline.usage.metrics import MetricCatalog

    known = catalog.read(settings, Topics.of(settings).metrics, MetricDefinition)
    found = MetricCatalog(known).resolve(metric_key, org)
    if found is None:
        same_key = [d for d in known.values() if d.key == metric_key]
        if len(same_key) != 1:
            raise click.UsageError(
                f"no metric {metric_key!r}"
                if not same_key
                else f"metric {metric_key!r} has {len(same_key)} org-scoped definitions; query an org: subject"
            )
        found = same_key[0]
    return found


def _subjects(settings: Settings) -> dict[str, SubjectSettings]:
    """Subjects' own settings, read from metering.subjects."""
    from metering_pipeline.cli import catalog
    from metering_pipeline.topics import Topics

    return catalog.read(settings, Topics.of(settings).subjects, SubjectSettings)


@click.command()
@click.option("--metric", "metric_key", required=True, help="Metric key, e.g. api_calls.")
@click.option("--subject", required=True, help="TYPE:ID, e.g. org:org-123.")
@click.option(
    "--period",
    type=click.Choice([p.value for p in PeriodType], case_sensitive=False),
    default="DAILY",
    show_default=True,
)
@click.option("--from", "start", type=click.DateTime(), default=None, help="First period start. [default: 30 days ago]")
@click.option(
    "--to",
    "end",
    type=click.DateTime(),
    default=None,
    help="Periods starting before this. [default: now + 1 day]",
)
@click.option(
    "--group-by",
    "group_by",
    multiple=True,
    metavar="NAME",
    help="Split by a groupBy dimension of the metric (repeatable): one row per period and combination of values.",
)
@click.option(
    "--filter-group-by",
    "filters",
    multiple=True,
    metavar="NAME=VALUE",
    help="Only usage whose dimension NAME is VALUE (repeatable, one value per dimension), e.g. model=gpt-4.",
)
@click.option(
    "--time-zone",
    "zone_name",
    default=None,
    metavar="ZONE",
    help="IANA time zone whose local hours, days and months the periods are (e.g. Asia/Kolkata); --from and --to "
    "are read in it too. Other than UTC: summed exactly from the subject's records. [default: the subject's]",
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines (the seed's UsageSummary) instead of a table.")
@click.pass_obj
def summary(
    settings: Settings,
    metric_key: str,
    subject: str,
    period: str,
    start: datetime | None,
    end: datetime | None,
    group_by: tuple[str, ...],
    filters: tuple[str, ...],
    zone_name: str | None,
    as_json: bool,
) -> None:
    """Print a subject's usage summary per period (the seed's usage.getSummary).

    Without --group-by/--filter-group-by: the metric's total per period. With them (dimension names of the metric's
    groupBy), the usage split by or restricted to those dimension values, exact for every aggregation type.
    """
    from metering_pipeline.usage.periods import UnknownTimeZone, subject_zone, time_zone
    from metering_pipeline.usage.subject_zones import zone_rollups_from
    from metering_pipeline.warehouse.client import connect
    from metering_pipeline.warehouse.queries import TooManyPeriods, usage_summaries

    subject_type, subject_id = parse_subject(subject)
    subjects = _subjects(settings)
    if zone_name is None:
        zone_name = subject_zone(subjects, subject_type, subject_id, settings.default_time_zone)
    try:
        zone = time_zone(zone_name)
    except UnknownTimeZone as error:
        raise click.BadParameter(str(error), param_hint="--time-zone") from None
    try:
        check_names(group_by)
        dimensions = DimensionQuery.of(group_by, pairs_from_options(filters, "--filter-group-by"))
    except DimensionError as error:
        raise click.UsageError(str(error)) from None
    aggregation = None
    if not dimensions.is_total or zone_name != "UTC":  # records summed by the query need the metric's type
        definition = _definition(settings, metric_key, subject_id if subject_type == "org" else None)
        try:
            dimensions.check(definition.group_by, metric_key)
        except DimensionError as error:
            raise click.UsageError(str(error)) from None
        aggregation = definition.aggregation_type
    now = datetime.now(UTC)
    first = start.replace(tzinfo=zone).astimezone(UTC) if start else now - timedelta(days=30)
    last = end.replace(tzinfo=zone).astimezone(UTC) if end else now + timedelta(days=1)
    with connect(settings) as client:
        try:
            rows = usage_summaries(
                client,
                metric_key,
                subject_type,
                subject_id,
                PeriodType(period.upper()),
                first,
                last,
                dimensions,
                aggregation,
                zone_name,
                zone_rollups_from(subjects, subject_type, subject_id, zone_name, settings.default_time_zone),
            )
        except TooManyPeriods as error:
            raise click.UsageError(str(error)) from None
    if as_json:
        for row in rows:
            click.echo(row.to_json())
        return
    names = dimensions.names()
    click.echo(
        tables.render(
            [f"period start ({zone_name})", "period end", *names, "total", "records"],
            [
                (
                    r.period_start.astimezone(zone).strftime("%Y-%m-%d %H:%M"),
                    r.period_end.astimezone(zone).strftime("%Y-%m-%d %H:%M"),
                    *(r.dimensions.get(name, "") for name in names),
                    tables.decimal_text(r.total_quantity),
                    r.record_count,
                )
                for r in rows
            ],
        )
    )
