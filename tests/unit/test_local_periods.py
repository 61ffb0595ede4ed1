"""Periods in a subject's time zone (issue 28): hours, days and months cut at local boundaries and stored as the UTC
instants they start at, in the zones whose traps other metering systems fell into: half- and quarter-hour offsets,
days of 23 and 25 hours, an hour that repeats, Lord Howe's 30-minute shift, a missing midnight, a skipped day,
29 February. Every expected instant below is worked out by hand from the zone's offsets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from metering_pipeline.usage.periods import (
    SLOT_SECONDS,
    UnknownTimeZone,
    local_period_bounds,
    local_period_end,
    local_period_start,
    period_in,
    starts_of_slot,
    time_zone,
)
from metering_schemas import PeriodType

HOURLY, DAILY, MONTHLY = PeriodType.HOURLY, PeriodType.DAILY, PeriodType.MONTHLY
SECOND = timedelta(seconds=1)
ZONES = [
    "UTC",
    "Asia/Kolkata",  # +05:30
    "Asia/Kathmandu",  # +05:45
    "America/New_York",  # DST: 23- and 25-hour days, a repeated hour
    "Australia/Lord_Howe",  # DST of 30 minutes
    "America/Havana",  # DST begins at midnight: a day without 00:00
    "Europe/Dublin",  # "negative" DST in the tz database
    "Pacific/Apia",  # skipped 30 December 2011
    "America/St_Johns",  # -03:30 and DST
]


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)


def bounds(period: PeriodType, at: datetime, zone: str) -> tuple[datetime, datetime]:
    return local_period_bounds(period, at, ZoneInfo(zone))


def test_kolkata_days_and_months_start_at_half_past_utc():
    assert bounds(DAILY, utc(2026, 3, 10, 18, 29, 59), "Asia/Kolkata") == (
        utc(2026, 3, 9, 18, 30),
        utc(2026, 3, 10, 18, 30),
    )
    assert bounds(DAILY, utc(2026, 3, 10, 18, 30), "Asia/Kolkata") == (
        utc(2026, 3, 10, 18, 30),
        utc(2026, 3, 11, 18, 30),
    )
    assert bounds(HOURLY, utc(2026, 3, 10, 10, 45), "Asia/Kolkata") == (
        utc(2026, 3, 10, 10, 30),
        utc(2026, 3, 10, 11, 30),
    )
    assert bounds(HOURLY, utc(2026, 3, 10, 10, 29, 59), "Asia/Kolkata") == (
        utc(2026, 3, 10, 9, 30),
        utc(2026, 3, 10, 10, 30),
    )
    assert bounds(MONTHLY, utc(2026, 3, 31, 18, 29, 59), "Asia/Kolkata") == (
        utc(2026, 2, 28, 18, 30),
        utc(2026, 3, 31, 18, 30),
    )
    assert bounds(MONTHLY, utc(2026, 3, 31, 18, 30), "Asia/Kolkata") == (
        utc(2026, 3, 31, 18, 30),
        utc(2026, 4, 30, 18, 30),
    )


def test_kathmandu_periods_start_at_a_quarter_past_utc():
    assert bounds(MONTHLY, utc(2026, 1, 31, 18, 14, 59), "Asia/Kathmandu") == (
        utc(2025, 12, 31, 18, 15),
        utc(2026, 1, 31, 18, 15),
    )
    assert bounds(MONTHLY, utc(2026, 1, 31, 18, 15), "Asia/Kathmandu") == (
        utc(2026, 1, 31, 18, 15),
        utc(2026, 2, 28, 18, 15),
    )
    assert bounds(HOURLY, utc(2026, 1, 31, 18, 14, 59), "Asia/Kathmandu") == (
        utc(2026, 1, 31, 17, 15),
        utc(2026, 1, 31, 18, 15),
    )
    assert bounds(DAILY, utc(2026, 6, 1), "Asia/Kathmandu") == (utc(2026, 5, 31, 18, 15), utc(2026, 6, 1, 18, 15))


def test_new_york_has_a_23_hour_day_in_march_and_a_25_hour_day_in_november():
    assert bounds(DAILY, utc(2026, 3, 8, 12), "America/New_York") == (utc(2026, 3, 8, 5), utc(2026, 3, 9, 4))
    assert bounds(DAILY, utc(2026, 11, 1, 12), "America/New_York") == (utc(2026, 11, 1, 4), utc(2026, 11, 2, 5))
    # The month that holds the March change is an hour short of 31 days; November's an hour long of 30.
    assert bounds(MONTHLY, utc(2026, 3, 15), "America/New_York") == (utc(2026, 3, 1, 5), utc(2026, 4, 1, 4))
    assert bounds(MONTHLY, utc(2026, 11, 15), "America/New_York") == (utc(2026, 11, 1, 4), utc(2026, 12, 1, 5))


def test_new_york_hour_that_repeats_is_two_periods_and_the_skipped_hour_is_none():
    # 01:00–02:00 happens twice on 1 November 2026: first in EDT (05:00 UTC), then in EST (06:00 UTC).
    assert bounds(HOURLY, utc(2026, 11, 1, 5, 30), "America/New_York") == (utc(2026, 11, 1, 5), utc(2026, 11, 1, 6))
    assert bounds(HOURLY, utc(2026, 11, 1, 6, 30), "America/New_York") == (utc(2026, 11, 1, 6), utc(2026, 11, 1, 7))
    # On 8 March 2026 clocks jump from 02:00 EST to 03:00 EDT (07:00 UTC): 01:00 EST is followed by 03:00 EDT.
    assert bounds(HOURLY, utc(2026, 3, 8, 6, 59), "America/New_York") == (utc(2026, 3, 8, 6), utc(2026, 3, 8, 7))
    assert bounds(HOURLY, utc(2026, 3, 8, 7), "America/New_York") == (utc(2026, 3, 8, 7), utc(2026, 3, 8, 8))


def test_lord_howe_has_a_30_minute_hour_in_october_and_a_90_minute_hour_in_april():
    # 4 October 2026, 02:00 +10:30 (15:30 UTC) becomes 02:30 +11:00: local hour 2 lasts from the jump to 03:00.
    assert bounds(HOURLY, utc(2026, 10, 3, 15, 45), "Australia/Lord_Howe") == (
        utc(2026, 10, 3, 15, 30),
        utc(2026, 10, 3, 16),
    )
    assert bounds(HOURLY, utc(2026, 10, 3, 15, 29), "Australia/Lord_Howe") == (
        utc(2026, 10, 3, 14, 30),
        utc(2026, 10, 3, 15, 30),
    )
    # 5 April 2026, 02:00 +11:00 (15:00 UTC) becomes 01:30 +10:30: local hour 1 lasts 90 minutes.
    assert bounds(HOURLY, utc(2026, 4, 4, 15, 15), "Australia/Lord_Howe") == (
        utc(2026, 4, 4, 14),
        utc(2026, 4, 4, 15, 30),
    )
    assert bounds(DAILY, utc(2026, 10, 3, 20), "Australia/Lord_Howe") == (
        utc(2026, 10, 3, 13, 30),
        utc(2026, 10, 4, 13),
    )
    assert bounds(DAILY, utc(2026, 4, 4, 20), "Australia/Lord_Howe") == (utc(2026, 4, 4, 13), utc(2026, 4, 5, 13, 30))


def test_a_day_without_midnight_starts_when_the_clocks_jump():
    # Havana, 8 March 2026: 00:00 CST (05:00 UTC) becomes 01:00 CDT; the day starts then and lasts 23 hours.
    assert bounds(DAILY, utc(2026, 3, 8, 12), "America/Havana") == (utc(2026, 3, 8, 5), utc(2026, 3, 9, 4))


def test_a_skipped_day_is_no_period_at_all():
    # Samoa moved west of the date line: 29 December 2011 (-10:00) was followed by 31 December (+14:00).
    assert bounds(DAILY, utc(2011, 12, 30, 9, 59), "Pacific/Apia") == (utc(2011, 12, 29, 10), utc(2011, 12, 30, 10))
    assert bounds(DAILY, utc(2011, 12, 30, 10), "Pacific/Apia") == (utc(2011, 12, 30, 10), utc(2011, 12, 31, 10))


def test_29_february_is_a_day_of_its_own_and_ends_february():
    assert bounds(DAILY, utc(2028, 2, 29, 12), "Asia/Kolkata") == (utc(2028, 2, 28, 18, 30), utc(2028, 2, 29, 18, 30))
    assert bounds(MONTHLY, utc(2028, 2, 29, 18, 29), "Asia/Kolkata") == (
        utc(2028, 1, 31, 18, 30),
        utc(2028, 2, 29, 18, 30),
    )
    assert bounds(MONTHLY, utc(2028, 2, 29, 12), "America/New_York") == (utc(2028, 2, 1, 5), utc(2028, 3, 1, 5))


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("period", [HOURLY, DAILY, MONTHLY])
def test_periods_tile_time_every_instant_in_exactly_one(zone: str, period: PeriodType):
    """A year of periods, each ending where the next starts; instants every 7 minutes fall in the one whose bounds
    hold them."""
    tz = ZoneInfo(zone)
    start = local_period_start(period, utc(2026, 1, 1), tz)
    ends_at = utc(2027, 1, 2)
    starts = []
    while start < ends_at:
        end = local_period_end(period, start, tz)
        assert start < end, (start, end)
        assert local_period_start(period, end - SECOND, tz) == start
        assert local_period_start(period, end, tz) == end
        starts.append(start)
        start = end
    at = utc(2026, 1, 1)
    index = 0
    while at < utc(2027, 1, 1):
        while index + 1 < len(starts) and starts[index + 1] <= at:
            index += 1
        assert local_period_start(period, at, tz) == starts[index], at
        at += timedelta(minutes=7)


@pytest.mark.parametrize("zone", [zone for zone in ZONES if zone != "UTC"])  # a routed record says "" for UTC
def test_the_per_record_lookup_gives_the_local_hour_day_and_month(zone: str):
    at = utc(2026, 11, 1, 5, 52, 17)
    for step in range(0, 3 * 24 * 60, 11):
        moment = at + timedelta(minutes=step)
        expected = tuple((period_in(p, zone), local_period_start(p, moment, ZoneInfo(zone))) for p in PeriodType)
        assert starts_of_slot(zone, int(moment.timestamp()) // SLOT_SECONDS) == expected


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "", "../../etc/passwd", "asia/kolkata "])
def test_an_unknown_zone_is_refused_by_name(name: str):
    with pytest.raises(UnknownTimeZone, match="unknown time zone"):
        time_zone(name)


def test_a_known_zone_is_found():
    assert time_zone("Asia/Kolkata").utcoffset(datetime(2026, 1, 1)) == timedelta(hours=5, minutes=30)
