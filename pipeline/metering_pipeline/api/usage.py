"""usage.record / recordBatch / get / getSummary / export."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal, cast, overload

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from metering_pipeline.api.context import ApiContext, context_of
from metering_pipeline.api.errors import ERROR_RESPONSES, ApiError, FieldProblem
from metering_pipeline.api.links import from_body, links
from metering_pipeline.api.security import AuthenticatedRoute, Caller, reader, writer
from metering_pipeline.usage.intake import IntakeRules, Refusal, judge, stored_metadata, unreadable_payload
from metering_pipeline.usage.metrics import record_org
from metering_pipeline.usage.periods import END_OF_TIME, EPOCH, UnknownTimeZone, local_period_bounds, time_zone
from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.grouping import (
    FILTER_PARAMETER,
    DimensionError,
    DimensionQuery,
    check_names,
    filters_from_query,
)
from metering_pipeline.warehouse.queries import (
    EXPORT_FORMATS,
    RecordFilter,
    TooManyPeriods,
    open_usage_export,
    summary,
    usage_records_page,
    usage_summaries,
)
from metering_schemas import MetricDefinition, PeriodType, UsageRecord, UsageSummary
from metering_schemas._base import Identifier, UtcDatetime, WireModel, as_utc

router = APIRouter(prefix="/v1/usage", tags=["usage"], route_class=AuthenticatedRoute, responses=ERROR_RESPONSES)

IdempotencyKey = Header(
    default=None,
    alias="Idempotency-Key",
    max_length=200,
    description="Names the request: records without an id get ids derived from it, so a retry counts once",
)


class RecordBatch(WireModel):
    records: list[UsageRecord] = Field(min_length=1)


class Accepted(WireModel):
    """The records as published (with their ids): acknowledged by Kafka, counted by the workers."""

    records: list[UsageRecord]


class RecordPage(WireModel):
    records: list[UsageRecord]
    next_cursor: str | None = Field(default=None, description="Pass as `cursor` for the next page; null on the last")


class SummaryList(WireModel):
    summaries: list[UsageSummary]


def _admit(
    records: list[UsageRecord], who: Caller, context: ApiContext, idempotency_key: str | None, batch: bool
) -> list[UsageRecord]:
    """Every record checked before any is published: a request is accepted whole or refused whole."""
    now = datetime.now(UTC)
    settings = context.settings
    rules = IntakeRules(settings.allowed_lateness, settings.future_skew)
    admitted: list[UsageRecord] = []
    problems: list[FieldProblem] = []
    for index, record in enumerate(records):
        where = f"body.records.{index}" if batch else "body"
        org = record_org(record.subject_type, record.subject_id, record.metadata)
        if who.org_id is not None:
            if record.subject_type != "org" and org is None:  # an org key's records name their org
                record = record.model_copy(update={"metadata": {**record.metadata, "orgId": who.org_id}})
                org = who.org_id
            if org != who.org_id:
                raise ApiError(
                    403,
                    "forbidden_org",
                    f"{where}: subject {record.subject_type}:{record.subject_id} is not in org {who.org_id!r}",
                )
        judged = judge(record, record.timestamp or now, now, context.metrics, rules)
        verdict = (
            judged
            if isinstance(judged, Refusal)
            else unreadable_payload(record, judged, context.metrics) or stored_metadata(record, rules)
        )
        if isinstance(verdict, Refusal):
            problems.append(FieldProblem(field=where, message=f"{verdict.reason.value}: {verdict.message}"))
            continue
        if record.id is None:
            record_id = f"{idempotency_key}:{index}" if idempotency_key else str(uuid.uuid4())
            record = record.model_copy(update={"id": record_id})
        admitted.append(record)
    if problems:
        raise ApiError(
            422, "invalid_records", f"{len(problems)} of {len(records)} records refused; none was published", problems
        )
    return admitted


# What a client reads after recording usage: the subject's records, its summary, its status against thresholds.
_RECORDED = links(
    202,
    ("get", "/v1/usage", from_body(subjectType="records/0/subjectType", subjectId="records/0/subjectId")),
    (
        "get",
        "/v1/usage/summary",
        from_body(
            metricKey="records/0/metricKey", subjectType="records/0/subjectType", subjectId="records/0/subjectId"
        ),
    ),
    (
        "get",
        "/v1/subjects/{subject_type}/{subject_id}/status",
        from_body(subject_type="records/0/subjectType", subject_id="records/0/subjectId"),
    ),
)


@router.post("", status_code=202, response_model=Accepted, summary="usage.record", responses=_RECORDED)
async def record_usage(
    body: UsageRecord, request: Request, idempotency_key: str | None = IdempotencyKey, who: Caller = Depends(writer)
) -> Accepted:
    context = context_of(request)
    admitted = _admit([body], who, context, idempotency_key, batch=False)
    assert context.producer is not None
    await context.producer.record(admitted[0])
    return Accepted(records=admitted)


@router.post("/batch", status_code=202, response_model=Accepted, summary="usage.recordBatch", responses=_RECORDED)
async def record_usage_batch(
    body: RecordBatch, request: Request, idempotency_key: str | None = IdempotencyKey, who: Caller = Depends(writer)
) -> Accepted:
    context = context_of(request)
    limit = context.settings.api_max_batch_records
    if len(body.records) > limit:
        raise ApiError(413, "batch_too_large", f"{len(body.records)} records; at most {limit} per request")
    admitted = _admit(body.records, who, context, idempotency_key, batch=True)
    assert context.producer is not None
    await context.producer.record_batch(admitted)
    return Accepted(records=admitted)


_EARLIEST, _LATEST = EPOCH, END_OF_TIME  # what ClickHouse's DateTime can hold


@overload
def _storable(name: str, value: datetime) -> datetime: ...
@overload
def _storable(name: str, value: datetime | None) -> datetime | None: ...
def _storable(name: str, value: datetime | None) -> datetime | None:
    value = _utc(value)
    if value is not None and not _EARLIEST <= value < _LATEST:
        raise ApiError(
            422,
            "validation_error",
            f"{name} must be between 1970 and 2105",
            [FieldProblem(field=f"query.{name}", message="outside 1970-01-01 to 2106-01-01")],
        )
    return value


def _range(start: datetime | None, end: datetime | None, default_days: int = 30) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    start = _storable("from", start) or now - timedelta(days=default_days)
    end = _storable("to", end) or now + timedelta(days=1)
    if end <= start:
        raise ApiError(
            422,
            "validation_error",
            "`to` must be after `from`",
            [FieldProblem(field="query.to", message="must be after from")],
        )
    return start, end


@overload
def _utc(value: datetime) -> datetime: ...
@overload
def _utc(value: datetime | None) -> datetime | None: ...
def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else (value if value.tzinfo else value.replace(tzinfo=UTC))


def _selection(
    who: Caller,
    start: datetime | None,
    end: datetime | None,
    subject_type: str | None,
    subject_id: str | None,
    metric_key: str | None,
) -> RecordFilter:
    if subject_id is not None and subject_type is None:
        raise ApiError(
            422,
            "validation_error",
            "subjectId needs subjectType",
            [FieldProblem(field="query.subjectType", message="required with subjectId")],
        )
    first, last = _range(start, end)
    return RecordFilter(first, last, subject_type, subject_id, metric_key, who.org_id)


def _cursor(after: tuple[datetime, str]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([after[0].isoformat(), after[1]])).decode()


def _read_cursor(cursor: str) -> tuple[datetime, str]:
    """A cursor is opaque to clients, so anything but what `_cursor` wrote (a time ClickHouse can hold and an id)
    is the client's mistake: 400, never a failure further down."""
    try:
        timestamp, record_id = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        after = as_utc(datetime.fromisoformat(timestamp))
    except (ValueError, TypeError, orjson.JSONDecodeError):
        after, record_id = None, None
    if after is None or not isinstance(record_id, str) or not _EARLIEST <= after < _LATEST:
        raise ApiError(400, "invalid_cursor", "cursor is not one this API returned")
    return after, record_id


