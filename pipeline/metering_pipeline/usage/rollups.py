"""Per-partition rollup state: de-duplicate records, fold them into hourly/daily/monthly aggregates.

The state of one partition of the subject-routed stream. It changes only through `apply`,
remembers what changed since the last checkpoint, and can be rebuilt from the checkpoints
it produced, so a restarted worker continues exactly where the last committed checkpoint
left it.

`apply` is the hot path of the rollup stage (three or four rollups per record): records arrive as
msgspec structs straight from the routed message, periods come from a per-hour cache, and the
sums are added in place under the exact decimal context rather than through a method per rollup.
"""

from __future__ import annotations

import decimal
from sys import intern
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import lru_cache
from typing import NamedTuple

import msgspec

from metering_pipeline.usage.aggregation import EXACT, total
from metering_pipeline.usage.dedup import DedupWindow, RecordIdentity
from metering_pipeline.usage.periods import EPOCH, period_end, starts_of_hour
from metering_schemas import AggregationType, PeriodType, ResetPeriod

# metric_key, subject_type, subject_id, period, start. Besides the hourly, daily and monthly
# rollups that reach ClickHouse, each subject of a metric whose resetPeriod is NEVER has an all-time
# one (ResetPeriod.NEVER, start EPOCH) that its thresholds are evaluated against. Only those: an
# all-time rollup never leaves memory, so one per subject of every metric would grow without bound.
RollupKey = tuple[str, str, str, PeriodType | ResetPeriod, datetime]
LIFETIME = ResetPeriod.NEVER
_HOUR_MS = 3_600_000
_ZERO = Decimal(0)
# Members' values by dictionary: an enum's `.value` (and orjson's enum support) costs more, once per written rollup.
WIRE_NAME: dict[PeriodType | ResetPeriod | AggregationType, str] = {
    member: member.value for member in (*PeriodType, *ResetPeriod, *AggregationType)}


class CountedRecord(msgspec.Struct, array_like=True, gc=False):
    """A record as the rollup stage sees it: validated, its metric resolved, routed by subject.

    Also the routed topic's record layout (see `worker.routing`): fields are only ever appended.
    """

    subject_type: str
    subject_id: str
    record_id: str  # the record's id, or its deterministic source position when it had none
    metric_key: str
    metric_id: str
    aggregation: AggregationType
    quantity: Decimal
    timestamp_ms: int  # epoch milliseconds, UTC
    metadata_json: str
    # Counted into an all-time rollup too (its metric never resets). True when absent: routed by an older worker,
    # which kept an all-time rollup for every metric.
    all_time: bool = True

    @property
    def timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=timezone.utc)


class Rollup(msgspec.Struct, gc=False):
    """A period's running aggregate (count, sum, min, max: what every aggregation type is computed from) and what it is
    about. One per rollup, three or four per (metric, subject), so it is kept small: a struct without the cyclic collector's
    header (it refers to no container, so it can be in no cycle)."""

    aggregation: AggregationType
    count: int = 0
    sum: Decimal = _ZERO
    min: Decimal | None = None
    max: Decimal | None = None
    version: int = -1
    metric_id: str | None = None  # the definition that governs it (thresholds read its resetPeriod)

    def total(self) -> Decimal:
        return total(self.aggregation, self.count, self.sum, self.min, self.max)


class RollupChange(NamedTuple):
    """A rollup's value as of a checkpoint, as the changelog, usage.aggregated and ClickHouse write it: one flat tuple
    of exact decimal texts, so later records do not change it (checkpoints are written after the stream moves on), and
    each value is turned into text once, not once per output (a Decimal's `str` is most of what a row costs)."""

    key: RollupKey
    aggregation: AggregationType
    count: int
    sum_text: str
    min_text: str | None
    max_text: str | None
    version: int
    metric_id: str | None
    total_text: str  # totalQuantity, exact (AVG divides)

    @classmethod
    def of(cls, key: RollupKey, rollup: Rollup) -> RollupChange:
        return _freeze(key, rollup)

    @property
    def period_end(self) -> datetime:
        return period_end(self.key[3], self.key[4])

    @property
    def reported(self) -> bool:
        """Hourly, daily and monthly rollups go to ClickHouse and usage.aggregated; the all-time one stays internal."""
        return self.key[3] is not LIFETIME


_make_change = RollupChange._make  # tuple.__new__ in C, not the generated __new__ in Python


_SUM, _MIN, _MAX, _COUNT = AggregationType.SUM, AggregationType.MIN, AggregationType.MAX, AggregationType.COUNT


def _freeze(key: RollupKey, rollup: Rollup) -> RollupChange:
    """Texts shared where the values are the same object: a rollup of one record holds its quantity as sum, min and
    max (most rollups of a checkpoint, when records spread over many subjects), and the total is one of them unless
    the metric averages or counts."""
    sum_, low, high, aggregation = rollup.sum, rollup.min, rollup.max, rollup.aggregation
    sum_text = str(sum_)
    min_text = sum_text if low is sum_ else None if low is None else str(low)
    max_text = min_text if high is low else sum_text if high is sum_ else None if high is None else str(high)
    if aggregation is _SUM:
        total_text = sum_text
    elif aggregation is _COUNT:
        total_text = str(rollup.count)
    elif aggregation is _MAX and rollup.count:
        total_text = max_text  # type: ignore[assignment]
    elif aggregation is _MIN and rollup.count:
        total_text = min_text  # type: ignore[assignment]
    else:
        total_text = str(total(aggregation, rollup.count, sum_, low, high))
    return _make_change((key, aggregation, rollup.count, sum_text, min_text, max_text, rollup.version,
                         rollup.metric_id, total_text))


