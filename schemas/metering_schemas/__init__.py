"""The wire contract of usage-metering: pydantic v2 models of what travels on its topics.

Producers install only this distribution (`usage-metering-schemas`); the JSON Schema files
generated from these models ship in `metering_schemas/json/` for non-Python producers; the
events the pipeline emits (`ThresholdAlert`, `UsageAggregated`, `MetricDefined`) are here for consumers.
"""

from metering_schemas.billing import (
    BillingPeriod,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    LineType,
    Plan,
    PlanUse,
    Price,
    PriceTier,
    PricingModel,
    Subscription,
    TierLine,
)
from metering_schemas.dead_letter import DeadLetter, FieldError, RejectReason, SourcePosition
from metering_schemas.events import MetricDefined, ThresholdAlert, UsageAggregated
from metering_schemas.metric import AggregationType, MetricDefinition, ResetPeriod
from metering_schemas.subject import SubjectSettings, TimeZoneName
from metering_schemas.threshold import ThresholdAction, UsageThreshold
from metering_schemas.usage import PeriodType, UsageRecord, UsageRecordBatch, UsageSummary

__all__ = [
    "BillingPeriod",
    "Invoice",
    "InvoiceLine",
    "InvoiceStatus",
    "LineType",
    "Plan",
    "PlanUse",
    "Price",
    "PriceTier",
    "PricingModel",
    "Subscription",
    "TierLine",
    "AggregationType",
    "DeadLetter",
    "FieldError",
    "RejectReason",
    "SourcePosition",
    "MetricDefined",
    "MetricDefinition",
    "PeriodType",
    "ResetPeriod",
    "SubjectSettings",
    "TimeZoneName",
    "ThresholdAction",
    "ThresholdAlert",
    "UsageAggregated",
    "UsageRecord",
    "UsageRecordBatch",
    "UsageSummary",
    "UsageThreshold",
]
