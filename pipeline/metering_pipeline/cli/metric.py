"""`metering metric define | update | delete | get | list`: the seed's metric commands and queries.

Definitions live on the compacted `metering.metrics` topic; these commands read it to the end
before they check anything, and each write is acknowledged by the broker before they return.
"""

from __future__ import annotations

from typing import Any

import click
from pydantic import ValidationError

from metering_pipeline import tables
from metering_pipeline.cli import catalog
from metering_pipeline.cli.params import field_errors
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_schemas import AggregationType, MetricDefinition, ResetPeriod


def _catalog(settings: Settings) -> dict[str, MetricDefinition]:
    return catalog.read(settings, Topics.of(settings).metrics, MetricDefinition)


def _write(settings: Settings, definition_id: str, definition: MetricDefinition | None) -> None:
    catalog.write(settings, Topics.of(settings).metrics, definition_id, definition)


def _validated(fields: dict[str, Any]) -> MetricDefinition:
    try:
        return MetricDefinition.model_validate(fields)
    except ValidationError as error:
        raise click.UsageError(field_errors(error)) from None


def _find(known: dict[str, MetricDefinition], ref: str) -> MetricDefinition:
    """By id, else by key when exactly one definition has it."""
    if ref in known:
        return known[ref]
    matches = [d for d in known.values() if d.key == ref]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise click.UsageError(
            f"key {ref!r} names {len(matches)} definitions ({', '.join(sorted(d.id for d in matches))}); give the id"
        )
    raise click.UsageError(f"no metric definition with id or key {ref!r}")


def _show(definitions: list[MetricDefinition]) -> str:
    headers = ["id", "key", "name", "unit", "aggregation", "reset", "org"]
    # The payload columns only when a definition reads the payload, so the seed's table stays as it was.
    payload = any(d.value_property or d.group_by or d.filter for d in definitions)
    return tables.render(
        [*headers, "value", "group by", "filter"] if payload else headers,
        [
            (
                d.id,
                d.key,
                d.name,
                d.unit,
                d.aggregation_type.value,
                d.reset_period.value,
                d.org_id or "(global)",
                *(
                    (
                        d.value_property or "",
                        " ".join(f"{k}={v}" for k, v in d.group_by.items()),
                        " ".join(f"{k}={','.join(v)}" for k, v in d.filter.items()),
                    )
                    if payload
                    else ()
                ),
            )
            for d in sorted(definitions, key=lambda d: (d.key, d.org_id or ""))
        ],
    )


def _group_by(items: tuple[str, ...]) -> dict[str, str]:
    """`--group-by NAME=PATH` options → {name: path}."""
    found: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(
                f"expected NAME=PATH, e.g. model='$.metadata.model' (got {item!r})", param_hint="'--group-by'"
            )
        if name in found:
            raise click.BadParameter(f"dimension {name!r} is given twice", param_hint="'--group-by'")
        found[name] = path
    return found


def _filter(items: tuple[str, ...]) -> dict[str, list[str]]:
    """`--filter PATH=VALUE[,VALUE...]` options → {path: values}; a path given again adds its values."""
    found: dict[str, list[str]] = {}
    for item in items:
        path, sep, values = item.partition("=")
        if not sep or not path:
            raise click.BadParameter(
                f"expected PATH=VALUE[,VALUE...], e.g. '$.metadata.region=eu,us' (got {item!r})",
                param_hint="'--filter'",
            )
        found.setdefault(path, []).extend(v for v in values.split(",") if v not in found.get(path, []))
    return found


_PAYLOAD_HELP = {
    "value_property": "Where the quantity is read: '$.quantity' (the default) or '$.metadata.NAME[.NAME...]', e.g. "
    "'$.metadata.tokens'. Required for UNIQUE_COUNT (the value whose distinct strings are counted); "
    "ignored for COUNT.",
    "group_by": "A dimension, NAME=PATH (repeatable, at most 10), e.g. --group-by model='$.metadata.model': usage is "
    "also rolled up per combination of the dimensions' values.",
    "filter": "Count only records whose value at PATH is one of the values, PATH=VALUE[,VALUE...] (repeatable; every "
    "path must match; a path given again adds values), e.g. --filter '$.metadata.region=eu,us'.",
}


_aggregations = click.Choice([a.value for a in AggregationType], case_sensitive=False)
_resets = click.Choice([r.value for r in ResetPeriod], case_sensitive=False)


@click.group()
def metric() -> None:
    """Define, change, remove and list metric definitions (topic metering.metrics)."""