@router.get("", response_model=RecordPage, summary="usage.get")
async def get_usage(
    request: Request,
    subject_type: Identifier = Query(alias="subjectType", min_length=1, max_length=256),
    subject_id: Identifier = Query(alias="subjectId", min_length=1, max_length=256),
    metric_key: Identifier | None = Query(default=None, alias="metricKey", min_length=1, max_length=256),
    start: datetime | None = Query(default=None, alias="from", description="[default: 30 days ago]"),
    end: datetime | None = Query(default=None, alias="to", description="exclusive [default: tomorrow]"),
    limit: int = Query(default=100, ge=1, le=1000),
    cursor: str | None = Query(default=None, max_length=2000),
    who: Caller = Depends(reader),
) -> RecordPage:
    """A subject's raw usage records, oldest first, a page at a time."""
    selection = _selection(who, start, end, subject_type, subject_id, metric_key)
    after = _read_cursor(cursor) if cursor else None
    records = await context_of(request).query(usage_records_page, selection, after, limit)
    last = records[-1] if len(records) == limit else None  # read from ClickHouse: its timestamp and id are set
    next_cursor = None if last is None else _cursor((cast(datetime, last.timestamp), cast(str, last.id)))
    return RecordPage(records=records, next_cursor=next_cursor)


# OpenMeter's deep-object filter (`filterGroupBy[model]=gpt-4`), declared for OpenAPI; read from the raw query string.
_FILTER_GROUP_BY_DOC = {
    "parameters": [
        {
            "name": FILTER_PARAMETER,
            "in": "query",
            "required": False,
            "style": "deepObject",
            "explode": True,
            "description": "Only usage whose dimension has this value, one value per dimension: "
            "`filterGroupBy[model]=gpt-4&filterGroupBy[region]=eu` (names: the metric's groupBy dimensions)",
            "schema": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 1024}},
        }
    ]
}

