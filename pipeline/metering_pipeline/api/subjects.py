"""Per-subject views for dashboards: which subjects have usage, where each stands against its
thresholds in the current period, and its recent alerts."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field, ValidationError
from pydantic.alias_generators import to_camel

from metering_pipeline.api.context import ApiContext, context_of
from metering_pipeline.api.errors import ERROR_RESPONSES, ApiError, FieldProblem
from metering_pipeline.api.security import AuthenticatedRoute, Caller, reader, writer
from metering_pipeline.invoicing.quantities import Source, billed_quantities
from metering_pipeline.usage.aggregation import plain
from metering_pipeline.usage.periods import local_period_bounds, period_bounds, time_zone
from metering_pipeline.usage.subject_zones import zone_change, zone_in_force
from metering_pipeline.usage.thresholds import LimitStatus, SubjectStatus, limit_state
from metering_pipeline.warehouse.grouping import DimensionQuery
from metering_pipeline.warehouse.queries import exceeded_alerts, recent_alerts, subjects_with_usage, usage_summaries
from metering_schemas import PeriodType, ResetPeriod, SubjectSettings, Subscription, ThresholdAction, UsageThreshold
from metering_schemas._base import WireModel
from metering_schemas.subject import subject_key

router = APIRouter(prefix="/v1", tags=["subjects"], route_class=AuthenticatedRoute, responses=ERROR_RESPONSES)


class Subject(WireModel):
    subject_type: str
    subject_id: str


class SubjectList(WireModel):
    subjects: list[Subject]


def _visible(subject_type: str, subject_id: str, who: Caller, context: ApiContext) -> bool:
    """An org-scoped key sees its org, and the subjects its org subscribed or set thresholds for."""
    if who.org_id is None or (subject_type, subject_id) == ("org", who.org_id):
        return True
    owned: list[Subscription | UsageThreshold] = [*context.subscriptions.values(), *context.thresholds.values()]
    return any((d.subject_type, d.subject_id) == (subject_type, subject_id) and d.org_id == who.org_id for d in owned)


def _require_visible(subject_type: str, subject_id: str, who: Caller, context: ApiContext) -> None:
    if not _visible(subject_type, subject_id, who, context):
        raise ApiError(404, "not_found", f"no subject {subject_type}:{subject_id} for org {who.org_id!r}")


@router.get("/subjects", response_model=SubjectList, summary="Subjects with usage (for pickers)")
async def list_subjects(
    request: Request,
    subject_type: str | None = Query(default=None, alias="subjectType"),
    search: str | None = Query(default=None, max_length=256, description="Part of the subject id"),
    limit: int = Query(default=100, ge=1, le=1000),
    who: Caller = Depends(reader),
) -> SubjectList:
    context = context_of(request)
    found = await context.query(subjects_with_usage, subject_type, search, limit if who.org_id is None else 1000)
    visible = [Subject(subject_type=t, subject_id=i) for t, i in found if _visible(t, i, who, context)]
    return SubjectList(subjects=visible[:limit])


class SubjectUpdate(WireModel):
    """The body of `PUT /v1/subjects/{subjectType}/{subjectId}`."""

    time_zone: str = Field(
        min_length=1,
        max_length=64,
        description="IANA time zone the subject's periods are answered in (`Asia/Kolkata`); an unknown one is 422 "
        "`invalid_time_zone`",
    )


def _settings(subject_type: str, subject_id: str, time_zone: str) -> SubjectSettings:
    try:
        return SubjectSettings(subject_type=subject_type, subject_id=subject_id, time_zone=time_zone)
    except ValidationError as error:
        problems = [FieldProblem(field=_field(e["loc"]), message=e["msg"]) for e in error.errors()]
        code = "invalid_time_zone" if any(p.field == "body.timeZone" for p in problems) else "validation_error"
        raise ApiError(422, code, "; ".join(p.message for p in problems), problems) from None


def _field(location: tuple[int | str, ...]) -> str:
    """A SubjectSettings field as the request names it: the time zone in the body, the subject in the path."""
    name = to_camel(str(location[0])) if location else "body"
    return f"body.{name}" if name == "timeZone" else f"path.{name}"


@router.put("/subjects/{subject_type}/{subject_id}", response_model=SubjectSettings, summary="subject.update")
async def put_subject(
    subject_type: str, subject_id: str, body: SubjectUpdate, request: Request, who: Caller = Depends(writer)
) -> SubjectSettings:
    """Sets the subject's time zone. Summaries that name no zone are answered in it from then on; its rollups are
    cut in it from the end of the current local day in the zone it had (`effectiveFrom`)."""
    context = context_of(request)
    _require_visible(subject_type, subject_id, who, context)
    asked = _settings(subject_type, subject_id, body.time_zone)
    subject = zone_change(
        context.subjects.get(asked.key),
        subject_type,
        subject_id,
        asked.time_zone,
        context.settings.default_time_zone,
        datetime.now(UTC),
    )
    await context.publish(context.subjects, subject.key, subject)
    return subject


@router.get("/subjects/{subject_type}/{subject_id}", response_model=SubjectSettings, summary="subject.get")
async def get_subject(
    subject_type: str, subject_id: str, request: Request, who: Caller = Depends(reader)
) -> SubjectSettings:
    """The subject's settings: its own time zone, else METERING_DEFAULT_TIME_ZONE."""
    context = context_of(request)
    _require_visible(subject_type, subject_id, who, context)
    own = context.subjects.get(subject_key(subject_type, subject_id))
    return own or _settings(subject_type, subject_id, context.settings.default_time_zone)


