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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from itertools import islice
from sys import intern
from typing import Any, NamedTuple, Protocol

import msgspec

from metering_pipeline.usage.aggregation import EXACT, total
from metering_pipeline.usage.dedup import DedupWindow, RecordIdentity
from metering_pipeline.usage.meter import TOTAL, Dimensions
from metering_pipeline.usage.periods import (
    EPOCH,
    SLOT_SECONDS,
    LocalPeriod,
    local_period,
    period_end,
    starts_of_hour,
    starts_of_slot,
    zone_of,
)
from metering_pipeline.usage.routed_record import CountedRecord
from metering_schemas import AggregationType, PeriodType, ResetPeriod

# metric_key, subject_type, subject_id, period, start, dimensions. Besides the hourly, daily and monthly
# rollups that reach ClickHouse, each subject of a metric whose resetPeriod is NEVER has an all-time
# one (ResetPeriod.NEVER, start EPOCH) that its thresholds are evaluated against. Only those: an
# all-time rollup never leaves memory, so one per subject of every metric would grow without bound.
# `dimensions` is TOTAL (()) for the total row of every metric; a grouped metric also has a row per combination of
# its dimension values.
# A subject whose records carry a time zone (`time_zone` of a routed record) has its hourly, daily and monthly rollups
# cut in that zone, where `period` is a LocalPeriod (its UTC periods are answered from the records).
Period = PeriodType | ResetPeriod | LocalPeriod
RollupKey = tuple[str, str, str, Period, datetime, Dimensions]
LIFETIME = ResetPeriod.NEVER
_HOUR_MS = 3_600_000
_SLOT_MS = SLOT_SECONDS * 1000
_ZERO = Decimal(0)


class _Names(dict[Any, str]):
    """Names by dictionary, computed once per member or local period: an enum's `.value` (and orjson's enum support)
    costs more, once per written rollup."""

    def __init__(self, name_of: Callable[[Any], str]) -> None:
        super().__init__()
        self.name_of = name_of

    def __missing__(self, member: Any) -> str:
        name = self[member] = self.name_of(member)
        return name


# What ClickHouse's period_type and aggregation_type and the events say: a local day is a DAILY period.
WIRE_NAME: dict[Period | AggregationType, str] = _Names(lambda member: member.value)
# A rollup's period in its changelog and store keys: a local one with its zone (`DAILY@Asia/Kolkata`), so that a UTC
# and a local period starting at the same instant are two rollups; a UTC one as it always was.
KEY_NAME: dict[Period, str] = _Names(
    lambda period: f"{period.value}@{period.zone}" if type(period) is LocalPeriod else period.value
)
ZONE_NAME: dict[Period, str] = _Names(zone_of)  # the zone a rollup's periods are cut in: ClickHouse's time_zone


def key_period(name: str) -> Period:
    """A rollup's period from its KEY_NAME."""
    if "@" in name:
        period, zone = name.split("@", 1)
        return local_period(PeriodType(period), zone)
    return LIFETIME if name == LIFETIME.value else PeriodType(name)


class Rollup(msgspec.Struct, gc=False):
    """A period's running aggregate (count, sum, min, max: what every aggregation type is computed from) and what it is
    about. One per rollup, three or four per (metric, subject), so it is kept small: a struct without the cyclic
    collector's header (it refers to no container, so it can be in no cycle)."""

    aggregation: AggregationType
    count: int = 0
    sum: Decimal = _ZERO
    min: Decimal | None = None
    max: Decimal | None = None
    version: int = -1
    metric_id: str | None = None  # the definition that governs it (thresholds read its resetPeriod)

    def total(self) -> Decimal:
        return total(self.aggregation, self.count, self.sum, self.min, self.max)


