"""`metering subject set | get`: a subject's settings (its time zone), on the compacted `metering.subjects` topic."""

from __future__ import annotations

from datetime import UTC, datetime

import click
from pydantic import ValidationError

from metering_pipeline import tables
from metering_pipeline.cli import catalog
from metering_pipeline.cli.params import field_errors, subject as parse_subject
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_pipeline.usage.subject_zones import zone_change
from metering_schemas import SubjectSettings
from metering_schemas.subject import subject_key


@click.group()
def subject() -> None:
    """Set and show a subject's time zone (topic metering.subjects)."""


@subject.command("set")
@click.option("--subject", "subject_text", required=True, help="TYPE:ID, e.g. org:acme.")
@click.option("--time-zone", "zone_name", required=True, metavar="ZONE", help="IANA time zone, e.g. Asia/Kolkata.")
@click.pass_obj
def set_subject(settings: Settings, subject_text: str, zone_name: str) -> None:
    """Set the subject's time zone: summaries that name none are answered in it, and its rollups are cut in it from
    the end of the current local day in the zone it had (shown as "from")."""
    subject_type, subject_id = parse_subject(subject_text)
    try:
        asked = SubjectSettings(subject_type=subject_type, subject_id=subject_id, time_zone=zone_name)
    except ValidationError as error:
        raise click.UsageError(field_errors(error)) from None
    topic = Topics.of(settings).subjects
    current = catalog.read(settings, topic, SubjectSettings).get(asked.key)
    found = zone_change(
        current, subject_type, subject_id, asked.time_zone, settings.default_time_zone, datetime.now(UTC)
    )
    catalog.write(settings, topic, found.key, found)
    click.echo(_show(found, own=True))


@subject.command("get")
@click.option("--subject", "subject_text", required=True, help="TYPE:ID, e.g. org:acme.")
@click.option("--json", "as_json", is_flag=True, help="The subject's settings as JSON.")
@click.pass_obj
def get_subject(settings: Settings, subject_text: str, as_json: bool) -> None:
    """Show the subject's time zone: its own, else METERING_DEFAULT_TIME_ZONE."""
    subject_type, subject_id = parse_subject(subject_text)
    own = catalog.read(settings, Topics.of(settings).subjects, SubjectSettings).get(
        subject_key(subject_type, subject_id)
    )
    found = own or SubjectSettings(
        subject_type=subject_type, subject_id=subject_id, time_zone=settings.default_time_zone
    )
    click.echo(found.to_json().decode() if as_json else _show(found, own=own is not None))


def _show(found: SubjectSettings, own: bool) -> str:
    source = "its own" if own else "METERING_DEFAULT_TIME_ZONE"
    rows = [(found.key, found.time_zone, source, _since(found.effective_from))]
    if found.previous_time_zone and found.effective_from:
        rows.insert(0, (found.key, found.previous_time_zone, "before the change", ""))
    return tables.render(["subject", "time zone", "source", "from (UTC)"], rows)


def _since(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M") if at else ""
