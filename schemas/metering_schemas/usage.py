"""UsageRecord and UsageSummary: what producers publish, and what the pipeline rolls up."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import Field

from metering_schemas._base import AggregateQuantity, CaseInsensitiveEnum, Identifier, Quantity, UtcDatetime, WireModel


class UsageRecord(WireModel):
    """One usage event on `usage.recorded`.

    `id` is the dedup key (without one, a record counts once per Kafka offset); `timestamp`
    defaults to the Kafka message time; `quantity` defaults to 1 and may be a JSON number or a string
    in JSON number form ("12.5"; not " 12.5", "1_000" nor "01").
    """

    id: Identifier | None = None
    metric_key: Identifier
    subject_type: Identifier
    subject_id: Identifier
    quantity: Quantity = Decimal(1)
    timestamp: UtcDatetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class UsageRecordBatch(WireModel):
    """`usage.recordBatch`: several records in one message."""

    records: list[UsageRecord] = Field(min_length=1)


# `{metricKey}:{subjectType}:{subjectId}:{periodType}:{periodStart}`, and a dimension row's pairs (or their SHA-256):
# three Identifiers and more, so longer than one Identifier may be (at most 876 characters).
SummaryId = Annotated[str, Field(min_length=1, max_length=1024)]


class PeriodType(CaseInsensitiveEnum):
    HOURLY = "HOURLY"
    DAILY = "DAILY"
    MONTHLY = "MONTHLY"


class UsageSummary(WireModel):
    """A rollup of one metric for one subject over one period (UTC, or the time zone it names)."""

    id: SummaryId
    metric_key: Identifier
    subject_type: Identifier
    subject_id: Identifier
    period_type: PeriodType
    period_start: UtcDatetime
    period_end: UtcDatetime
    total_quantity: AggregateQuantity = Field(
        description="The metric's aggregationType over the period: up to 76 digits "
        "with 18 after the point (usage_summary's Decimal(76, 18))"
    )
    record_count: int = Field(ge=0)
    dimensions: dict[str, str] = Field(
        default_factory=dict, description="The dimension row's values; empty: the total row"
    )
    time_zone: str = Field(
        default="UTC",
        max_length=64,
        description="The IANA time zone the period was cut in: periodStart and periodEnd are that zone's local "
        "boundaries, as UTC instants",
    )