GroupByQuery = Query(
    default=[],
    alias="groupBy",
    max_length=10,
    description="Dimension names (repeatable: `groupBy=model&groupBy=region`): one summary per period "
    "and combination of their values, which its `dimensions` carry",
)


def _dimension_problem(error: DimensionError) -> ApiError:
    return ApiError(422, error.code, str(error), [FieldProblem(field=f"query.{error.field}", message=str(error))])


def _dimension_query(request: Request, group_by: list[str]) -> DimensionQuery:
    """groupBy and filterGroupBy as given, checked for shape (names are checked against the metric later)."""
    try:
        check_names(group_by)
        return DimensionQuery.of(group_by, filters_from_query(request.query_params.multi_items()))
    except DimensionError as error:
        raise _dimension_problem(error) from None


def _metric_for(context: ApiContext, metric_key: str, org: str | None) -> MetricDefinition | None:
    """The definition that governs the subject's records: its org's, else the global one, else the only one."""
    found = context.metrics.resolve(metric_key, org)
    if found is None:
        same_key = [d for d in context.metrics.definitions() if d.key == metric_key]
        found = same_key[0] if len(same_key) == 1 else None
    return found


def _checked(query: DimensionQuery, definition: MetricDefinition | None, metric_key: str) -> None:
    """Dimension names must be the metric's groupBy names (422 `unknown_dimension`, or `unknown_metric`)."""
    if query.is_total:
        return
    if definition is None:
        raise ApiError(
            422,
            "unknown_metric",
            f"no metric {metric_key!r}: its dimensions are not known",
            [FieldProblem(field="query.metricKey", message="no such metric")],
        )
    try:
        query.check(definition.group_by, metric_key)
    except DimensionError as error:
        raise _dimension_problem(error) from None


