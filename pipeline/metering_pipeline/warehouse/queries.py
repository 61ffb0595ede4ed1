"""Read-side queries over records and rollups (parameterized; shared by the CLI and the HTTP API)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from io import IOBase
from typing import Any, cast

import orjson
from clickhouse_connect.driver.client import Client

from metering_pipeline.usage.aggregation import plain, total
from metering_pipeline.usage.periods import EPOCH, local_period_end, local_period_start, time_zone
from metering_pipeline.warehouse.grouping import DimensionQuery, DimensionRow, Group, group_rows, summary_id
from metering_schemas import AggregationType, PeriodType, UsageRecord, UsageSummary

# Only the total rows (`dimensions = {}`): a grouped metric's dimension rows are beside them, not part of them.
_SUMMARY_SQL = """
SELECT period_start, period_end, total_quantity, record_count
FROM usage_summary
WHERE metric_key = {metric_key:String}
  AND subject_type = {subject_type:String}
  AND subject_id = {subject_id:String}
  AND period_type = {period_type:String}
  AND period_start >= {start:DateTime}
  AND period_start < {end:DateTime}
  AND empty(dimensions)
  AND time_zone = {time_zone:String}
ORDER BY period_start
"""

# A dimension row matches a filter when its map holds the name with that value (names and values are bound as
# arrays, never spliced into the SQL).
_DIMENSIONS_MATCH = (
    "arrayAll((name, value) -> mapContains(dimensions, name) AND dimensions[name] = value, "
    "{filter_names:Array(String)}, {filter_values:Array(String)})"
)

# The dimension rows with the state they were computed from, so that rows of a subset of dimensions merge exactly.
_DIMENSION_ROWS_SQL = f"""
SELECT period_start, period_end, aggregation_type, dimensions, total_quantity, record_count, sum_quantity,
       min_quantity, max_quantity
FROM usage_rollups FINAL
WHERE metric_key = {{metric_key:String}}
  AND subject_type = {{subject_type:String}}
  AND subject_id = {{subject_id:String}}
  AND period_type = {{period_type:String}}
  AND period_start >= {{start:DateTime}}
  AND period_start < {{end:DateTime}}
  AND NOT empty(dimensions)
  AND time_zone = 'UTC'
  AND {_DIMENSIONS_MATCH}
ORDER BY period_start
"""

# Each record's period, as the worker buckets it (UTC hours, days, calendar months).
_PERIOD_OF = {
    PeriodType.HOURLY: "toStartOfHour(timestamp)",
    PeriodType.DAILY: "toStartOfDay(timestamp)",
    PeriodType.MONTHLY: "toStartOfMonth(timestamp)",
}

# One metric's records of one subject in a time range (those the worker counted, with FINAL).
_RECORDS_OF = """subject_type = {subject_type:String}
  AND subject_id = {subject_id:String}
  AND metric_key = {metric_key:String}
  AND timestamp >= {start:DateTime64(3)}
  AND timestamp < {end:DateTime64(3)}"""

# UNIQUE_COUNT and LATEST of the groups whose rows cannot be added: from the records the worker counted, each once
# (FINAL), per period [period_start, period_end) and groupBy values.
_DIMENSION_RECORDS_SQL = """
SELECT toDateTime({period_of}, 'UTC') AS period, arrayMap(name -> dimensions[name], {{group_by:Array(String)}}) AS key,
       uniqExact(distinct_value), argMax(quantity, (timestamp, id))
FROM usage_records FINAL
WHERE {records_of}
  AND NOT empty(dimensions)
  AND {match}