@metric.command()
@click.option("--key", required=True, help="Metric key records refer to, e.g. api_calls.")
@click.option("--name", required=True)
@click.option("--aggregation", required=True, type=_aggregations)
@click.option("--reset-period", type=_resets, default="NEVER", show_default=True)
@click.option("--unit", default="")
@click.option("--description", default="")
@click.option("--org-id", default=None, help="Scope to one organization (overrides a global metric of the same key).")
@click.option("--id", "definition_id", default=None, help="[default: the key, or ORG:KEY with --org-id]")
@click.option("--value-property", default=None, metavar="PATH", help=_PAYLOAD_HELP["value_property"])
@click.option("--group-by", "group_by", multiple=True, metavar="NAME=PATH", help=_PAYLOAD_HELP["group_by"])
@click.option("--filter", "filters", multiple=True, metavar="PATH=VALUES", help=_PAYLOAD_HELP["filter"])
@click.pass_obj
def define(
    settings: Settings,
    key: str,
    name: str,
    aggregation: str,
    reset_period: str,
    unit: str,
    description: str,
    org_id: str | None,
    definition_id: str | None,
    value_property: str | None,
    group_by: tuple[str, ...],
    filters: tuple[str, ...],
) -> None:
    """metric.define: a new metric (refused if the id exists; use update).

    \b
    e.g. tokens per model, read from the payload, EU and US only:
      metering metric define --key llm_tokens --name Tokens --aggregation SUM \\
        --value-property '$.metadata.tokens' --group-by model='$.metadata.model' \\
        --filter '$.metadata.region=eu,us'
    """
    definition = _validated(
        {
            "id": definition_id or (f"{org_id}:{key}" if org_id else key),
            "key": key,
            "name": name,
            "aggregationType": aggregation,
            "resetPeriod": reset_period,
            "unit": unit,
            "description": description,
            "orgId": org_id,
            "valueProperty": value_property,
            "groupBy": _group_by(group_by),
            "filter": _filter(filters),
        }
    )
    known = _catalog(settings)
    if definition.id in known:
        raise click.UsageError(f"metric {definition.id!r} is already defined; use `metering metric update`")
    clash = [d for d in known.values() if d.key == definition.key and d.org_id == definition.org_id]
    if clash:
        raise click.UsageError(
            f"key {key!r} is already defined{' for org ' + org_id if org_id else ''} as {clash[0].id!r}"
        )
    _write(settings, definition.id, definition)
    click.echo(_show([definition]))


@metric.command()
@click.argument("ref")
@click.option("--name", default=None)
@click.option("--aggregation", type=_aggregations, default=None)
@click.option("--reset-period", type=_resets, default=None)
@click.option("--unit", default=None)
@click.option("--description", default=None)
@click.option("--value-property", default=None, metavar="PATH", help=_PAYLOAD_HELP["value_property"])
@click.option(
    "--group-by",
    "group_by",
    multiple=True,
    metavar="NAME=PATH",
    help="Replaces the dimensions. " + _PAYLOAD_HELP["group_by"],
)
@click.option("--clear-group-by", is_flag=True, help="No dimensions any more.")
@click.option(
    "--filter", "filters", multiple=True, metavar="PATH=VALUES", help="Replaces the filter. " + _PAYLOAD_HELP["filter"]
)
@click.option("--clear-filter", is_flag=True, help="Count every record again.")
@click.pass_obj
def update(
    settings: Settings,
    /,  # click.pass_obj hands it in by position
    ref: str,
    group_by: tuple[str, ...],
    clear_group_by: bool,
    filters: tuple[str, ...],
    clear_filter: bool,
    **changes: str | None,
) -> None:
    """metric.update: change an existing metric, by id or key (the key and org stay). A new value property, group by
    or filter applies to the records processed after it."""
    current = _find(_catalog(settings), ref)
    wire_names = {"aggregation": "aggregationType", "reset_period": "resetPeriod", "value_property": "valueProperty"}
    fields = current.model_dump(by_alias=True) | {wire_names.get(k, k): v for k, v in changes.items() if v is not None}
    if group_by or clear_group_by:
        fields["groupBy"] = _group_by(group_by)
    if filters or clear_filter:
        fields["filter"] = _filter(filters)
    definition = _validated(fields)
    if definition == current:
        raise click.UsageError("nothing to change: give at least one option")
    _write(settings, definition.id, definition)
    click.echo(_show([definition]))


@metric.command()
@click.argument("ref")
@click.pass_obj
def delete(settings: Settings, ref: str) -> None:
    """metric.delete: records of its key are dead-lettered (unknown_metric) from then on."""
    definition = _find(_catalog(settings), ref)
    _write(settings, definition.id, None)
    click.echo(f"deleted metric {definition.id}")


@metric.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="The MetricDefinition as JSON.")
@click.pass_obj
def get(settings: Settings, ref: str, as_json: bool) -> None:
    """metric.get: one definition, by id or key."""
    definition = _find(_catalog(settings), ref)
    click.echo(definition.to_json().decode() if as_json else _show([definition]))


@metric.command("list")
@click.option("--org-id", default=None, help="Only the metrics that apply to this org (its own and global ones).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines of MetricDefinitions.")
@click.pass_obj
def list_metrics(settings: Settings, org_id: str | None, as_json: bool) -> None:
    """metric.list: every definition on the topic."""
    definitions = [d for d in _catalog(settings).values() if org_id is None or d.org_id in (None, org_id)]
    if as_json:
        for definition in definitions:
            click.echo(definition.to_json().decode())
    else:
        click.echo(_show(definitions))
