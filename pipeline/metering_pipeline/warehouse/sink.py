"""Writes rollups, records, alerts and definitions to ClickHouse; every write is idempotent.

Rows are keyed by what they describe (a record's identity, a rollup's period, a definition's
id) and rollups carry a version, so writing the same rows again after a replay leaves the
tables as they were.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Generic, TypeVar

import orjson
from clickhouse_connect.driver.client import Client

from metering_pipeline.settings import Settings
from metering_pipeline.usage.meter import Dimensions
from metering_pipeline.usage.rollups import WIRE_NAME, ZONE_NAME, RollupChange
from metering_pipeline.usage.routed_record import CountedRecord
from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.migrations import migrate
from metering_pipeline.warehouse.mirrors import D, Mirror
from metering_pipeline.warehouse.queries import ALERT_COLUMNS, naive_utc

# usage_records' columns in the order the sink (and anything else inserting raw records) gives them.
RECORD_COLUMNS = [
    "subject_type",
    "subject_id",
    "metric_key",
    "id",
    "timestamp",
    "quantity",
    "metadata",
    "metric_id",
    "dimensions",
    "distinct_value",
]
_ROLLUP_COLUMNS = [
    "metric_key",
    "subject_type",
    "subject_id",
    "period_type",
    "period_start",
    "period_end",
    "aggregation_type",
    "total_quantity",
    "record_count",
    "sum_quantity",
    "min_quantity",
    "max_quantity",
    "version",
    "dimensions",
    "time_zone",
]


_ALERT_FIELDS = (
    "id",
    "type",
    "thresholdId",
    "metricKey",
    "subjectType",
    "subjectId",
    "threshold",
    "value",
    "periodType",
    "periodStart",
    "periodEnd",
    "action",
    "notifyEmails",
    "occurredAt",
    "dimensions",
    "timeZone",
)  # as ALERT_COLUMNS
_ALERT_DEFAULTS: dict[str, object] = {
    "dimensions": {},
    "timeZone": "UTC",
}  # of fields added since: alerts written before them lack them
_INSERT_SETTINGS = {"date_time_input_format": "best_effort"}  # RFC 3339 timestamps with offsets
_COLUMNS = "JSONCompactColumns"  # the hot tables (see records_body)
_ROWS = "JSONCompactEachRow"


_naive_utc = lru_cache(maxsize=8192)(naive_utc)  # period bounds repeat across a checkpoint's rows


T = TypeVar("T")


class GroupInsert(Generic[T]):
    """Rows for one table from many writers, sent as one insert: rows offered while an insert is in flight go out
    together in the next one (group commit).

    Every partition's writer writes its own checkpoints; one insert per partition per checkpoint would queue a dozen
    small inserts each second behind the sink's single connection (each costs ClickHouse about as much as a big one),
    and usage_summary would fall behind by the length of the queue. Each writer still awaits its own rows: `write`
    returns once they are in ClickHouse, or raises what the insert that carried them raised (the writer retries them).
    """

    def __init__(self, insert: Callable[[list[T]], Awaitable[None]]) -> None:
        self._insert = insert
        self._rows: list[T] = []
        self._waiting: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    async def write(self, rows: Sequence[T]) -> None:
        done = asyncio.get_running_loop().create_future()
        self._rows.extend(rows)
        self._waiting.append(done)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        await done

    async def _drain(self) -> None:
        while self._waiting:
            rows, waiting = self._rows, self._waiting
            self._rows, self._waiting = [], []
            try:
                await self._insert(rows)
            except asyncio.CancelledError:
                for done in (*waiting, *self._waiting):
                    done.cancel()
                self._rows, self._waiting = [], []
                raise
            except Exception as error:  # noqa: BLE001 - handed to each writer whose rows it carried
                for done in waiting:
                    if not done.done():
                        done.set_exception(error)
            else:
                for done in waiting:
                    if not done.done():
                        done.set_result(None)


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
        self._records = GroupInsert[CountedRecord](
            lambda records: self._insert("usage_records", records_body(records), RECORD_COLUMNS, _COLUMNS)
        )
        self._rollups = GroupInsert[RollupChange](
            lambda changes: self._insert("usage_rollups", rollups_body(changes), _ROLLUP_COLUMNS, _COLUMNS)
        )

    def _open(self) -> Client:
        migrate(self.settings)
        return connect(self.settings)

    async def _insert(self, table: str, body: bytes, columns: list[str], fmt: str = _ROWS) -> None:
        async with self._lock:
            if self._client is None:
                self._client = await asyncio.to_thread(self._open)
            await asyncio.to_thread(self._client.raw_insert, table, columns, body, _INSERT_SETTINGS, fmt)

    async def write_records(self, records: Sequence[CountedRecord]) -> None:
        if records:
            await self._records.write(records)

    async def write_rollups(self, changes: Sequence[RollupChange]) -> None:
        if changes:
            await self._rollups.write(changes)

    async def write_alerts(self, events: Sequence[dict[str, object]]) -> None:
        """Alerts as read from the alerts topic (parsed `ThresholdAlert` JSON, camelCase keys)."""
        if not events:
            return
        await self._insert(
            "threshold_events",
            _body([[event.get(field, _ALERT_DEFAULTS.get(field)) for field in _ALERT_FIELDS] for event in events]),
            list(ALERT_COLUMNS),
        )

    async def write_definition(self, mirror: Mirror[D], definition_id: str, definition: D | None, version: int) -> None:
        """Mirror one entry of a definitions topic; `None` (a tombstone) marks the definition deleted."""
        await self._insert(mirror.table, _body([mirror.row(definition_id, definition, version)]), mirror.all_columns)


# The hot tables go column by column (JSONCompactColumns: one JSON array per column), rendered by one orjson
# call with every decimal already an exact string: less than half the CPU of a row per orjson call, several
# times less than clickhouse-connect's Native encoding from Python objects (`metering bench --hot-path`).
def records_body(records: Sequence[CountedRecord]) -> bytes:
    return orjson.dumps(
        [
            [r.subject_type for r in records],
            [r.subject_id for r in records],
            [r.metric_key for r in records],
            [r.record_id for r in records],
            [_datetime64(r.timestamp_ms) for r in records],
            [str(r.quantity) for r in records],
            [r.metadata_json for r in records],
            [r.metric_id for r in records],
            [dimension_map(r.dimensions) if r.dimensions else TOTAL_ROW for r in records],
            [r.distinct or "" for r in records],
        ]
    )


TOTAL_ROW: dict[str, str] = {}  # rendered, never changed


@lru_cache(maxsize=65536)  # one dict per combination, shared by its records and rows
def dimension_map(dimensions: Dimensions) -> dict[str, str]:
    """A row's `dimensions` Map as JSON renders it ({} for a total row): callers on the hot path test for the total
    row first, which is cheaper than the cache lookup."""
    return dict(dimensions)


def _datetime64(epoch_ms: int) -> str:
    """ClickHouse's own DateTime64(3) text, UTC: a record's time without a datetime object per record."""
    seconds, millis = divmod(epoch_ms, 1000)
    return f"{_second_text(seconds)}.{millis:03d}"


@lru_cache(maxsize=65536)  # records of a checkpoint fall in few distinct seconds
def _second_text(epoch_seconds: int) -> str:
    return datetime.fromtimestamp(epoch_seconds, tz=UTC).replace(tzinfo=None).isoformat(sep=" ")


def rollups_body(changes: Sequence[RollupChange]) -> bytes:
    keys = [change.key for change in changes]
    return orjson.dumps(
        [
            [key[0] for key in keys],
            [key[1] for key in keys],
            [key[2] for key in keys],
            [WIRE_NAME[key[3]] for key in keys],
            [_naive_utc(key[4]) for key in keys],
            [_naive_utc(change.period_end) for change in changes],
            [WIRE_NAME[change.aggregation] for change in changes],
            [change.total_text for change in changes],
            [change.count for change in changes],
            [change.sum_text for change in changes],
            [change.min_text for change in changes],
            [change.max_text for change in changes],
            [change.version for change in changes],
            [dimension_map(key[5]) if key[5] else TOTAL_ROW for key in keys],
            [ZONE_NAME[key[3]] for key in keys],
        ]
    )


def _body(rows: list[list[object]]) -> bytes:
    return b"\n".join(orjson.dumps(row, default=_exact) for row in rows)
