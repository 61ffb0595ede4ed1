"""UTC period bucketing: which hour, day and calendar month a usage timestamp belongs to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache

from metering_schemas import PeriodType, ResetPeriod

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The NEVER window ends far in the future, at a value ClickHouse's DateTime can still hold.
END_OF_TIME = datetime(2106, 1, 1, tzinfo=UTC)


def period_start(period: PeriodType | ResetPeriod, at: datetime) -> datetime:
    at = at.astimezone(UTC)
    if period.value == "HOURLY":
        return at.replace(minute=0, second=0, microsecond=0)
    if period.value == "DAILY":
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period.value == "MONTHLY":
        return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return EPOCH


@lru_cache(maxsize=8192)  # every changed rollup asks, for few distinct periods
def period_end(period: PeriodType | ResetPeriod, start: datetime) -> datetime:
    """Exclusive end of the period that starts at `start`."""
    if period.value == "HOURLY":
        return start + timedelta(hours=1)
    if period.value == "DAILY":
        return start + timedelta(days=1)
    if period.value == "MONTHLY":
        return (
            start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        )
    return END_OF_TIME


def period_bounds(period: PeriodType | ResetPeriod, at: datetime) -> tuple[datetime, datetime]:
    start = period_start(period, at)
    return start, period_end(period, start)


def rollup_starts(at: datetime) -> tuple[tuple[PeriodType, datetime], ...]:
    """Every rollup period a record at `at` counts in: its hour, its day and its month."""
    return starts_of_hour(int(at.timestamp() // 3600))


@lru_cache(maxsize=4096)
def starts_of_hour(hour: int) -> tuple[tuple[PeriodType, datetime], ...]:
    """Records cluster in few hours: the per-record bucketing is a cache hit."""
    at = EPOCH + timedelta(hours=hour)
    return tuple((period, period_start(period, at)) for period in PeriodType)
