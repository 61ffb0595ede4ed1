"""The rollup stage's changelog: each partition's state as a compacted Kafka topic.

Entries are written in the same Kafka transaction as the consumer offsets they correspond
to, so after a crash the state rebuilt from the changelog matches the committed offsets
exactly. Rollups are keyed by their period (compaction keeps the latest); de-duplication
identities are written one entry per checkpoint and tombstoned once the window has passed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

import orjson

from metering_pipeline.usage.aggregation import Aggregate
from metering_pipeline.usage.dedup import RecordIdentity
from metering_pipeline.usage.rollups import Rollup, RollupChange, RollupKey
from metering_schemas import AggregationType, PeriodType

ROLLUP_PREFIX = b"r|"
IDENTITIES_PREFIX = b"d|"


def rollup_entry(change: RollupChange) -> tuple[bytes, bytes]:
    metric_key, subject_type, subject_id, period, start = change.key
    aggregate = change.rollup.aggregate
    key = ROLLUP_PREFIX + orjson.dumps([metric_key, subject_type, subject_id, period.value, int(start.timestamp())])
    value = orjson.dumps([
        change.rollup.aggregation.value, aggregate.count, str(aggregate.sum),
        None if aggregate.min is None else str(aggregate.min), None if aggregate.max is None else str(aggregate.max),
        change.rollup.version,
    ])
    return key, value


def rollup_tombstone(key: RollupKey) -> bytes:
    metric_key, subject_type, subject_id, period, start = key
    return ROLLUP_PREFIX + orjson.dumps([metric_key, subject_type, subject_id, period.value, int(start.timestamp())])


def identities_entry(checkpoint_id: int, identities: Iterable[tuple[RecordIdentity, datetime]]) -> tuple[bytes, bytes]:
    key = IDENTITIES_PREFIX + str(checkpoint_id).encode()
    return key, orjson.dumps([[*identity, int(at.timestamp())] for identity, at in identities])


@dataclass
class RestoredState:
    rollups: dict[RollupKey, Rollup]
    identities: list[tuple[RecordIdentity, datetime]]
    identity_entries: dict[bytes, datetime]  # entry key -> newest identity in it, for expiry


def restore(entries: Iterable[tuple[bytes, bytes | None]]) -> RestoredState:
    """Fold changelog entries in log order: later entries replace earlier ones, tombstones delete."""
    rollups: dict[RollupKey, Rollup] = {}
    identity_lists: dict[bytes, list[tuple[RecordIdentity, datetime]]] = {}
    for key, value in entries:
        if key.startswith(ROLLUP_PREFIX):
            metric_key, subject_type, subject_id, period, start = orjson.loads(key[len(ROLLUP_PREFIX):])
            rollup_key = (metric_key, subject_type, subject_id, PeriodType(period), datetime.fromtimestamp(start, tz=timezone.utc))
            if value is None:
                rollups.pop(rollup_key, None)
                continue
            aggregation, count, total, low, high, version = orjson.loads(value)
            aggregate = Aggregate(count, Decimal(total), None if low is None else Decimal(low), None if high is None else Decimal(high))
            rollups[rollup_key] = Rollup(AggregationType(aggregation), aggregate, version)
        elif key.startswith(IDENTITIES_PREFIX):
            if value is None:
                identity_lists.pop(key, None)
                continue
            identity_lists[key] = [
                ((subject_type, subject_id, record_id), datetime.fromtimestamp(at, tz=timezone.utc))
                for subject_type, subject_id, record_id, at in orjson.loads(value)
            ]
    identities = [entry for entries_ in identity_lists.values() for entry in entries_]
    newest = {key: max(at for _, at in entries_) for key, entries_ in identity_lists.items() if entries_}
    return RestoredState(rollups, identities, newest)
