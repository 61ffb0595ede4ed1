"""DeadLetter: the value of `usage.recorded.dlq`, one per rejected input, saying why."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import Field

from metering_schemas._base import UtcDatetime, WireModel


class RejectReason(str, Enum):
    INVALID_JSON = "invalid_json"  # not JSON, not UTF-8, nested too deep, NaN/Infinity literals
    INVALID_RECORD = "invalid_record"  # JSON, but not a UsageRecord or {"records": [...]}
    UNKNOWN_METRIC = "unknown_metric"  # no definition for metricKey (global or the record's org)
    TOO_LATE = "too_late"  # older than the allowed lateness
    FUTURE_TIMESTAMP = "future_timestamp"  # more than the allowed skew ahead of the message time
    TOO_LARGE = "too_large"  # over the message size limit
    CARDINALITY_LIMIT = "cardinality_limit"  # a new distinct value or dimension combination past the worker's bound


class FieldError(WireModel):
    loc: list[str | int]
    msg: str
    type: str


class SourcePosition(WireModel):
    topic: str
    partition: int
    offset: int
    timestamp: UtcDatetime | None = None
    key: str | None = Field(default=None, description="Message key, if it was UTF-8")


class DeadLetter(WireModel):
    reason: RejectReason
    message: str = Field(description="Human-readable explanation")
    errors: list[FieldError] = Field(default_factory=list)
    source: SourcePosition
    index: int | None = Field(default=None, description="Position in a {records: [...]} batch message")
    record: Any = Field(default=None, description="The rejected record as parsed, for batch elements and valid JSON")
    original_value_base64: str | None = Field(
        default=None, description="The message's original bytes, for rejections of the whole message"
    )
    original_size: int | None = Field(default=None, description="Size in bytes of the rejected message")
    truncated: bool = Field(
        default=False,
        description="The evidence was cut to keep the dead letter within Kafka's message size: "
        "original_value_base64 holds only the message's first 64 KiB and record is omitted",
    )
    occurred_at: UtcDatetime
