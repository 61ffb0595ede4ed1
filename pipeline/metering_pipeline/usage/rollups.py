"""Per-partition rollup state: de-duplicate records, fold them into hourly/daily/monthly aggregates.

The state of one partition of the subject-routed stream. It changes only through `apply`,
remembers what changed since the last checkpoint, and can be rebuilt from the checkpoints
it produced, so a restarted worker continues exactly where the last committed checkpoint
left it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal

from metering_pipeline.usage.aggregation import Aggregate
from metering_pipeline.usage.dedup import DedupWindow, RecordIdentity
from metering_pipeline.usage.periods import EPOCH, period_end, rollup_starts
from metering_schemas import AggregationType, PeriodType, ResetPeriod

# metric_key, subject_type, subject_id, period, start. Besides the hourly, daily and monthly
# rollups that reach ClickHouse, each metric and subject has an all-time one (ResetPeriod.NEVER,
# start EPOCH) that thresholds of NEVER-resetting metrics are evaluated against.
RollupKey = tuple[str, str, str, PeriodType | ResetPeriod, datetime]
LIFETIME = ResetPeriod.NEVER
_HOUR = timedelta(hours=1)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs several times more, per record
class CountedRecord:
    """A record as the rollup stage sees it (already validated and routed by subject)."""

    identity: RecordIdentity
    metric_key: str
    metric_id: str
    aggregation: AggregationType
    quantity: Decimal
    timestamp: datetime
    metadata_json: str
    offset: int  # position in the routed partition: the version of the rollups it changes


@dataclass(slots=True)
class Rollup:
    aggregation: AggregationType
    aggregate: Aggregate = field(default_factory=Aggregate)
    version: int = -1
    metric_id: str | None = None  # the definition that governs it (thresholds read its resetPeriod)

    def total(self) -> Decimal:
        return self.aggregate.total(self.aggregation)

    def frozen(self) -> Rollup:
        """A copy that later records do not change (checkpoints are written after the stream moves on)."""
        return Rollup(self.aggregation, replace(self.aggregate), self.version, self.metric_id)


@dataclass(frozen=True)
class RollupChange:
    key: RollupKey
    rollup: Rollup

    @property
    def period_end(self) -> datetime:
        return period_end(self.key[3], self.key[4])

    @property
    def reported(self) -> bool:
        """Hourly, daily and monthly rollups go to ClickHouse and usage.aggregated; the all-time one stays internal."""
        return self.key[3] is not LIFETIME


@dataclass(frozen=True)
class Checkpoint:
    """What changed since the previous checkpoint: rewritten rollups, new records, new identities."""

    rollups: list[RollupChange]
    records: list[CountedRecord]
    identities: list[tuple[RecordIdentity, datetime]]
    closed: list[CountedRecord] = field(default_factory=list)  # refused: their periods were already evicted

    def is_empty(self) -> bool:
        return not (self.rollups or self.records or self.closed)


class PartitionRollups:
    def __init__(self, dedup_window: timedelta) -> None:
        self.dedup = DedupWindow(dedup_window)
        self.rollups: dict[RollupKey, Rollup] = {}
        self._changed: set[RollupKey] = set()
        self._records: list[CountedRecord] = []
        self._identities: list[tuple[RecordIdentity, datetime]] = []
        self._closed: list[CountedRecord] = []

    def apply(self, records: Iterable[CountedRecord], seen_at: datetime, touched: set[RollupKey] | None = None,
              closed_before: datetime | None = None) -> tuple[int, int]:
        """Count each new record once in each of its periods; returns (counted, duplicates).

        The keys of the rollups it changes are added to `touched` (for threshold checks). A record whose
        hour ended before `closed_before` (the eviction horizon) is refused into the checkpoint's `closed`:
        its rollups may have left memory, and counting it into a fresh one would overwrite the final
        total in ClickHouse with a smaller one.
        """
        counted = duplicates = 0
        for record in records:
            starts = rollup_starts(record.timestamp)  # hour first: it closes first
            if closed_before is not None and starts[0][1] + _HOUR < closed_before:
                self._closed.append(record)
                continue
            if not self.dedup.first_sighting(record.identity, seen_at):
                duplicates += 1
                continue
            counted += 1
            self._records.append(record)
            self._identities.append((record.identity, seen_at))
            subject_type, subject_id, _ = record.identity
            for period, start in (*starts, (LIFETIME, EPOCH)):
                key = (record.metric_key, subject_type, subject_id, period, start)
                rollup = self.rollups.get(key)
                if rollup is None:
                    rollup = self.rollups[key] = Rollup(record.aggregation)
                rollup.aggregation = record.aggregation
                rollup.metric_id = record.metric_id
                rollup.aggregate.add(record.quantity)
                rollup.version = max(rollup.version, record.offset)
                self._changed.add(key)
                if touched is not None:
                    touched.add(key)
        return counted, duplicates

    @property
    def pending_records(self) -> int:
        """Counted since the last checkpoint."""
        return len(self._records)

    def checkpoint(self) -> Checkpoint:
        """Hand over everything changed since the last checkpoint (as of now) and start a new one."""
        changes = [RollupChange(key, self.rollups[key].frozen()) for key in self._changed]
        checkpoint = Checkpoint(changes, self._records, self._identities, self._closed)
        self._closed = []
        self._changed = set()
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
