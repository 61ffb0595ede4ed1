"""The rollup stage's changelog: each partition's state as a compacted Kafka topic.

Entries are written in the same Kafka transaction as the consumer offsets they correspond
to, so after a crash the state rebuilt from the changelog matches the committed offsets
exactly. Rollups are keyed by their period (compaction keeps the latest); de-duplication
identities are written one entry per checkpoint and tombstoned once the window has passed;
threshold markers are keyed by threshold, subject and window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

import msgspec
import orjson

from metering_pipeline.usage.aggregation import FROM_RECORDS
from metering_pipeline.usage.dedup import RecordIdentity
from metering_pipeline.usage.meter import Dimensions
from metering_pipeline.usage.rollups import (
    KEY_NAME,
    WIRE_NAME,
    Rollup,
    RollupChange,
    RollupKey,
    ValuesRollup,
    key_period,
)
from metering_pipeline.usage.thresholds import Marker, MarkerKey
from metering_schemas import AggregationType

ROLLUP_PREFIX = b"r|"
IDENTITIES_PREFIX = b"d|"
MARKER_PREFIX = b"a|"  # threshold alert markers
DISTINCT_PREFIX = b"u|"  # one entry per value of a UNIQUE_COUNT rollup: a checkpoint writes only the new ones
_PRESENT = b"1"
# Every rollup entry before this changelog offset is in ClickHouse: a restore writes only the later ones again.
SUNK_KEY = b"s|sunk"


def rollup_entry(change: RollupChange) -> tuple[bytes, bytes]:
    fields = [
        WIRE_NAME[change.aggregation],
        change.count,
        change.sum_text,
        change.min_text,
        change.max_text,
        change.version,
        change.metric_id,
    ]
    if change.latest is not None:
        fields += [change.latest[1], change.latest[2], change.latest[0]]
    return rollup_tombstone(change.key), _encode(fields)


# The same JSON as orjson's, in a bytes object of its own size: orjson returns a small result in a 4 KiB allocation,
# which costs nothing when it is copied into a Kafka batch and dropped, and 4 KiB per entry when it is kept (a
# checkpoint's entries wait for the state store).
_encode = msgspec.json.Encoder().encode


def rollup_tombstone(key: RollupKey) -> bytes:
    """A rollup's changelog key: a total row's as it always was, a dimension row's with its pairs after."""
    metric_key, subject_type, subject_id, period, start, dimensions = key
    if dimensions:
        return ROLLUP_PREFIX + orjson.dumps(
            [metric_key, subject_type, subject_id, KEY_NAME[period], _epoch_seconds(start), dimensions]
        )
    return ROLLUP_PREFIX + orjson.dumps([metric_key, subject_type, subject_id, KEY_NAME[period], _epoch_seconds(start)])


def distinct_entry(key: RollupKey, value: str) -> bytes:
    metric_key, subject_type, subject_id, period, start, dimensions = key
    return DISTINCT_PREFIX + orjson.dumps(
        [metric_key, subject_type, subject_id, KEY_NAME[period], _epoch_seconds(start), dimensions, value]
    )


def sunk_entry(before: int) -> tuple[bytes, bytes]:
    return SUNK_KEY, str(before).encode()


def distinct_prefix(key: RollupKey) -> bytes:
    """What the changelog keys of a rollup's distinct values start with."""
    return distinct_entry(key, "")[: -len(b',""]')] + b","


def distinct_entries(distinct: Iterable[tuple[RollupKey, str]]) -> Iterator[tuple[bytes, bytes]]:
    return ((distinct_entry(key, value), _PRESENT) for key, value in distinct)


def evicted_entries(key: RollupKey, rollup: Rollup) -> list[bytes]:
    """Changelog keys to tombstone when a rollup leaves memory: its own, and its distinct values'."""
    values = rollup.values if isinstance(rollup, ValuesRollup) else ()
    return [rollup_tombstone(key), *(distinct_entry(key, value) for value in values)]


@lru_cache(maxsize=8192)  # period starts repeat across a checkpoint's entries
def _epoch_seconds(at: datetime) -> int:
    return int(at.timestamp())