class ValuesRollup(Rollup, gc=False):
    """A UNIQUE_COUNT or LATEST metric's rollup: also what a running (count, sum, min, max) cannot hold, the distinct
    values of its records (one set per rollup: a day's count is counted over the day, not added up from its hours)
    and the quantity of its latest record with that record's time and id (which decide between records of the same
    time, whatever order they arrive in).

    It keeps both for the rest of its period whatever the metric's aggregationType becomes, so that the changelog,
    which holds them too, restores exactly what it held. A set of strings can be in no cycle, hence gc=False."""

    values: set[str] = msgspec.field(default_factory=set)
    latest: Decimal | None = None
    latest_ms: int = -(2**62)
    latest_id: str = ""

    def offer(self, quantity: Decimal, timestamp_ms: int, record_id: str) -> None:
        if (timestamp_ms, record_id) > (self.latest_ms, self.latest_id):
            self.latest, self.latest_ms, self.latest_id = quantity, timestamp_ms, record_id

    def total(self) -> Decimal:
        if self.aggregation is _UNIQUE:
            return Decimal(len(self.values))
        if self.aggregation is _LATEST:
            return _ZERO if self.latest is None else self.latest
        return super().total()


class RollupChange(NamedTuple):
    """A rollup's value as of a checkpoint, as the changelog, usage.aggregated and ClickHouse write it: one flat tuple
    of exact decimal texts, so later records do not change it (checkpoints are written after the stream moves on), and
    each value is turned into text once, not once per output (a Decimal's `str` is most of what a row costs)."""

    key: RollupKey
    aggregation: AggregationType
    count: int  # type: ignore[assignment]  # the field hides tuple.count(), which nothing calls on a change
    sum_text: str
    min_text: str | None
    max_text: str | None
    version: int
    metric_id: str | None
    total_text: str  # totalQuantity, exact (AVG divides)
    latest: tuple[str, int, str] | None = None  # the latest record's quantity, time (epoch ms) and id, once it has one

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
_LATEST, _UNIQUE = AggregationType.LATEST, AggregationType.UNIQUE_COUNT


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
        total_text = max_text  # type: ignore[assignment]  # a rollup that counted a record has a max
    elif aggregation is _MIN and rollup.count:
        total_text = min_text  # type: ignore[assignment]  # and a min
    else:
        total_text = str(rollup.total())
    if type(rollup) is ValuesRollup and rollup.latest is not None:
        latest = total_text if aggregation is _LATEST else str(rollup.latest)
        return _make_change(
            (
                key,
                aggregation,
                rollup.count,
                sum_text,
                min_text,
                max_text,
                rollup.version,
                rollup.metric_id,
                total_text,
                (latest, rollup.latest_ms, rollup.latest_id),
            )
        )
    return _make_change(
        (
            key,
            aggregation,
            rollup.count,
            sum_text,
            min_text,
            max_text,
            rollup.version,
            rollup.metric_id,
            total_text,
            None,
        )
    )


class Checkpoint(NamedTuple):
    """What changed since the previous checkpoint: rewritten rollups, new records, new identities."""

    rollups: list[RollupChange]
    records: list[CountedRecord]
    identities: list[tuple[RecordIdentity, datetime]]
    closed: list[tuple[int, CountedRecord]]  # (routed offset, record) refused: their periods were already evicted
    distinct: list[tuple[RollupKey, str]] = []  # values new to their UNIQUE_COUNT rollups (never mutated)
    limited: list[tuple[int, CountedRecord, str]] = []  # (routed offset, record, why) refused at a cardinality bound
    generation: int = 0  # the state's count of checkpoints taken, this one included

    def is_empty(self) -> bool:
        return not (self.rollups or self.records or self.closed or self.limited)


_ALL_TIME = (LIFETIME, EPOCH)


@lru_cache(maxsize=4096)
def _periods_of_hour(hour: int) -> tuple[tuple[PeriodType | ResetPeriod, datetime], ...]:
    """Hour, day, month and all time of an epoch hour; records cluster in few hours, so this is a cache hit."""
    return (*starts_of_hour(hour), _ALL_TIME)


