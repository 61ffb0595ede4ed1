"""The events the pipeline emits: `threshold.approaching` / `threshold.exceeded` on `metering.alerts`,
`usage.aggregated` on `usage.aggregated`, `metric.defined` on `metering.events`.

The worker builds and serializes them with these models, so what consumers read is exactly what
the models (and the JSON Schema files generated from them) describe. Consumers parse them with
`model_validate_json`; new fields may be added, existing ones keep their names and formats.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from metering_schemas._base import AggregateQuantity, EmittedUtcDatetime, Identifier, WireModel
from metering_schemas.metric import MetricDefinition, ResetPeriod
from metering_schemas.threshold import ThresholdAction
from metering_schemas.usage import PeriodType


class Event(WireModel):
    """An event of the pipeline: every field is always written, so its JSON Schema requires all of them."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


class ThresholdAlert(Event):
    """A threshold crossed in one window: the value of `metering.alerts`, keyed `"{subjectType}:{subjectId}"`."""

    id: str = Field(
        min_length=1, description="Deterministic: threshold, subject, window, type and limit; de-duplicate by it"
    )
    type: Literal["threshold.approaching", "threshold.exceeded"] = Field(
        description="approaching: value >= fraction (default 0.8) x threshold; exceeded: value > threshold"
    )
    threshold_id: Identifier
    metric_key: Identifier
    subject_type: Identifier
    subject_id: Identifier = Field(description='The subject whose usage crossed it (never "*")')
    threshold: AggregateQuantity = Field(description="The limit in force when it fired (exact decimal string)")
    value: AggregateQuantity = Field(
        description="The metric's aggregate over the window when it fired "
        "(exact decimal string, up to 76 digits with 18 after the point)"
    )
    period_type: ResetPeriod = Field(description="The window: the metric's resetPeriod (NEVER: all time)")
    period_start: EmittedUtcDatetime
    period_end: EmittedUtcDatetime = Field(description="Exclusive; 2106-01-01T00:00:00Z for NEVER")
    action: ThresholdAction = Field(description="BLOCK: the subject is blocked for the metric (entitlement checks)")
    notify_emails: list[str]
    occurred_at: EmittedUtcDatetime = Field(description="When the worker decided it")
    dimensions: dict[str, str] = Field(
        default_factory=dict,
        description="The dimension row it was evaluated on (the threshold's dimensions); empty: the total",
    )
    time_zone: str = Field(
        default="UTC",
        description="The IANA zone the window was cut in: the subject's (DAILY and MONTHLY windows "
        "reset at its local midnight)",
    )
    local_period_start: str | None = Field(
        default=None,
        description="periodStart on the wall clock of timeZone, with its offset (`2026-03-10T00:00:00+05:30`)",
    )


class UsageAggregated(Event):
    """A rollup as it stands after a checkpoint: the value of `usage.aggregated`, keyed `"{subjectType}:{subjectId}"`."""  # noqa: E501 - the model's JSON Schema description, one line

    type: Literal["usage.aggregated"] = "usage.aggregated"
    metric_key: Identifier
    subject_type: Identifier
    subject_id: Identifier
    period_type: PeriodType
    period_start: EmittedUtcDatetime
    period_end: EmittedUtcDatetime = Field(description="Exclusive")
    total_quantity: AggregateQuantity = Field(
        description="The metric's aggregationType over the period, as in usage_summary "
        "(exact decimal string, up to 76 digits with 18 after the point)"
    )
    record_count: int = Field(ge=0)
    version: int = Field(
        ge=0,
        description="Grows with every change of the rollup: a greater version supersedes, "
        "the same version is the same state",
    )
    dimensions: dict[str, str] = Field(
        default_factory=dict, description="The dimension row's values; empty: the total row"
    )
    time_zone: str = Field(
        default="UTC",
        description="The IANA zone the period was cut in: UTC, or the subject's zone of its own (its rollups are cut "
        "in that zone only)",
    )
    local_period_start: str | None = Field(
        default=None,
        description="periodStart on the wall clock of timeZone, with its offset (`2026-03-10T00:00:00+05:30`)",
    )


class MetricDefined(Event):
    """A metric definition written to `metering.metrics`: the value of `metering.events`, keyed by definition id."""

    id: str = Field(min_length=1, description='"metric.defined:{definition id}:{offset in metering.metrics}"')
    type: Literal["metric.defined"] = "metric.defined"
    occurred_at: EmittedUtcDatetime
    metric: MetricDefinition