@router.get("/subjects/{subject_type}/{subject_id}/status", summary="Current-period usage against thresholds")
async def subject_status(
    subject_type: str, subject_id: str, request: Request, who: Caller = Depends(reader)
) -> dict[str, Any]:
    """Per metric with thresholds: the value in its reset period's current window, each threshold's state
    (ok / approaching / exceeded), and whether a BLOCK threshold blocks the subject — the same shape as the
    worker's entitlement endpoint, read from ClickHouse."""
    context = context_of(request)
    _require_visible(subject_type, subject_id, who, context)
    now = datetime.now(UTC)
    own = context.subjects.get(subject_key(subject_type, subject_id))
    zone = zone_in_force(own, now, context.settings.default_time_zone)  # its windows' zone, as the worker's
    applying: dict[str, list[UsageThreshold]] = {}
    for threshold in context.thresholds.values():
        if threshold.subject_type == subject_type and threshold.subject_id in (subject_id, "*"):
            applying.setdefault(threshold.metric_key, []).append(threshold)
    org = subject_id if subject_type == "org" else None
    exceeded = await context.query(
        exceeded_alerts, subject_type, subject_id, [t.id for ts in applying.values() for t in ts]
    )
    statuses = []
    for metric_key, thresholds in sorted(applying.items()):
        definition = context.metrics.resolve(metric_key, org)
        if definition is None:
            statuses.append(SubjectStatus(metric_key, (subject_type, subject_id), None, None, Decimal(0), []))
            continue
        if definition.reset_period is ResetPeriod.NEVER:  # all time: hourly rows, where they hold it all
            start, end = period_bounds(ResetPeriod.NEVER, now)
            since = context.zone_rollups_from(subject_type, subject_id, "UTC")
            source = Source(rollups=since is not None and since <= start)
            value = (await context.query(billed_quantities, subject_type, subject_id, start, end, source)).get(
                metric_key, Decimal(0)
            )
        else:  # the window in the zone in force, as the worker's thresholds have it
            period_type = PeriodType(definition.reset_period.value)
            start, end = local_period_bounds(period_type, now, time_zone(zone))
            found = await context.query(
                usage_summaries,
                metric_key,
                subject_type,
                subject_id,
                period_type,
                start,
                end,
                DimensionQuery(),
                definition.aggregation_type,
                zone,
                context.zone_rollups_from(subject_type, subject_id, zone),
            )
            value = found[0].total_quantity if found else Decimal(0)
        limits = [
            LimitStatus(
                t,
                limit_state(value, t.threshold, context.settings.threshold_approaching_fraction),
                t.action is ThresholdAction.BLOCK and (t.id, start, t.threshold) in exceeded,
            )
            for t in sorted(thresholds, key=lambda t: t.threshold)
        ]
        statuses.append(
            SubjectStatus(metric_key, (subject_type, subject_id), definition.reset_period, start, value, limits, zone)
        )
    return {
        "subjectType": subject_type,
        "subjectId": subject_id,
        "asOf": now.isoformat().replace("+00:00", "Z"),
        "metrics": [status.to_json() for status in statuses],
    }


@router.get("/subjects/{subject_type}/{subject_id}/alerts", summary="A subject's recent threshold alerts")
async def subject_alerts(
    subject_type: str,
    subject_id: str,
    request: Request,
    limit: int = Query(default=50, ge=1, le=1000),
    who: Caller = Depends(reader),
) -> dict[str, Any]:
    context = context_of(request)
    _require_visible(subject_type, subject_id, who, context)
    rows = await context.query(recent_alerts, subject_type, subject_id, limit)
    return {"alerts": [_alert_json(row) for row in rows]}


def _alert_json(row: dict[str, object]) -> dict[str, object]:
    """The alert as on metering.alerts (camelCase, decimals as strings, RFC 3339 times)."""
    out: dict[str, object] = {}
    for column, value in row.items():
        if isinstance(value, datetime):
            value = value.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
        elif isinstance(value, Decimal):
            value = str(plain(value))
        out[to_camel(column)] = value
    return out
