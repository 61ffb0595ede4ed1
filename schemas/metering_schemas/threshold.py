"""UsageThreshold: a limit on one metric for one subject (or every subject of a type)."""

from __future__ import annotations

from pydantic import Field

from metering_schemas._base import CaseInsensitiveEnum, Identifier, Quantity, WireModel
from metering_schemas.metric import DimensionName, DimensionValue


class ThresholdAction(CaseInsensitiveEnum):
    ALERT = "ALERT"
    BLOCK = "BLOCK"
    NONE = "NONE"


class UsageThreshold(WireModel):
    """Value of the compacted `metering.thresholds` topic, keyed by `id`."""

    id: Identifier
    metric_key: Identifier
    subject_type: Identifier
    subject_id: Identifier = Field(description='Subject id, or "*" for every subject of the type')
    threshold: Quantity
    action: ThresholdAction = ThresholdAction.ALERT
    notify_emails: list[str] = Field(default_factory=list)
    org_id: Identifier | None = Field(default=None, description="Organization that owns it (set by org-scoped API keys)")
    dimensions: dict[DimensionName, DimensionValue] = Field(
        default_factory=dict, description="Every groupBy dimension of the metric with a value: the threshold watches that "
                                          "dimension row instead of the total (empty: the total)")
