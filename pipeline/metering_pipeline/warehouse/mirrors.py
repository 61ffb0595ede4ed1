"""How each definitions topic is mirrored into its ClickHouse table (the topic stays the source of truth).

A mirror row carries the entry's topic offset as its version and `deleted = 1` for a tombstone, so
ReplacingMergeTree keeps the latest state of every definition however often an entry is re-mirrored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import orjson
from pydantic import BaseModel

from metering_schemas import MetricDefinition, Plan, Subscription

D = TypeVar("D", bound=BaseModel)


@dataclass(frozen=True)
class Mirror(Generic[D]):
    model: type[D]
    table: str
    columns: tuple[str, ...]  # the definition's own columns; `deleted` and `version` follow
    values: Callable[[D], list[object]]

    def row(self, definition_id: str, definition: D | None, version: int) -> list[object]:
        if definition is None:  # only the key column (first) matters for a deleted definition
            blank: list[object] = [None] * (len(self.columns) - 1)
            return [definition_id, *blank, 1, version]
        return [*self.values(definition), 0, version]

    @property
    def all_columns(self) -> list[str]:
        return [*self.columns, "deleted", "version"]


METRICS: Mirror[MetricDefinition] = Mirror(
    MetricDefinition,
    "metric_definitions",
    (
        "id",
        "key",
        "name",
        "description",
        "unit",
        "aggregation_type",
        "reset_period",
        "org_id",
        "value_property",
        "group_by",
        "filter",
    ),
    lambda d: [
        d.id,
        d.key,
        d.name,
        d.description,
        d.unit,
        d.aggregation_type.value,
        d.reset_period.value,
        d.org_id,
        d.value_property,
        orjson.dumps(d.group_by).decode(),
        orjson.dumps(d.filter).decode(),
    ],
)

PLANS: Mirror[Plan] = Mirror(
    Plan,
    "plans",
    ("key", "name", "currency", "billing_period", "flat_fee", "prices", "org_id"),
    lambda p: [
        p.key,
        p.name,
        p.currency,
        p.billing_period.value,
        p.flat_fee,
        orjson.dumps([price.model_dump(mode="json", by_alias=True) for price in p.prices]).decode(),
        p.org_id,
    ],
)

SUBSCRIPTIONS: Mirror[Subscription] = Mirror(
    Subscription,
    "subscriptions",
    ("id", "subject_type", "subject_id", "plan_key", "start_at", "end_at", "org_id"),
    lambda s: [s.id, s.subject_type, s.subject_id, s.plan_key, s.start_at, s.end_at, s.org_id],
)
