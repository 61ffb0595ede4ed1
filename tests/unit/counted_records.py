"""Routed records and rollups as the unit tests of the rollup state make and compare them."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from metering_pipeline.usage.meter import Dimensions
from metering_pipeline.usage.periods import EPOCH
from metering_pipeline.usage.rollups import Rollup, ValuesRollup
from metering_pipeline.usage.routed_record import CountedRecord
from metering_schemas import AggregationType

SUM = AggregationType.SUM


def ms(at: datetime) -> int:
    return (at - EPOCH) // timedelta(milliseconds=1)


def counted(
    record_id: str,
    at: datetime,
    quantity: str = "1",
    *,
    aggregation: AggregationType = SUM,
    dimensions: Dimensions = (),
    distinct: str | None = None,
    subject: str = "o",
    metric: str = "m",
    all_time: bool = True,
) -> CountedRecord:
    return CountedRecord(
        "org",
        subject,
        record_id,
        metric,
        metric,
        aggregation,
        Decimal(quantity),
        ms(at),
        "{}",
        all_time,
        dimensions,
        distinct,
    )


def view(rollup: Rollup | None) -> tuple[Any, ...] | None:
    """Everything a rollup holds, for comparing states."""
    if rollup is None:
        return None
    base = (
        type(rollup).__name__,
        rollup.aggregation,
        rollup.count,
        rollup.sum,
        rollup.min,
        rollup.max,
        rollup.version,
        rollup.metric_id,
        rollup.total(),
    )
    if isinstance(rollup, ValuesRollup):
        return (*base, frozenset(rollup.values), rollup.latest, rollup.latest_ms, rollup.latest_id)
    return base
