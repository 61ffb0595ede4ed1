"""Period bucketing: which hour, day and calendar month a usage timestamp belongs to, in UTC or in a subject's
time zone. A period is always stored as the UTC instant at which it starts (and ends)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, time, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo

from metering_schemas import PeriodType, ResetPeriod
from metering_schemas.subject import SubjectSettings, known_zone, subject_key

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


# Local periods. Every offset and transition of the tz database since 1970 is a multiple of 15 minutes.
_HOUR, _STEP = timedelta(hours=1), timedelta(minutes=15)


class UnknownTimeZone(ValueError):
    """A time zone name the tz database does not know."""


@lru_cache(maxsize=1024)
def time_zone(name: str) -> ZoneInfo:
    """The IANA zone of this name (`Asia/Kolkata`), or UnknownTimeZone naming it."""
    try:
        return ZoneInfo(known_zone(name))
    except ValueError as error:
        raise UnknownTimeZone(str(error)) from None


def subject_zone(subjects: Mapping[str, SubjectSettings], subject_type: str, subject_id: str, default: str) -> str:
    """The zone a subject's periods are answered in: its own (`subjects`, by topic key), else `default`
    (METERING_DEFAULT_TIME_ZONE)."""
    own = subjects.get(subject_key(subject_type, subject_id))
    return own.time_zone if own is not None else default


def local_period_start(period: PeriodType | ResetPeriod, at: datetime, zone: tzinfo) -> datetime:
    """The UTC instant at which the local hour, day or month holding `at` starts in `zone`.

    A local hour starts when the wall clock shows a whole hour; an hour that repeats when clocks go back is two
    periods, and the hour that clocks jump into starts at the jump (Lord Howe's 30-minute shift makes it 30 minutes
    long). A day starts at local midnight, or at the jump when midnight does not exist."""
    local = at.astimezone(zone)
    if period.value == "HOURLY":
        start = local.replace(minute=0, second=0, microsecond=0)  # keeps `fold`: the second 01:00 stays the second
    elif period.value == "DAILY":
        start = datetime.combine(local.date(), time(0), tzinfo=zone)
    elif period.value == "MONTHLY":
        start = datetime.combine(local.date().replace(day=1), time(0), tzinfo=zone)
    else:
        return EPOCH
    # A wall time that does not exist (in the gap of a jump forward) converts with the offset before the jump, that
    # is, to the jump's own instant: where the period really starts.
    return start.astimezone(UTC)


def local_period_end(period: PeriodType | ResetPeriod, start: datetime, zone: tzinfo) -> datetime:
    """Exclusive end of the local period that starts at `start` (a UTC instant from local_period_start)."""
    if period.value == "HOURLY":  # 30 to 90 minutes long: the first later instant that starts another hour
        candidate = start + _HOUR
        while (following := local_period_start(period, candidate, zone)) == start:
            candidate += _STEP
        return following
    if period.value in ("DAILY", "MONTHLY"):
        day = start.astimezone(zone).date()
        if period.value == "DAILY":
            following_day = day + timedelta(days=1)
        else:
            following_day = (day.replace(day=28) + timedelta(days=4)).replace(day=1)
        return local_period_start(period, datetime.combine(following_day, time(12), tzinfo=zone), zone)
    return END_OF_TIME


def local_period_bounds(period: PeriodType | ResetPeriod, at: datetime, zone: tzinfo) -> tuple[datetime, datetime]:
    start = local_period_start(period, at, zone)
    return start, local_period_end(period, start, zone)