class Checkpoint(NamedTuple):
    """What changed since the previous checkpoint: rewritten rollups, new records, new identities."""

    rollups: list[RollupChange]
    records: list[CountedRecord]
    identities: list[tuple[RecordIdentity, datetime]]
    closed: list[tuple[int, CountedRecord]]  # (routed offset, record) refused: their periods were already evicted

    def is_empty(self) -> bool:
        return not (self.rollups or self.records or self.closed)


@lru_cache(maxsize=4096)
def _periods_of_hour(hour: int) -> tuple[tuple[PeriodType | ResetPeriod, datetime], ...]:
    """Hour, day, month and all time of an epoch hour; records cluster in few hours, so this is a cache hit."""
    return (*starts_of_hour(hour), (LIFETIME, EPOCH))


def _first_open_hour(closed_before: datetime | None) -> int:
    """The first epoch hour that ends at or after `closed_before`: records of earlier hours are refused."""
    if closed_before is None:
        return -(2**62)
    micros = (closed_before - EPOCH) // timedelta(microseconds=1)
    return -(-micros // (_HOUR_MS * 1000)) - 1


class PartitionRollups:
    def __init__(self, dedup_window: timedelta) -> None:
        self.dedup = DedupWindow(dedup_window)
        self.rollups: dict[RollupKey, Rollup] = {}
        self._changed: dict[RollupKey, Rollup] = {}  # since the last checkpoint
        self._records: list[CountedRecord] = []
        self._identities: list[tuple[RecordIdentity, datetime]] = []
        self._closed: list[tuple[int, CountedRecord]] = []

    def apply(self, records: Sequence[CountedRecord], offset: int, seen_at: datetime,
              touched: set[RollupKey] | None = None, closed_before: datetime | None = None) -> tuple[int, int]:
        """Count each new record of one routed message (at `offset`) once in each of its periods; returns
        (counted, duplicates).

        The keys of the rollups it changes are added to `touched` (for threshold checks). A record whose
        hour ended before `closed_before` (the eviction horizon) is refused into the checkpoint's `closed`:
        its rollups may have left memory, and counting it into a fresh one would overwrite the final
        total in ClickHouse with a smaller one.
        """
        changed: dict[RollupKey, Rollup] = {}
        first_open_hour = _first_open_hour(closed_before)
        admit = self.dedup.admitter(seen_at)
        rollups = self.rollups
        keep_record, keep_identity = self._records.append, self._identities.append
        counted = duplicates = 0
        with decimal.localcontext(EXACT):  # `+` below is exact or raises
            for record in records:
                hour = record.timestamp_ms // _HOUR_MS
                if hour < first_open_hour:
                    self._closed.append((offset, record))
                    continue
                # One string object per subject and metric, however many records and rollups name it (decoding makes
                # one per record, and an update stores the record's metric id): at a million keys the copies cost
                # more memory than the rollups.
                subject_type, subject_id = intern(record.subject_type), intern(record.subject_id)
                identity = (subject_type, subject_id, record.record_id)
                if not admit(identity):
                    duplicates += 1
                    continue
                counted += 1
                keep_record(record)
                keep_identity((identity, seen_at))
                quantity, metric_key, metric_id = record.quantity, intern(record.metric_key), intern(record.metric_id)
                for period, start in _periods_of_hour(hour) if record.all_time else starts_of_hour(hour):
                    key = (metric_key, subject_type, subject_id, period, start)
                    rollup = rollups.get(key)
                    if rollup is None:  # its first record: the quantity object itself is sum, min and max (no copy)
                        rollups[key] = changed[key] = Rollup(record.aggregation, 1, quantity, quantity, quantity, offset,
                                                             metric_id)
                        continue
                    rollup.aggregation = record.aggregation
                    rollup.metric_id = metric_id
                    rollup.count += 1
                    rollup.sum += quantity
                    if rollup.min is None or quantity < rollup.min:
                        rollup.min = quantity
                    if rollup.max is None or quantity > rollup.max:
                        rollup.max = quantity
                    if offset > rollup.version:
                        rollup.version = offset
                    changed[key] = rollup
        self._changed.update(changed)
        if touched is not None:
            touched.update(changed)
        return counted, duplicates

    @property
    def pending_records(self) -> int:
        """Counted since the last checkpoint."""
        return len(self._records)

    def checkpoint(self) -> Checkpoint:
        """Hand over everything changed since the last checkpoint (as of now) and start a new one."""
        changes = [_freeze(key, rollup) for key, rollup in self._changed.items()]
        checkpoint = Checkpoint(changes, self._records, self._identities, self._closed)
        self._closed = []
        self._changed = {}
        self._records = []
        self._identities = []
        return checkpoint

    def restore(self, rollups: Iterable[tuple[RollupKey, Rollup]], identities: Iterable[tuple[RecordIdentity, datetime]]) -> None:
        """Rebuild from committed checkpoints (later entries for a key replace earlier ones)."""
        for key, rollup in rollups:
            self.rollups[key] = rollup
        self.dedup.remember(identities)

    def evict_before(self, horizon: datetime) -> list[RollupKey]:
        """Drop rollups whose period ended before `horizon` (past the allowed lateness): no record can change them now."""
        stale = [key for key in self.rollups if period_end(key[3], key[4]) < horizon and key not in self._changed]
        for key in stale:
            del self.rollups[key]
        return stale
