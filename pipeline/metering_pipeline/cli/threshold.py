"""`metering threshold create | update | delete | list`: the seed's threshold commands and query.

Thresholds live on the compacted `metering.thresholds` topic; running workers pick a change up
within seconds and check it against usage already recorded in the current period.
"""

from __future__ import annotations

import uuid
from typing import Any

import click
from pydantic import ValidationError

from metering_pipeline import tables
from metering_pipeline.cli import catalog
from metering_pipeline.cli.params import field_errors, subject as parse_subject
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.warehouse.grouping import DimensionError, pairs_from_options, threshold_dimensions_problem
from metering_schemas import MetricDefinition, ThresholdAction, UsageThreshold


def _thresholds(settings: Settings) -> dict[str, UsageThreshold]:
    return catalog.read(settings, Topics.of(settings).thresholds, UsageThreshold)


def _validated(fields: dict[str, Any]) -> UsageThreshold:
    try:
        return UsageThreshold.model_validate(fields)
    except ValidationError as error:
        raise click.UsageError(field_errors(error)) from None


def _put(settings: Settings, threshold: UsageThreshold) -> None:
    catalog.write(settings, Topics.of(settings).thresholds, threshold.id, threshold)
    click.echo(_show([threshold]))


def _show(thresholds: list[UsageThreshold]) -> str:
    headers = ["id", "metric", "subject", "threshold", "action", "notify"]
    grouped = any(t.dimensions for t in thresholds)  # the column only when a threshold watches a dimension row
    return tables.render(
        [*headers, "dimensions"] if grouped else headers,
        [
            (
                t.id,
                t.metric_key,
                f"{t.subject_type}:{t.subject_id}",
                tables.decimal_text(t.threshold),
                t.action.value,
                ", ".join(t.notify_emails),
                *([",".join(f"{k}={v}" for k, v in sorted(t.dimensions.items()))] if grouped else []),
            )
            for t in sorted(thresholds, key=lambda t: (t.metric_key, t.subject_type, t.subject_id, t.id))
        ],
    )


_actions = click.Choice([a.value for a in ThresholdAction], case_sensitive=False)


@click.group()
def threshold() -> None:
    """Create, change, remove and list usage thresholds (topic metering.thresholds)."""


@threshold.command()
@click.option("--metric", "metric_key", required=True, help="Metric key, e.g. api_calls.")
@click.option("--subject", required=True, help="TYPE:ID, or TYPE:* for every subject of the type.")
@click.option("--threshold", "limit", required=True, help="Decimal limit; exceeded when usage is above it.")
@click.option("--action", type=_actions, default="ALERT", show_default=True)
@click.option("--notify", "emails", multiple=True, help="E-mail address to notify (repeatable).")
@click.option("--id", "threshold_id", default=None, help="[default: thr-<random>]")
@click.option(
    "--dimension",
    "dimensions",
    multiple=True,
    metavar="NAME=VALUE",
    help="Watch the metric's dimension row instead of its total: one per groupBy dimension of the metric, "
    "all of them (repeatable), e.g. --dimension model=gpt-4 --dimension region=eu.",
)
@click.pass_obj
def create(
    settings: Settings,
    metric_key: str,
    subject: str,
    limit: str,
    action: str,
    emails: tuple[str, ...],
    threshold_id: str | None,
    dimensions: tuple[str, ...],
) -> None:
    """threshold.create"""
    subject_type, subject_id = parse_subject(subject)
    try:
        named = pairs_from_options(dimensions, "--dimension")
    except DimensionError as error:
        raise click.BadParameter(str(error), param_hint="'--dimension'") from None
    new = _validated(
        {
            "id": threshold_id or f"thr-{uuid.uuid4().hex[:12]}",
            "metricKey": metric_key,
            "subjectType": subject_type,
            "subjectId": subject_id,
            "threshold": limit,
            "action": action,
            "notifyEmails": list(emails),
            "dimensions": named,
        }
    )
    if new.id in _thresholds(settings):
        raise click.UsageError(f"threshold {new.id!r} exists; use `metering threshold update`")
    known = catalog.read(settings, Topics.of(settings).metrics, MetricDefinition)
    resolved = MetricCatalog(known).resolve(metric_key, subject_id if subject_type == "org" else None)
    candidates = [resolved] if resolved is not None else [d for d in known.values() if d.key == metric_key]
    if not candidates:
        if new.dimensions:
            raise click.UsageError(
                f"no metric {metric_key!r} is defined: its groupBy dimensions are unknown; define it first"
            )
        click.echo(f"warning: no metric {metric_key!r} is defined yet; the threshold applies once it is", err=True)
    problem = threshold_dimensions_problem(new.dimensions, candidates)
    if problem is not None:
        raise click.BadParameter(problem, param_hint="'--dimension'")
    _put(settings, new)


@threshold.command()
@click.argument("threshold_id")
@click.option(
    "--threshold", "limit", default=None, help="New decimal limit (raising it above current usage re-arms alerts)."
)
@click.option("--action", type=_actions, default=None)
@click.option("--notify", "emails", multiple=True, help="Replaces the addresses (repeatable).")
@click.option("--clear-notify", is_flag=True, help="Notify nobody.")
@click.pass_obj
def update(
    settings: Settings,
    threshold_id: str,
    limit: str | None,
    action: str | None,
    emails: tuple[str, ...],
    clear_notify: bool,
) -> None:
    """threshold.update"""
    current = _thresholds(settings).get(threshold_id)
    if current is None:
        raise click.UsageError(f"no threshold {threshold_id!r}")
    fields = current.model_dump(by_alias=True)
    if limit is not None:
        fields["threshold"] = limit
    if action is not None:
        fields["action"] = action
    if emails or clear_notify:
        fields["notifyEmails"] = list(emails)
    updated = _validated(fields)
    if updated == current:
        raise click.UsageError("nothing to change: give at least one option")
    _put(settings, updated)


@threshold.command()
@click.argument("threshold_id")
@click.pass_obj
def delete(settings: Settings, threshold_id: str) -> None:
    """threshold.delete: it stops firing, and a BLOCK it caused is lifted."""
    if threshold_id not in _thresholds(settings):
        raise click.UsageError(f"no threshold {threshold_id!r}")
    catalog.write(settings, Topics.of(settings).thresholds, threshold_id, None)
    click.echo(f"deleted threshold {threshold_id}")


@threshold.command("list")
@click.option("--metric", "metric_key", default=None)
@click.option("--subject", default=None, help="TYPE:ID; includes TYPE:* thresholds.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines of UsageThresholds.")
@click.pass_obj
def list_thresholds(settings: Settings, metric_key: str | None, subject: str | None, as_json: bool) -> None:
    """threshold.list"""
    found = list(_thresholds(settings).values())
    if metric_key:
        found = [t for t in found if t.metric_key == metric_key]
    if subject:
        subject_type, subject_id = parse_subject(subject)
        found = [t for t in found if t.subject_type == subject_type and t.subject_id in (subject_id, "*")]
    if as_json:
        for t in found:
            click.echo(t.to_json().decode())
    else:
        click.echo(_show(found))