GROUP BY period, key
"""


def usage_summaries(
    client: Client,
    metric_key: str,
    subject_type: str,
    subject_id: str,
    period_type: PeriodType,
    start: datetime,
    end: datetime,
    dimensions: DimensionQuery = DimensionQuery(),
    aggregation: AggregationType | None = None,
    zone_name: str = "UTC",
    zone_rollups_from: datetime | None = EPOCH,
) -> list[UsageSummary]:
    """The seed's getSummary over a range: one summary per period starting in [start, end) — the total rows, or
    with `dimensions` one per period and combination of the groupBy values among the rows its filters match.

    `aggregation` is the metric's type as defined now; rows carry the type they were computed with, which wins
    (the definition's decides only between rows of a period that straddles a change of type). Periods are `zone_name`'s,
    from the rollups cut in that zone when they hold every record of the range (since `zone_rollups_from`: EPOCH,
    always; None, never; a local zone's with dimensions, never), else exactly from the records (`_zoned_summaries`).
    """
    from_rollups = zone_rollups_from is not None and start >= zone_rollups_from
    if not from_rollups or (zone_name != "UTC" and not dimensions.is_total):
        return _zoned_summaries(
            client, metric_key, subject_type, subject_id, period_type, zone_name, start, end, dimensions, aggregation
        )
    parameters = {
        "metric_key": metric_key,
        "subject_type": subject_type,
        "subject_id": subject_id,
        "period_type": period_type.value,
        "start": naive_utc(start),
        "end": naive_utc(end),
    }
    if dimensions.is_total:
        result = client.query(_SUMMARY_SQL, parameters=parameters | {"time_zone": zone_name})
        return [
            summary(
                metric_key, subject_type, subject_id, period_type, (pstart, pend), plain(total), count, None, zone_name
            )
            for pstart, pend, total, count in result.result_rows
        ]
    match = {"filter_names": dimensions.filter_names(), "filter_values": dimensions.filter_values()}
    rows = [
        DimensionRow(_utc(pstart), _utc(pend), AggregationType(kind), dict(dims), total, count, sum_, low, high)
        for pstart, pend, kind, dims, total, count, sum_, low, high in client.query(
            _DIMENSION_ROWS_SQL, parameters=parameters | match
        ).result_rows
    ]
    groups = group_rows(rows, dimensions)
    from_records = _records_values(
        client, [g for g in groups if g.needs_records(aggregation)], dimensions, period_type, parameters, match
    )
    summaries = []
    for group in groups:
        kind = group.aggregation(aggregation)
        if group.needs_records(aggregation):
            distinct, latest = from_records.get((group.period_start, group.values), (0, Decimal(0)))
            value = Decimal(distinct) if kind is AggregationType.UNIQUE_COUNT else plain(latest)
        else:
            value = group.merged_total(aggregation)
        period = (group.period_start, group.period_end)
        labels = dimensions.labels(group.values)
        summaries.append(
            summary(metric_key, subject_type, subject_id, period_type, period, value, group.record_count(), labels)
        )
    return summaries


def summary(
    metric_key: str,
    subject_type: str,
    subject_id: str,
    period_type: PeriodType,
    period: tuple[datetime, datetime],
    value: Decimal,
    count: int,
    labels: dict[str, str] | None = None,
    zone_name: str = "UTC",
) -> UsageSummary:
    """A UsageSummary with its id: the seed's, with the dimension row's labels after it."""
    labels = labels or {}
    return UsageSummary(
        id=summary_id(metric_key, subject_type, subject_id, period_type.value, period[0], labels),
        metric_key=metric_key,
        subject_type=subject_type,
        subject_id=subject_id,
        period_type=period_type,
        period_start=period[0],
        period_end=period[1],
        total_quantity=value,
        record_count=count,
        dimensions=labels,
        time_zone=zone_name,
    )


def _records_values(
    client: Client,
    groups: list[Group],
    dimensions: DimensionQuery,
    period_type: PeriodType,
    parameters: dict[str, Any],
    match: dict[str, Any],
) -> dict[tuple[datetime, tuple[str, ...]], tuple[int, Decimal]]:
    """(distinct values, latest quantity) per (period start, groupBy values), over the records of those groups."""
    if not groups:
        return {}
    first = min(g.period_start for g in groups)
    last = max(g.period_end for g in groups)
    sql = _DIMENSION_RECORDS_SQL.format(
        period_of=_PERIOD_OF[period_type], records_of=_RECORDS_OF, match=_DIMENSIONS_MATCH
    )
    result = client.query(
        sql,
        parameters=parameters
        | match
        | {"start": naive_utc(first), "end": naive_utc(last), "group_by": list(dimensions.group_by)},
    )
    return {(_utc(period), tuple(key)): (int(distinct), latest) for period, key, distinct, latest in result.result_rows}


# One metric's records per local period (its index among the period bounds, given in epoch milliseconds) and groupBy
# values: everything any aggregation type needs, summed as Decimal256 so that no total can overflow.
_ZONED_SQL = f"""
SELECT arrayCount(bound -> bound <= toUnixTimestamp64Milli(timestamp), {{bounds:Array(Int64)}}) AS period,
       arrayMap(name -> dimensions[name], {{group_by:Array(String)}}) AS key,
       count(), sum(toDecimal256(quantity, 18)), min(quantity), max(quantity), uniqExact(distinct_value),
       argMax(quantity, (timestamp, id))
FROM usage_records FINAL
WHERE {_RECORDS_OF}
  AND {_DIMENSIONS_MATCH}
GROUP BY period, key
ORDER BY period, key
"""
MOST_ZONED_PERIODS = 10_000  # a year and more of hours: the bounds travel as one query parameter


class TooManyPeriods(ValueError):
    """A zoned query over more periods than MOST_ZONED_PERIODS."""


def _zoned_summaries(
    client: Client,
    metric_key: str,
    subject_type: str,
    subject_id: str,
    period_type: PeriodType,
    zone_name: str,
    start: datetime,
    end: datetime,
    dimensions: DimensionQuery = DimensionQuery(),
    aggregation: AggregationType | None = None,
) -> list[UsageSummary]:
    """Summaries in another time zone than the rollups were cut in: exactly, from the records the worker counted
    (each once), one per local period starting in [start, end) and groupBy values."""
    zone = time_zone(zone_name)
    bounds = [local_period_start(period_type, start, zone)]
    while bounds[-1] < end:
        if len(bounds) > MOST_ZONED_PERIODS:
            raise TooManyPeriods(f"more than {MOST_ZONED_PERIODS} {period_type.value} periods: ask for a shorter range")
        bounds.append(local_period_end(period_type, bounds[-1], zone))
    if bounds[0] < start:  # the period holding `start` began before it: it is not one starting in the range
        bounds = bounds[1:]
    if len(bounds) < 2:
        return []
    kind = aggregation or AggregationType.SUM
    result = client.query(
        _ZONED_SQL,
        parameters={
            "metric_key": metric_key,
            "subject_type": subject_type,
            "subject_id": subject_id,
            "start": naive_utc(bounds[0]),
            "end": naive_utc(bounds[-1]),
            "bounds": [int(bound.timestamp() * 1000) for bound in bounds],
            "group_by": list(dimensions.group_by),
            "filter_names": dimensions.filter_names(),
            "filter_values": dimensions.filter_values(),
        },
    )
    summaries = []
    for index, key, count, sum_, low, high, distinct, latest in result.result_rows:
        period = (bounds[index - 1], bounds[index])
        if kind is AggregationType.UNIQUE_COUNT:
            value = Decimal(distinct)
        elif kind is AggregationType.LATEST:
            value = plain(latest)
        else:
            value = plain(total(kind, count, sum_, low, high))
        labels = dimensions.labels(tuple(key))
        summaries.append(
            summary(metric_key, subject_type, subject_id, period_type, period, value, count, labels, zone_name)
        )
    return summaries


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


@dataclass(frozen=True)
class RecordFilter:
    """Which usage records a query reads; every value is bound as a parameter, never spliced into SQL."""

    start: datetime
    end: datetime
    subject_type: str | None = None
    subject_id: str | None = None
    metric_key: str | None = None
    org_id: str | None = None  # the record's org: the subject itself for `org` subjects, else metadata.orgId
    # (name, value) pairs every record must have among its dimensions (usage_records.dimensions; {} when ungrouped)
    dimensions: tuple[tuple[str, str], ...] = ()

    def where(self) -> tuple[str, dict[str, object]]:
        clauses = ["timestamp >= {start:DateTime64(3)}", "timestamp < {end:DateTime64(3)}"]
        parameters: dict[str, object] = {"start": naive_utc(self.start), "end": naive_utc(self.end)}
        for column, value in (
            ("subject_type", self.subject_type),
            ("subject_id", self.subject_id),
            ("metric_key", self.metric_key),
        ):
            if value is not None:
                clauses.append(f"{column} = {{{column}:String}}")
                parameters[column] = value
        if self.org_id is not None:
            clauses.append(
                "if(subject_type = 'org', subject_id, JSONExtractString(metadata, 'orgId')) = {org_id:String}"
            )
            parameters["org_id"] = self.org_id
        if self.dimensions:
            clauses.append(_DIMENSIONS_MATCH)
            parameters |= {
                "filter_names": [n for n, _ in self.dimensions],
                "filter_values": [v for _, v in self.dimensions],
            }
        return " AND ".join(clauses), parameters


_RECORD_SELECT = (
    "SELECT id, metric_key, subject_type, subject_id, quantity, timestamp, metadata FROM usage_records FINAL"
)


def usage_records_page(
    client: Client, selection: RecordFilter, after: tuple[datetime, str] | None, limit: int
) -> list[UsageRecord]:
    """usage.get: records in (timestamp, id) order, `limit` at a time after the keyset cursor `after`."""
    where, parameters = selection.where()
    if after is not None:
        where += " AND (timestamp, id) > ({after_ts:DateTime64(3)}, {after_id:String})"
        parameters |= {"after_ts": naive_utc(after[0]), "after_id": after[1]}
    rows = client.query(
        f"{_RECORD_SELECT} WHERE {where} ORDER BY timestamp, id LIMIT {{limit:UInt32}}",
        parameters=parameters | {"limit": limit},
    ).result_rows
    return [
        UsageRecord(
            id=record_id,
            metric_key=metric,
            subject_type=stype,
            subject_id=sid,
            quantity=quantity,
            timestamp=ts,
            metadata=orjson.loads(metadata or "{}"),
        )
        for record_id, metric, stype, sid, quantity, ts, metadata in rows
    ]


EXPORT_FORMATS = {"csv": "CSVWithNames", "jsonl": "JSONEachRow", "parquet": "Parquet"}


def open_usage_export(client: Client, selection: RecordFilter, export_format: str) -> Iterator[bytes]:
    """usage.export: ClickHouse renders the format and its bytes stream through in chunks, never all in memory.

    The last column, `dimensions`, is the record's dimension values: a JSON object in JSON lines, its JSON text in
    CSV and Parquet (like `metadata`). The query runs (and fails, if it does) before this returns; iterating reads
    the stream and closes it.
    """
    where, parameters = selection.where()
    dimensions = "dims" if export_format == "jsonl" else "toJSONString(dims)"
    query = (
        "SELECT id, metric_key AS metricKey, subject_type AS subjectType, subject_id AS subjectId, "
        "toString(quantity) AS quantity, formatDateTime(at, '%Y-%m-%dT%H:%i:%S.%fZ', 'UTC') AS timestamp, metadata, "
        f"{dimensions} AS dimensions "
        "FROM (SELECT id, metric_key, subject_type, subject_id, quantity, timestamp AS at, metadata, "
        "dimensions AS dims "
        f"FROM usage_records FINAL WHERE {where} ORDER BY timestamp, id)"
    )
    # An IOBase: a StreamContext is the async client's answer.
    stream = cast(IOBase, client.raw_stream(query, parameters=parameters, fmt=EXPORT_FORMATS[export_format]))

    def chunks() -> Iterator[bytes]:
        try:
            yield from stream
        finally:
            stream.close()

    return chunks()


def naive_utc(at: datetime) -> datetime:
    """clickhouse-connect binds naive datetimes as they are: make them UTC first."""
    return at.replace(tzinfo=None) if at.tzinfo is UTC else at.astimezone(UTC).replace(tzinfo=None)


def subjects_with_usage(
    client: Client, subject_type: str | None, search: str | None, limit: int
) -> list[tuple[str, str]]:
    """(subject type, subject id) pairs that have monthly rollups, for pickers; most recently active first.

    Total rows only: a grouped metric's dimension rows name the same subjects and would only cost reading them."""
    clauses = ["period_type = 'MONTHLY'", "empty(dimensions)"]
    parameters: dict[str, object] = {"limit": limit}
    if subject_type is not None:
        clauses.append("subject_type = {subject_type:String}")
        parameters["subject_type"] = subject_type
    if search:
        clauses.append("positionCaseInsensitive(subject_id, {search:String}) > 0")
        parameters["search"] = search
    rows = client.query(
        f"SELECT subject_type, subject_id FROM usage_rollups WHERE {' AND '.join(clauses)} "
        "GROUP BY subject_type, subject_id ORDER BY max(period_start) DESC, subject_type, subject_id "
        "LIMIT {limit:UInt32}",
        parameters=parameters,
    ).result_rows
    return [(row[0], row[1]) for row in rows]


# The columns of threshold_events, in the order the sink writes them.
ALERT_COLUMNS = (
    "id",
    "type",
    "threshold_id",
    "metric_key",
    "subject_type",
    "subject_id",
    "threshold",
    "value",
    "period_type",
    "period_start",
    "period_end",
    "action",
    "notify_emails",
    "occurred_at",
    "dimensions",
    "time_zone",
)


def recent_alerts(client: Client, subject_type: str, subject_id: str, limit: int) -> list[dict[str, object]]:
    """A subject's threshold events, newest first (rows as dicts keyed by column)."""
    result = client.query(
        f"SELECT {', '.join(ALERT_COLUMNS)} FROM threshold_events FINAL "
        "WHERE subject_type = {subject_type:String} AND subject_id = {subject_id:String} "
        "ORDER BY occurred_at DESC, id LIMIT {limit:UInt32}",
        parameters={"subject_type": subject_type, "subject_id": subject_id, "limit": limit},
    )
    return [dict(zip(ALERT_COLUMNS, row, strict=True)) for row in result.result_rows]


def exceeded_alerts(
    client: Client, subject_type: str, subject_id: str, threshold_ids: list[str]
) -> set[tuple[str, datetime, Decimal]]:
    """(threshold id, window start, limit) of every threshold.exceeded the subject has had for these thresholds."""
    rows = client.query(
        "SELECT DISTINCT threshold_id, period_start, threshold FROM threshold_events "
        "WHERE subject_type = {subject_type:String} AND subject_id = {subject_id:String} "
        "AND type = 'threshold.exceeded' AND threshold_id IN {ids:Array(String)}",
        parameters={"subject_type": subject_type, "subject_id": subject_id, "ids": threshold_ids},
    ).result_rows
    return {(tid, start.replace(tzinfo=UTC), limit) for tid, start, limit in rows}