def _first_open_hour(closed_before: datetime | None) -> int:
    """The first epoch hour that ends at or after `closed_before`: records of earlier hours are refused."""
    if closed_before is None:
        return -(2**62)
    micros = (closed_before - EPOCH) // timedelta(microseconds=1)
    return -(-micros // (_HOUR_MS * 1000)) - 1


@dataclass(frozen=True, slots=True)
class CardinalityLimits:
    """Bounds on the state that grows with the payload: each costs memory for as long as its period is open. A record
    that would pass one is refused (dead-lettered `cardinality_limit`, its rollups untouched), never half counted."""

    combinations: int = 1_000  # dimension rows per (metric, subject, period)
    distinct_values: int = 100_000  # values per UNIQUE_COUNT rollup


class StoredRollups(Protocol):
    """A partition's state as of its last stored checkpoint (see `worker.state_store`): what is not in RAM."""

    def rollup(self, key: RollupKey) -> Rollup | None: ...
    def seen(self, identity: RecordIdentity) -> bool: ...
    def dimension_rows(self, total_key: RollupKey) -> int: ...
    def subjects(self, metric_key: str, subject_type: str, ending_after: datetime) -> set[str]: ...
    def rollups_ending_before(self, horizon: datetime) -> Iterator[RollupKey]: ...


class PartitionRollups:
    """With `stored`, RAM holds a cache of at most `capacity` rollups besides those not stored yet, and the identities
    not stored yet; without, everything stays in RAM (the tests of the rules). While the cache holds every rollup
    (`warm`, and nothing evicted since), a rollup not in RAM exists nowhere, and is not looked for in the store."""

    def __init__(
        self,
        dedup_window: timedelta,
        limits: CardinalityLimits = CardinalityLimits(),
        stored: StoredRollups | None = None,
        capacity: int = 1_000_000,
    ) -> None:
        self.dedup = DedupWindow(dedup_window, stored.seen if stored else None)
        self.limits = limits
        self.stored = stored
        self._lookups = stored  # where a rollup not in RAM may be: None while RAM holds every rollup
        self.capacity = capacity
        self.rollups: dict[RollupKey, Rollup] = {}  # with `stored`, a cache
        self.generation = 0  # of checkpoints taken
        self._unstored: dict[RollupKey, int] = {}  # changed in a checkpoint not stored yet: its generation
        self._changed: dict[RollupKey, Rollup] = {}  # since the last checkpoint
        self._records: list[CountedRecord] = []
        self._identities: list[tuple[RecordIdentity, datetime]] = []
        self._closed: list[tuple[int, CountedRecord]] = []
        self._distinct: list[tuple[RollupKey, str]] = []
        self._limited: list[tuple[int, CountedRecord, str]] = []
        self._combinations: dict[RollupKey, int] = {}  # dimension rows per total row's key
        self._dimensions: dict[Dimensions, Dimensions] = {}  # one tuple object per combination, shared by its rows

    def apply(
        self,
        records: Sequence[CountedRecord],
        offset: int,
        seen_at: datetime,
        touched: set[RollupKey] | None = None,
        closed_before: datetime | None = None,
    ) -> tuple[int, int]:
        """Count each new record of one routed message (at `offset`) once in each of its periods; returns
        (counted, duplicates).

        The keys of the rollups it changes are added to `touched` (for threshold checks). A record whose
        hour ended before `closed_before` (the eviction horizon) is refused into the checkpoint's `closed`:
        its rollups may have left memory, and counting it into a fresh one would overwrite the final
        total in ClickHouse with a smaller one.
        """
        changed: dict[RollupKey, Rollup] = {}
        first_open_hour = _first_open_hour(closed_before)
        dedup = self.dedup
        admit = dedup.admitter(seen_at)
        rollups, stored = self.rollups, self._lookups
        keep_record, keep_identity = self._records.append, self._identities.append
        counted = duplicates = 0
        with decimal.localcontext(EXACT):  # `+` below is exact or raises
            for record in records:
                # A zoned record counts in its local hour, day and month; the others in UTC ones (an hour per cache).
                periods: tuple[tuple[Period, datetime], ...]
                if record.time_zone:
                    periods = starts_of_slot(record.time_zone, record.timestamp_ms // _SLOT_MS)
                    if closed_before is not None and period_end(*periods[0]) < closed_before:  # its hour has ended
                        self._closed.append((offset, record))
                        continue
                    if record.all_time:
                        periods = (*periods, _ALL_TIME)
                else:
                    hour = record.timestamp_ms // _HOUR_MS
                    if hour < first_open_hour:
                        self._closed.append((offset, record))
                        continue
                    periods = _periods_of_hour(hour) if record.all_time else starts_of_hour(hour)
                # One string object per subject and metric, however many records and rollups name it (decoding makes
                # one per record, and an update stores the record's metric id): at a million keys the copies cost
                # more memory than the rollups.
                subject_type, subject_id = intern(record.subject_type), intern(record.subject_id)
                identity = (subject_type, subject_id, record.record_id)
                # Records that read the payload (dimensions, distinct values, latest values) take the longer way.
                metric_key = intern(record.metric_key)
                rows = None
                unseen = False
                if record.dimensions or record.distinct is not None or record.aggregation is _LATEST:
                    rows = self._rows_of(record, metric_key, subject_type, subject_id, periods)
                    if identity in dedup:  # a duplicate is dropped as one, whatever it carries
                        duplicates += 1
                        continue
                    refusal = self._over_limit(record, rows)
                    if refusal is not None:
                        self._limited.append((offset, record, refusal))
                        continue
                    unseen = True
                if not admit(identity, unseen):
                    duplicates += 1
                    continue
                counted += 1
                keep_record(record)
                keep_identity((identity, seen_at))
                quantity, metric_id = record.quantity, intern(record.metric_id)
                if rows is not None:
                    self._fold_payload(record, rows, metric_id, offset, changed)
                    continue
                for period, start in periods:
                    key = (metric_key, subject_type, subject_id, period, start, TOTAL)
                    rollup = rollups.get(key)
                    if rollup is None and stored is not None:
                        rollup = self._load(key)
                    if rollup is None:  # its first record: the quantity object itself is sum, min and max (no copy)
                        rollups[key] = changed[key] = Rollup(
                            record.aggregation, 1, quantity, quantity, quantity, offset, metric_id
                        )
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

    def _rows_of(
        self,
        record: CountedRecord,
        metric_key: str,
        subject_type: str,
        subject_id: str,
        periods: tuple[tuple[Period, datetime], ...],
    ) -> list[tuple[RollupKey, RollupKey]]:
        """(row key, its total row's key) of every rollup a record counts in: per period, the total row and, for a
        grouped metric, its combination's row. Made once per record: the bounds are checked on them, then folded."""
        dimensions = record.dimensions
        rows = []
        if dimensions:
            dimensions = self._dimensions.setdefault(dimensions, dimensions)
        for period, start in periods:
            total_key = (metric_key, subject_type, subject_id, period, start, TOTAL)
            rows.append((total_key, total_key))
            if dimensions:
                rows.append(((metric_key, subject_type, subject_id, period, start, dimensions), total_key))
        return rows

    def _over_limit(self, record: CountedRecord, rows: list[tuple[RollupKey, RollupKey]]) -> str | None:
        """Why counting the record would pass a cardinality bound, checked before anything changes."""
        limits, distinct = self.limits, record.distinct
        for key, total_key in rows:
            rollup = self.get(key)
            if rollup is None and key is not total_key and self._rows_of_total(total_key) >= limits.combinations:
                return (
                    f"{key[0]} already has {limits.combinations} dimension combinations for {key[1]}:{key[2]} in "
                    f"the {_period_text(key)} (METERING_MAX_DIMENSION_COMBINATIONS)"
                )
            if (
                distinct is not None
                and isinstance(rollup, ValuesRollup)
                and distinct not in rollup.values
                and len(rollup.values) >= limits.distinct_values
            ):
                return (
                    f"{key[0]} already counts {limits.distinct_values} distinct values for {key[1]}:{key[2]} in "
                    f"the {_period_text(key)} (METERING_MAX_DISTINCT_VALUES)"
                )
        return None

    def _fold_payload(
        self,
        record: CountedRecord,
        rows: list[tuple[RollupKey, RollupKey]],
        metric_id: str,
        offset: int,
        changed: dict[RollupKey, Rollup],
    ) -> None:
        """`apply` for a record of a grouped, UNIQUE_COUNT or LATEST metric (under the exact context)."""
        quantity, aggregation = record.quantity, record.aggregation
        distinct = None if record.distinct is None else intern(record.distinct)
        latest = aggregation is _LATEST
        kind: type[Rollup] | type[ValuesRollup] = ValuesRollup if latest or aggregation is _UNIQUE else Rollup
        rollups = self.rollups
        for key, total_key in rows:
            rollup = self.get(key)
            if rollup is None:
                rollup = rollups[key] = kind(aggregation, 1, quantity, quantity, quantity, offset, metric_id)
                if key is not total_key:
                    self._combinations[total_key] = self._rows_of_total(total_key) + 1
            else:
                if not isinstance(rollup, kind):  # the metric became UNIQUE_COUNT or LATEST within the period
                    rollup = rollups[key] = values_rollup(rollup)
                rollup.aggregation = aggregation
                rollup.metric_id = metric_id
                rollup.count += 1
                rollup.sum += quantity
                if rollup.min is None or quantity < rollup.min:
                    rollup.min = quantity
                if rollup.max is None or quantity > rollup.max:
                    rollup.max = quantity
                if offset > rollup.version:
                    rollup.version = offset
            # With a distinct value (UNIQUE_COUNT) or `latest`, `kind` and so `rollup` is a ValuesRollup: mypy cannot
            # tell, and an isinstance per row would cost what it checks.
            if distinct is not None and distinct not in rollup.values:  # type: ignore[attr-defined]
                rollup.values.add(distinct)  # type: ignore[attr-defined]
                self._distinct.append((key, distinct))
            elif latest:
                rollup.offer(quantity, record.timestamp_ms, record.record_id)  # type: ignore[attr-defined]
            changed[key] = rollup

    @property
    def pending_records(self) -> int:
        """Counted since the last checkpoint."""
        return len(self._records)

    def get(self, key: RollupKey) -> Rollup | None:
        """A rollup as it stands: from RAM, or else from the store (then cached)."""
        rollup = self.rollups.get(key)
        if rollup is None and self._lookups is not None:
            rollup = self._load(key)
        return rollup

    def _load(self, key: RollupKey) -> Rollup | None:
        rollup = self.stored.rollup(key) if self.stored is not None else None
        if rollup is not None:
            if key[5]:
                key = (*key[:5], self._dimensions.setdefault(key[5], key[5]))
            self.rollups[key] = rollup
        return rollup

    def _rows_of_total(self, total_key: RollupKey) -> int:
        """Dimension rows of a total row's (metric, subject, period); counted in the store the first time (rows
        created since are counted as they are)."""
        rows = self._combinations.get(total_key)
        if rows is None:
            rows = self._combinations[total_key] = self._lookups.dimension_rows(total_key) if self._lookups else 0
        return rows

    def subjects_of(self, metrics: set[tuple[str, str]], now: datetime) -> dict[tuple[str, str], set[tuple[str, str]]]:
        """The subjects with rollups (of current periods, at least), per (metric key, subject type) asked for."""
        found: dict[tuple[str, str], set[tuple[str, str]]] = {}
        if not metrics:
            return found
        for metric_key, subject_type, subject_id, _period, _start, _dimensions in self.rollups:
            if (metric_key, subject_type) in metrics:
                found.setdefault((metric_key, subject_type), set()).add((subject_type, subject_id))
        if self._lookups is not None:
            for metric_key, subject_type in metrics:
                subjects = found.setdefault((metric_key, subject_type), set())
                subjects.update((subject_type, s) for s in self._lookups.subjects(metric_key, subject_type, now))
        return found

    def checkpoint(self) -> Checkpoint:
        """Hand over everything changed since the last checkpoint (as of now) and start a new one."""
        self.generation += 1
        self.dedup.seal()
        changes = [_freeze(key, rollup) for key, rollup in self._changed.items()]
        if self.stored is not None:
            self._unstored.update(dict.fromkeys(self._changed, self.generation))
        checkpoint = Checkpoint(
            changes, self._records, self._identities, self._closed, self._distinct, self._limited, self.generation
        )
        self._closed = []
        self._changed = {}
        self._records = []
        self._identities = []
        self._distinct = []
        self._limited = []
        return checkpoint

    def stored_through(self, generation: int) -> None:
        """Checkpoints up to `generation` are in the store: RAM keeps their rollups only as a cache now, within its
        capacity, and forgets their identities."""
        self._unstored = {key: taken for key, taken in self._unstored.items() if taken > generation}
        self.dedup.stored_through(generation)
        excess = len(self.rollups) - self.capacity
        if excess > 0:
            pinned, changed = self._unstored, self._changed
            # Oldest first (a dict keeps insertion order; a rollup read again from the store goes to the back).
            for key in list(islice((k for k in self.rollups if k not in pinned and k not in changed), excess)):
                del self.rollups[key]
            self._lookups = self.stored  # some rollups are only in the store now

    def warm(self, rollups: Iterable[tuple[RollupKey, Rollup]]) -> None:
        """Every stored rollup, into RAM (they fit in the cache): until the cache must evict one, no lookup of a rollup
        goes to the store (most lookups that miss are of new rollups, and the store has none of them either)."""
        for key, rollup in rollups:
            dimensions = key[5]
            if dimensions:
                dimensions = self._dimensions.setdefault(dimensions, dimensions)
                key = (*key[:5], dimensions)
                if key not in self.rollups:
                    total_key = (*key[:5], TOTAL)
                    self._combinations[total_key] = self._combinations.get(total_key, 0) + 1
            self.rollups[key] = rollup
        self._lookups = None

    def evict_before(
        self, horizon: datetime, keep: set[RollupKey] | frozenset[RollupKey] = frozenset()
    ) -> list[tuple[RollupKey, Rollup]]:
        """Drop rollups whose period ended before `horizon` (past the allowed lateness: no record can change them
        now), but those in `keep` and those not stored yet; returns them for their tombstones."""
        candidates = [key for key in self.rollups if period_end(key[3], key[4]) < horizon]
        if self._lookups is not None:
            candidates += self._lookups.rollups_ending_before(horizon)
        stale = []
        for key in dict.fromkeys(candidates):
            if key in self._changed or key in self._unstored or key in keep:
                continue
            rollup = self.get(key)
            if rollup is None:
                continue
            stale.append((key, rollup))
            if self.stored is not None:
                self._unstored[key] = self.generation + 1  # in the store until its tombstones are
            del self.rollups[key]
            if key[5]:
                total_key = (*key[:5], TOTAL)
                left = self._combinations.get(total_key, 0) - 1
                if left > 0:
                    self._combinations[total_key] = left
                else:
                    self._combinations.pop(total_key, None)
        return stale


def _period_text(key: RollupKey) -> str:
    """A rollup's period for people: `DAILY period from 2026-03-09T18:30:00+00:00` (`in Asia/Kolkata` when local)."""
    zone = ZONE_NAME[key[3]]
    return f"{WIRE_NAME[key[3]]} period from {key[4].isoformat()}" + (f" in {zone}" if zone != "UTC" else "")


def values_rollup(rollup: Rollup) -> ValuesRollup:
    """A rollup that keeps values from now on, its running state kept (its distinct values and latest value start
    empty)."""
    if isinstance(rollup, ValuesRollup):
        return rollup
    return ValuesRollup(
        rollup.aggregation, rollup.count, rollup.sum, rollup.min, rollup.max, rollup.version, rollup.metric_id
    )
