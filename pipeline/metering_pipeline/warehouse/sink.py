"""Writes rollups, records, alerts and definitions to ClickHouse; every write is idempotent.

Rows are keyed by what they describe (a record's identity, a rollup's period, a definition's
id) and rollups carry a version, so writing the same rows again after a replay leaves the
tables as they were.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from decimal import Decimal

import orjson
from clickhouse_connect.driver.client import Client

from metering_pipeline.settings import Settings
from metering_pipeline.usage.rollups import CountedRecord, RollupChange
from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.migrations import migrate
from metering_pipeline.warehouse.mirrors import D, Mirror
from metering_pipeline.warehouse.queries import ALERT_COLUMNS, naive_utc

_RECORD_COLUMNS = ["subject_type", "subject_id", "metric_key", "id", "timestamp", "quantity", "metadata", "metric_id"]
_ROLLUP_COLUMNS = [
    "metric_key", "subject_type", "subject_id", "period_type", "period_start", "period_end", "aggregation_type",
    "total_quantity", "record_count", "sum_quantity", "min_quantity", "max_quantity", "version",
]


_ALERT_FIELDS = ("id", "type", "thresholdId", "metricKey", "subjectType", "subjectId", "threshold", "value",
                 "periodType", "periodStart", "periodEnd", "action", "notifyEmails", "occurredAt")  # as ALERT_COLUMNS
_INSERT_SETTINGS = {"date_time_input_format": "best_effort"}  # RFC 3339 timestamps with offsets


def _exact(value: object) -> str:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to ClickHouse")


class ClickHouseSink:
    """Thin adapter: blocking clickhouse-connect calls run in a thread so the event loop keeps consuming.

    It connects, and applies the migrations, on its first write rather than when it is made: a worker
    starts, consumes and alerts while ClickHouse is down or hanging, and its writes wait (retried by
    their callers) until ClickHouse answers.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Client | None = None
        self._lock = asyncio.Lock()  # one client, one request at a time

    def _open(self) -> Client:
        migrate(self.settings)
        return connect(self.settings)

    async def _insert(self, table: str, rows: list[list[object]], columns: list[str]) -> None:
        """Rows go as JSONCompactEachRow rendered by orjson (decimals as exact strings): several times
        cheaper in Python than clickhouse-connect's column-by-column Native encoding."""
        body = b"\n".join(orjson.dumps(row, default=_exact) for row in rows)
        async with self._lock:
            if self._client is None:
                self._client = await asyncio.to_thread(self._open)
            await asyncio.to_thread(self._client.raw_insert, table, columns, body, _INSERT_SETTINGS, "JSONCompactEachRow")

    async def write_records(self, records: Sequence[CountedRecord]) -> None:
        if not records:
            return
        rows = [
            [r.identity[0], r.identity[1], r.metric_key, r.identity[2], r.timestamp, r.quantity, r.metadata_json, r.metric_id]
            for r in records
        ]
        await self._insert("usage_records", rows, _RECORD_COLUMNS)

    async def write_rollups(self, changes: Sequence[RollupChange]) -> None:
        if not changes:
            return
        rows = []
        for change in changes:
            metric_key, subject_type, subject_id, period, start = change.key
            aggregate = change.rollup.aggregate
            rows.append([
                metric_key, subject_type, subject_id, period.value, naive_utc(start), naive_utc(change.period_end),
                change.rollup.aggregation.value, change.rollup.total(), aggregate.count, aggregate.sum,
                aggregate.min, aggregate.max, change.rollup.version,
            ])
        await self._insert("usage_rollups", rows, _ROLLUP_COLUMNS)

    async def write_alerts(self, events: Sequence[dict[str, object]]) -> None:
        """Alerts as read from the alerts topic (parsed `ThresholdAlert` JSON, camelCase keys)."""
        if not events:
            return
        await self._insert("threshold_events", [[event.get(field) for field in _ALERT_FIELDS] for event in events],
                           list(ALERT_COLUMNS))

    async def write_definition(self, mirror: Mirror[D], definition_id: str, definition: D | None, version: int) -> None:
        """Mirror one entry of a definitions topic; `None` (a tombstone) marks the definition deleted."""
        await self._insert(mirror.table, [mirror.row(definition_id, definition, version)], mirror.all_columns)
