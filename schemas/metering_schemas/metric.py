"""MetricDefinition: what is metered and how its records aggregate."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from metering_schemas._base import CaseInsensitiveEnum, Description, Identifier, Name, WireModel


class AggregationType(CaseInsensitiveEnum):
    COUNT = "COUNT"
    SUM = "SUM"
    AVG = "AVG"
    MAX = "MAX"
    MIN = "MIN"
    UNIQUE_COUNT = "UNIQUE_COUNT"  # distinct values found at valueProperty, compared as strings
    LATEST = "LATEST"  # the quantity of the record with the latest timestamp (on a tie, the greatest id)


class ResetPeriod(CaseInsensitiveEnum):
    NEVER = "NEVER"
    HOURLY = "HOURLY"
    DAILY = "DAILY"
    MONTHLY = "MONTHLY"


QUANTITY_PATH = "$.quantity"
MAX_GROUP_BY = 10
# `$.quantity`, or a path into the record's metadata: `$.metadata.model`, `$.metadata.usage.tokens`.
RecordPath = Annotated[str, Field(pattern=r"^\$\.(quantity|metadata(\.[^.\s]+)+)$", max_length=512)]
MetadataPath = Annotated[str, Field(pattern=r"^\$\.metadata(\.[^.\s]+)+$", max_length=512)]
DIMENSION_NAME_PATTERN = r"^[A-Za-z0-9_.:-]+$"
MAX_DIMENSION_NAME = 64  # characters
MAX_DIMENSION_VALUE = 1024  # characters
DimensionName = Annotated[str, Field(pattern=DIMENSION_NAME_PATTERN, min_length=1, max_length=MAX_DIMENSION_NAME)]
DimensionValue = Annotated[str, Field(max_length=MAX_DIMENSION_VALUE)]
# A metric's dimensions: name -> metadata path.
GroupBy = Annotated[dict[DimensionName, MetadataPath], Field(max_length=MAX_GROUP_BY)]
# The values a threshold or a price selects: some or all of a metric's groupBy dimensions.
DimensionValues = Annotated[dict[DimensionName, DimensionValue], Field(max_length=MAX_GROUP_BY)]
MAX_UNIT = 64  # characters
Unit = Annotated[str, Field(max_length=MAX_UNIT)]
MAX_FILTER_PATHS = 10
MAX_FILTER_VALUES = 100  # per path
FilterRules = Annotated[
    dict[RecordPath, Annotated[list[DimensionValue], Field(max_length=MAX_FILTER_VALUES)]],
    Field(max_length=MAX_FILTER_PATHS),
]


class MetricDefinition(WireModel):
    """Value of the compacted `metering.metrics` topic, keyed by `id`."""

    id: Identifier
    key: Identifier = Field(pattern=r"^[A-Za-z0-9_.:-]+$", description="Metric key, e.g. api_calls")
    name: Name
    description: Description = ""
    unit: Unit = ""
    aggregation_type: AggregationType
    reset_period: ResetPeriod = ResetPeriod.NEVER
    org_id: Identifier | None = Field(default=None, description="Organization scope; null = global")
    value_property: RecordPath | None = Field(
        default=None,
        description='Where the quantity is read: "$.quantity" (null: the default) or "$.metadata.<name>..."; '
        "for UNIQUE_COUNT, the value whose distinct strings are counted; ignored for COUNT",
    )
    group_by: GroupBy = Field(
        default_factory=dict,
        description="Dimensions: name -> metadata path. usage_summary then also has a row per combination of "
        "their values",
    )
    filter: FilterRules = Field(
        default_factory=dict,
        description="A record counts only when the value at every path is one of the listed strings",
    )

    @model_validator(mode="after")
    def _readable(self) -> MetricDefinition:
        if self.aggregation_type is AggregationType.UNIQUE_COUNT and self.value_property is None:
            raise ValueError("UNIQUE_COUNT needs valueProperty: the value whose distinct strings are counted")
        if any(not values for values in self.filter.values()):
            raise ValueError("every filter path needs at least one value")
        return self
