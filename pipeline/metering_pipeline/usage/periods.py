"""Period bucketing: which hour, day and calendar month a usage timestamp belongs to, in UTC or in a subject's
time zone. A period is always stored as the UTC instant at which it starts (and ends)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo
from functools import cache, lru_cache
from zoneinfo import ZoneInfo

from metering_schemas import PeriodType, ResetPeriod
from metering_schemas.subject import SubjectSettings, known_zone, subject_key

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The NEVER window ends far in the future, at a value ClickHouse's DateTime can still hold.
END_OF_TIME = datetime(2106, 1, 1, tzinfo=UTC)


def period_start(period: PeriodType | ResetPeriod | LocalPeriod, at: datetime) -> datetime:
    """Start of the period holding `at` (a local one's in its zone)."""
    if type(period) is LocalPeriod:
        return local_period_start(period.type, at, time_zone(period.zone))
    at = at.astimezone(UTC)
    if period.value == "HOURLY":
        return at.replace(minute=0, second=0, microsecond=0)
    if period.value == "DAILY":
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period.value == "MONTHLY":
        return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return EPOCH


@lru_cache(maxsize=8192)  # every changed rollup asks, for few distinct periods
def period_end(period: PeriodType | ResetPeriod | LocalPeriod, start: datetime) -> datetime:
    """Exclusive end of the period that starts at `start` (a local one's in its zone)."""
    if type(period) is LocalPeriod:
        return local_period_end(period.type, start, time_zone(period.zone))
    if period.value == "HOURLY":
        return start + timedelta(hours=1)
    if period.value == "DAILY":
        return start + timedelta(days=1)
    if period.value == "MONTHLY":
        return (
            start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        )
    return END_OF_TIME


# The longest an hour, a day and a month can last in any zone (a DST change adds at most an hour; a skipped day such as
# Samoa's 30 December 2011 only shortens one).
_LONGEST = {"HOURLY": timedelta(hours=2), "DAILY": timedelta(hours=26), "MONTHLY": timedelta(days=32)}


def latest_period_end(period: PeriodType | ResetPeriod, start: datetime) -> datetime:
    """The latest a period of this type starting at `start` ends, in whichever zone it was cut: a bound for what does
    not know its period's zone (threshold markers), where keeping something a day longer costs nothing."""
    longest = _LONGEST.get(period.value)
    return END_OF_TIME if longest is None else start + longest


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


# Local periods. Every offset and transition of the tz database since 1970 is a multiple of 15 minutes, so the local
# hour, day and month are the same for every instant of a 15-minute slot of UTC time: the per-record lookup caches
# them per slot.
SLOT_SECONDS = 15 * 60
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


@dataclass(frozen=True, slots=True, eq=False)
class LocalPeriod:
    """An hour, day or month cut in a time zone other than UTC, in a rollup's key where a UTC one has its PeriodType.
    One object per (type, zone) (`local_period`), so keys compare and hash by identity, as fast as an enum member."""

    type: PeriodType
    zone: str  # the IANA name

    @property
    def value(self) -> str:
        """The period type's name, as an enum member's `value`: what ClickHouse's period_type and the events say."""
        return self.type.value


@cache  # a few zones × three types; never two objects for one
def local_period(period: PeriodType, zone_name: str) -> LocalPeriod:
    return LocalPeriod(period, zone_name)


def zone_of(period: PeriodType | ResetPeriod | LocalPeriod) -> str:
    return period.zone if type(period) is LocalPeriod else "UTC"


def period_in(period: PeriodType | ResetPeriod, zone_name: str) -> PeriodType | ResetPeriod | LocalPeriod:
    """The period of this type cut in the zone, as rollup keys name it ("" and "UTC": the UTC one; NEVER has no
    zone)."""
    if not zone_name or zone_name == "UTC" or period.value == "NEVER":
        return period
    return local_period(PeriodType(period.value), zone_name)


@lru_cache(maxsize=16384)
def starts_of_slot(zone_name: str, slot: int) -> tuple[tuple[LocalPeriod, datetime], ...]:
    at, zone = EPOCH + timedelta(seconds=slot * SLOT_SECONDS), time_zone(zone_name)
    return tuple((local_period(period, zone_name), local_period_start(period, at, zone)) for period in PeriodType)


@lru_cache(maxsize=8192)  # one per changed rollup's period: few distinct ones at a time
def local_period_start_text(start: datetime, zone_name: str) -> str:
    """A period's start as the wall clock of its zone shows it, with the offset: `2026-03-10T00:00:00+05:30`."""
    return start.astimezone(time_zone(zone_name or "UTC")).isoformat()
