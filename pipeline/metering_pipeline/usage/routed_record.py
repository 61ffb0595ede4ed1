"""The routed topic's record layout, defined once: the router sends `AcceptedRecord`s, the rollup stage reads
`CountedRecord`s, and the two are this one struct over the quantity's type.

A routed record travels as a MessagePack array of these fields in this order (see `worker.routing`). Fields are only
ever appended, each with a default, so that a worker still reads the shorter records an older one left on the topic.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Generic, TypeVar

import msgspec

from metering_pipeline.usage.meter import TOTAL, Dimensions
from metering_schemas import AggregationType

Q = TypeVar("Q", str, Decimal)  # the quantity: its exact decimal text as sent, a Decimal as read


class RoutedRecord(msgspec.Struct, Generic[Q], array_like=True, gc=False):
    """A valid record with its dedup id, timestamp and stored metadata settled and the metric that governs it
    resolved: the routed topic's record layout. Its subclasses add behaviour, never fields."""

    subject_type: str
    subject_id: str
    record_id: str  # the record's id, or its deterministic source position when it had none
    metric_key: str
    metric_id: str
    aggregation: AggregationType
    quantity: Q  # exact: Decimal(text) is the model's value, exponent and sign included
    timestamp_ms: int  # epoch milliseconds, UTC
    metadata_json: str
    all_time: bool  # counted into an all-time rollup too: its metric never resets
    dimensions: Dimensions = TOTAL  # a grouped metric's dimension values, sorted by name
    distinct: str | None = None  # UNIQUE_COUNT: the string form of the value at valueProperty
    # The subject's time zone when the router routed it ("": UTC), decided once there so that a replay counts the
    # record into the same local periods; a zoned record counts in its zone's hours, days and months only.
    time_zone: str = ""


class AcceptedRecord(RoutedRecord[str]):
    """A record as intake accepts it and the router sends it, the quantity as its exact text.

    Plain values, not a UsageRecord: the fast path builds no model and no Decimal per record.
    """


class CountedRecord(RoutedRecord[Decimal]):
    """A record as the rollup stage sees it: validated, its metric resolved, routed by subject."""

    # True when absent: routed by an older worker, which kept an all-time rollup for every metric. (Redeclared only
    # for the default; it keeps its place in the layout.)
    all_time: bool = True

    @property
    def timestamp(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC)
