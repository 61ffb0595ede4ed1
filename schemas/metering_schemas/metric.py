"""MetricDefinition: what is metered and how its records aggregate."""

from __future__ import annotations

from pydantic import Field

from metering_schemas._base import CaseInsensitiveEnum, Identifier, WireModel


class AggregationType(CaseInsensitiveEnum):
    COUNT = "COUNT"
    SUM = "SUM"
    AVG = "AVG"
    MAX = "MAX"
    MIN = "MIN"


class ResetPeriod(CaseInsensitiveEnum):
    NEVER = "NEVER"
    HOURLY = "HOURLY"
    DAILY = "DAILY"
    MONTHLY = "MONTHLY"


class MetricDefinition(WireModel):
    """Value of the compacted `metering.metrics` topic, keyed by `id`."""

    id: Identifier
    key: Identifier = Field(pattern=r"^[A-Za-z0-9_.:-]+$", description="Metric key, e.g. api_calls")
    name: str = Field(min_length=1, max_length=256)
    description: str = ""
    unit: str = ""
    aggregation_type: AggregationType
    reset_period: ResetPeriod = ResetPeriod.NEVER
    org_id: Identifier | None = Field(default=None, description="Organization scope; null = global")