@router.get("/summary", response_model=SummaryList, summary="usage.getSummary", openapi_extra=_FILTER_GROUP_BY_DOC)
async def get_summary(
    request: Request,
    metric_key: Identifier = Query(alias="metricKey", min_length=1, max_length=256),
    subject_type: Identifier = Query(alias="subjectType", min_length=1, max_length=256),
    subject_id: Identifier = Query(alias="subjectId", min_length=1, max_length=256),
    period_type: PeriodType = Query(default=PeriodType.MONTHLY, alias="periodType"),
    period_start_at: UtcDatetime | None = Query(
        default=None, alias="periodStart", description="One period (the seed's getUsageSummary)"
    ),
    start: datetime | None = Query(default=None, alias="from"),
    end: datetime | None = Query(default=None, alias="to"),
    group_by: list[str] = GroupByQuery,
    asked_zone: str | None = Query(
        default=None,
        alias="timeZone",
        max_length=64,
        description="IANA time zone whose local hours, days and months the periods are (`Asia/Kolkata`); default: "
        "the subject's (`GET /v1/subjects/{subjectType}/{subjectId}`). Other than the rollups' UTC, they are summed "
        "exactly from the subject's records",
    ),
    who: Caller = Depends(reader),
) -> SummaryList:
    """Rollups of one metric for one subject: the period containing `periodStart`, or every period in [from, to).

    By default the total rows; with `groupBy` and/or `filterGroupBy`, the usage split by (or restricted to) values
    of the metric's dimensions, each summary's `dimensions` saying which (exact for every aggregation type). Periods
    are local to `timeZone`, by default the subject's."""
    context = context_of(request)
    dimensions = _dimension_query(request, group_by)
    zone_name = asked_zone or context.zone_of(subject_type, subject_id)
    try:
        zone = time_zone(zone_name)
    except UnknownTimeZone as error:
        raise ApiError(
            422, "invalid_time_zone", str(error), [FieldProblem(field="query.timeZone", message=str(error))]
        ) from None
    if who.org_id is not None and subject_type == "org" and subject_id != who.org_id:
        raise ApiError(403, "forbidden_org", f"this key acts for org {who.org_id!r} only")
    definition = _metric_for(context, metric_key, subject_id if subject_type == "org" else who.org_id)
    _checked(dimensions, definition, metric_key)
    if period_start_at is not None:
        first, last = local_period_bounds(period_type, _storable("periodStart", period_start_at), zone)
    else:
        first, last = _range(start, end)
    if who.org_id is not None and subject_type != "org":
        # The subject's org is known only from its records' metadata: it must have one in this org.
        owned = await context.query(
            usage_records_page,
            RecordFilter(
                datetime(1970, 1, 1, tzinfo=UTC),
                datetime(2106, 1, 1, tzinfo=UTC),
                subject_type,
                subject_id,
                None,
                who.org_id,
            ),
            None,
            1,
        )
        if not owned:
            return SummaryList(summaries=[])
    aggregation = definition.aggregation_type if definition is not None else None
    try:
        summaries = await context.query(
            usage_summaries,
            metric_key,
            subject_type,
            subject_id,
            period_type,
            first,
            last,
            dimensions,
            aggregation,
            zone_name,
            context.zone_rollups_from(subject_type, subject_id, zone_name),
        )
    except TooManyPeriods as error:
        raise ApiError(422, "too_many_periods", str(error)) from None
    if period_start_at is not None and not summaries and not dimensions.group_by:
        # The period has no usage (of those dimension values): zero, as the seed's getUsageSummary answers.
        labels = dimensions.labels(())
        summaries = [
            summary(metric_key, subject_type, subject_id, period_type, (first, last), Decimal(0), 0, labels, zone_name)
        ]
    return SummaryList(summaries=summaries)


_MEDIA_TYPES = {"csv": "text/csv", "jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}


@router.get(
    "/export",
    summary="usage.export",
    response_class=StreamingResponse,
    openapi_extra=_FILTER_GROUP_BY_DOC,
    responses={200: {"content": {m: {} for m in _MEDIA_TYPES.values()}, "description": "The records, streamed"}},
)
async def export_usage(
    request: Request,
    export_format: Literal["csv", "jsonl", "parquet"] = Query(default="csv", alias="format"),
    start: datetime | None = Query(default=None, alias="from"),
    end: datetime | None = Query(default=None, alias="to"),
    subject_type: Identifier | None = Query(default=None, alias="subjectType", min_length=1, max_length=256),
    subject_id: Identifier | None = Query(default=None, alias="subjectId", min_length=1, max_length=256),
    metric_key: Identifier | None = Query(default=None, alias="metricKey", min_length=1, max_length=256),
    who: Caller = Depends(reader),
) -> StreamingResponse:
    """Usage records of a time range, optionally one subject or metric, as CSV, JSON lines or Parquet; with
    `filterGroupBy[name]=value`, only the records with those dimension values. Each row ends with its `dimensions`."""
    dimensions = _dimension_query(request, [])
    if metric_key is not None and dimensions.filters:
        _checked(dimensions, _metric_for(context_of(request), metric_key, who.org_id), metric_key)
    selection = dataclasses.replace(
        _selection(who, start, end, subject_type, subject_id, metric_key), dimensions=dimensions.filters
    )
    assert export_format in EXPORT_FORMATS
    client = connect(context_of(request).settings)  # its own connection: a long stream must not hold the shared one
    try:
        stream = await asyncio.to_thread(open_usage_export, client, selection, export_format)
    except Exception:
        client.close()
        raise

    def chunks() -> Iterator[bytes]:
        try:
            yield from stream
        finally:
            client.close()

    filename = f"usage-{selection.start:%Y%m%dT%H%M%S}-{selection.end:%Y%m%dT%H%M%S}.{export_format}"
    return StreamingResponse(
        chunks(),
        media_type=_MEDIA_TYPES[export_format],
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
