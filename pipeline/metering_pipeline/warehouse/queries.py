"""Read-side queries over records and rollups (parameterized; shared by the CLI and the HTTP API)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson
from clickhouse_connect.driver.client import Client

from metering_schemas import PeriodType, UsageRecord, UsageSummary

_SUMMARY_SQL = """
SELECT metric_key, subject_type, subject_id, period_type, period_start, period_end, total_quantity, record_count
FROM usage_summary
WHERE metric_key = {metric_key:String}
  AND subject_type = {subject_type:String}
  AND subject_id = {subject_id:String}
  AND period_type = {period_type:String}
  AND period_start >= {start:DateTime}
  AND period_start < {end:DateTime}
ORDER BY period_start
"""


def usage_summaries(
    client: Client,
    metric_key: str,
    subject_type: str,
    subject_id: str,
    period_type: PeriodType,
    start: datetime,
    end: datetime,
) -> list[UsageSummary]:
    """The seed's getUsageSummary over a range: one summary per period starting in [start, end)."""
    result = client.query(_SUMMARY_SQL, parameters={
        "metric_key": metric_key,
        "subject_type": subject_type,
        "subject_id": subject_id,
        "period_type": period_type.value,
        "start": _naive(start),
        "end": _naive(end),
    })
    return [
        UsageSummary(
            id=f"{metric}:{stype}:{sid}:{period}:{pstart.isoformat()}",
            metric_key=metric, subject_type=stype, subject_id=sid, period_type=period,
            period_start=pstart, period_end=pend, total_quantity=total, record_count=count,
        )
        for metric, stype, sid, period, pstart, pend, total, count in result.result_rows
    ]


@dataclass(frozen=True)
class RecordFilter:
    """Which usage records a query reads; every value is bound as a parameter, never spliced into SQL."""

    start: datetime
    end: datetime
    subject_type: str | None = None
    subject_id: str | None = None
    metric_key: str | None = None
    org_id: str | None = None  # the record's org: the subject itself for `org` subjects, else metadata.orgId

    def where(self) -> tuple[str, dict[str, object]]:
        clauses = ["timestamp >= {start:DateTime64(3)}", "timestamp < {end:DateTime64(3)}"]
        parameters: dict[str, object] = {"start": _naive(self.start), "end": _naive(self.end)}
        for column, value in (("subject_type", self.subject_type), ("subject_id", self.subject_id),
                              ("metric_key", self.metric_key)):
            if value is not None:
                clauses.append(f"{column} = {{{column}:String}}")
                parameters[column] = value
        if self.org_id is not None:
            clauses.append("if(subject_type = 'org', subject_id, JSONExtractString(metadata, 'orgId')) = {org_id:String}")
            parameters["org_id"] = self.org_id
        return " AND ".join(clauses), parameters


_RECORD_SELECT = "SELECT id, metric_key, subject_type, subject_id, quantity, timestamp, metadata FROM usage_records FINAL"


def usage_records_page(client: Client, selection: RecordFilter, after: tuple[datetime, str] | None,
                       limit: int) -> list[UsageRecord]:
    """usage.get: records in (timestamp, id) order, `limit` at a time after the keyset cursor `after`."""
    where, parameters = selection.where()
    if after is not None:
        where += " AND (timestamp, id) > ({after_ts:DateTime64(3)}, {after_id:String})"
        parameters |= {"after_ts": _naive(after[0]), "after_id": after[1]}
    rows = client.query(f"{_RECORD_SELECT} WHERE {where} ORDER BY timestamp, id LIMIT {{limit:UInt32}}",
                        parameters=parameters | {"limit": limit}).result_rows
    return [
        UsageRecord(id=record_id, metric_key=metric, subject_type=stype, subject_id=sid, quantity=quantity,
                    timestamp=ts, metadata=orjson.loads(metadata or "{}"))
        for record_id, metric, stype, sid, quantity, ts, metadata in rows
    ]


EXPORT_FORMATS = {"csv": "CSVWithNames", "jsonl": "JSONEachRow", "parquet": "Parquet"}


def open_usage_export(client: Client, selection: RecordFilter, export_format: str) -> Iterator[bytes]:
    """usage.export: ClickHouse renders the format and its bytes stream through in chunks, never all in memory.

    The query runs (and fails, if it does) before this returns; iterating reads the stream and closes it.
    """
    where, parameters = selection.where()
    query = (
        "SELECT id, metric_key AS metricKey, subject_type AS subjectType, subject_id AS subjectId, "
        "toString(quantity) AS quantity, formatDateTime(at, '%Y-%m-%dT%H:%i:%S.%fZ', 'UTC') AS timestamp, metadata "
        "FROM (SELECT id, metric_key, subject_type, subject_id, quantity, timestamp AS at, metadata "
        f"FROM usage_records FINAL WHERE {where} ORDER BY timestamp, id)"
    )
    stream = client.raw_stream(query, parameters=parameters, fmt=EXPORT_FORMATS[export_format])

    def chunks() -> Iterator[bytes]:
        try:
            yield from stream
        finally:
            stream.close()

    return chunks()


def _naive(at: datetime) -> datetime:
    return at.astimezone(timezone.utc).replace(tzinfo=None)