def marker_entry(key: MarkerKey, marker: Marker | None) -> tuple[bytes, bytes | None]:
    """A threshold marker (None: a tombstone, the marker was re-armed, forgotten or evicted)."""
    threshold_id, subject_type, subject_id, window_start = key
    entry_key = MARKER_PREFIX + orjson.dumps([threshold_id, subject_type, subject_id, int(window_start.timestamp())])
    if marker is None:
        return entry_key, None
    return entry_key, orjson.dumps([str(marker.limit), marker.approaching, marker.exceeded])


def decode_rollup_key(encoded: bytes) -> RollupKey:
    """A rollup key from its changelog key (without ROLLUP_PREFIX)."""
    return _rollup_key(orjson.loads(encoded))


def decode_marker(key: bytes, value: bytes) -> tuple[MarkerKey, Marker]:
    threshold_id, subject_type, subject_id, start = orjson.loads(key[len(MARKER_PREFIX) :])
    limit, approaching, exceeded = orjson.loads(value)
    return (threshold_id, subject_type, subject_id, _utc(start)), Marker(Decimal(limit), approaching, exceeded)


def _rollup_key(fields: list[Any]) -> RollupKey:
    metric_key, subject_type, subject_id, period, start, *dimensions = fields
    pairs: Dimensions = tuple((name, value) for name, value in dimensions[0]) if dimensions else ()
    return metric_key, subject_type, subject_id, key_period(period), _utc(start), pairs


def decode_rollup(fields: list[Any]) -> Rollup:
    aggregation, count, total, low, high, version, *rest = fields
    # One Decimal for equal texts (a rollup of one record holds its quantity as sum, min and max), as counting makes
    # them: a rollup read back from a state store costs no more RAM than one counted.
    total_value = Decimal(total)
    low_value = None if low is None else total_value if low == total else Decimal(low)
    high_value = None if high is None else low_value if high == low else total_value if high == total else Decimal(high)
    metric_id = rest[0] if rest else None
    state = (AggregationType(aggregation), count, total_value, low_value, high_value, version, metric_id)
    if len(rest) == 4:  # a rollup that has had a LATEST record: its time, id and quantity
        latest_ms, latest_id, latest = rest[1:]
        return ValuesRollup(*state, set(), Decimal(latest), latest_ms, latest_id)
    if state[0] in FROM_RECORDS:  # a rollup of theirs keeps its records' values
        return ValuesRollup(*state)
    return Rollup(*state)


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


Subject = tuple[str, str]  # (subject_type, subject_id)


def entry_subject(key: bytes) -> Subject | None:
    """The subject a rollup, distinct-value or marker entry belongs to (its key names it second and third); None for
    the partition's own entry (SUNK_KEY) and for identity entries, which list many subjects (`identities_by_subject`).
    An entry of another kind raises ValueError: whatever wrote it, this version cannot say where it belongs."""
    if key.startswith((ROLLUP_PREFIX, DISTINCT_PREFIX, MARKER_PREFIX)):
        fields = orjson.loads(key[len(ROLLUP_PREFIX) :])
        return fields[1], fields[2]
    if key == SUNK_KEY or key.startswith(IDENTITIES_PREFIX):
        return None
    raise ValueError(f"a changelog entry of a kind this version does not know: {key[:40]!r}")


def split_identities(value: bytes, partition_of: Callable[[str, str], int]) -> dict[int, bytes]:
    """An identity entry's identities split by their subjects' partitions, each part an identity entry's value."""
    parts: dict[int, list[Any]] = {}
    for item in orjson.loads(value):
        parts.setdefault(partition_of(item[0], item[1]), []).append(item)
    return {partition: orjson.dumps(items) for partition, items in parts.items()}


IDENTITIES_PER_ENTRY = 5_000  # keeps each entry far below Kafka's message size limit


def identities_entries(
    checkpoint_id: int, identities: list[tuple[RecordIdentity, datetime]]
) -> list[tuple[bytes, bytes]]:
    """One checkpoint's new identities, in entries of at most IDENTITIES_PER_ENTRY."""
    seconds = {at: int(at.timestamp()) for at in {at for _, at in identities}}  # a few distinct times (one per poll)
    return [
        (
            IDENTITIES_PREFIX + f"{checkpoint_id}.{n}".encode(),
            orjson.dumps(
                [[*identity, seconds[at]] for identity, at in identities[start : start + IDENTITIES_PER_ENTRY]]
            ),
        )
        for n, start in enumerate(range(0, len(identities), IDENTITIES_PER_ENTRY))
    ]
