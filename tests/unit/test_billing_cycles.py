"""Billing cycles (issue 28): calendar months and anniversary cycles in the subscription's time zone, anchor days 29–31
clamped to short months, and cycles that never overlap and leave no gap (the trap of anchors that clamped one end and
not the other)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from metering_pipeline.billing.cycles import CALENDAR_ANCHOR, InvalidAnchor, anchor_of, named_cycle

UTC_ZONE = ZoneInfo("UTC")


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)


def test_an_anchor_on_the_31st_bills_on_the_last_day_of_short_months_then_the_31st_again():
    cycles = [named_cycle(2027, month, 31, UTC_ZONE) for month in range(1, 6)]
    assert [start for start, _ in cycles] == [
        utc(2027, 1, 31),
        utc(2027, 2, 28),
        utc(2027, 3, 31),
        utc(2027, 4, 30),
        utc(2027, 5, 31),
    ]
    assert cycles[-1][1] == utc(2027, 6, 30)
    assert named_cycle(2028, 2, 31, UTC_ZONE) == (utc(2028, 2, 29), utc(2028, 3, 31))  # a leap year


def test_an_anchor_on_the_30th_in_february_of_a_leap_year():
    assert named_cycle(2028, 1, 30, UTC_ZONE) == (utc(2028, 1, 30), utc(2028, 2, 29))
    assert named_cycle(2028, 2, 30, UTC_ZONE) == (utc(2028, 2, 29), utc(2028, 3, 30))


@pytest.mark.parametrize("anchor", [1, 15, 28, 29, 30, 31])
@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "America/Havana"])
def test_a_year_of_cycles_holds_every_instant_exactly_once(anchor: int, zone: str):
    tz = ZoneInfo(zone)
    months = [(2027, 12), *((2028, month) for month in range(1, 13)), (2029, 1)]  # all of 2028, a leap year
    cycles = [named_cycle(year, month, anchor, tz) for year, month in months]
    for (_, ends), (begins, _) in zip(cycles, cycles[1:], strict=False):
        assert ends == begins  # no gap, no overlap
    for begins, ends in cycles:  # each starts at local midnight on the anchor day, or the month's last day
        local = begins.astimezone(tz)
        last_day = ((local.replace(day=28) + timedelta(days=4)).replace(day=1) - timedelta(days=1)).day
        assert local.day == min(anchor, last_day) and (local.hour, local.minute) in {(0, 0), (1, 0)}  # 01:00: no 00:00
        assert timedelta(days=27) < ends - begins < timedelta(days=32)
    at = cycles[0][0]
    while at < cycles[-1][1]:  # every 5 hours: in exactly one cycle
        assert sum(1 for begins, ends in cycles if begins <= at < ends) == 1, at
        at += timedelta(hours=5)


def test_the_calendar_cycle_is_the_local_month():
    kolkata = ZoneInfo("Asia/Kolkata")
    assert named_cycle(2026, 3, CALENDAR_ANCHOR, kolkata) == (
        utc(2026, 2, 28, 18, 30),
        utc(2026, 3, 31, 18, 30),
    )
    assert named_cycle(2026, 4, CALENDAR_ANCHOR, kolkata) == (
        utc(2026, 3, 31, 18, 30),
        utc(2026, 4, 30, 18, 30),
    )


def test_the_anchor_of_a_subscription_is_its_local_start_day():
    started = utc(2026, 1, 30, 20)  # already the 31st in Kolkata
    assert (anchor_of(started, UTC_ZONE), anchor_of(started, ZoneInfo("Asia/Kolkata"))) == (30, 31)


@pytest.mark.parametrize("anchor", [0, 32, -1])
def test_an_anchor_outside_a_month_is_refused(anchor: int):
    with pytest.raises(InvalidAnchor, match=f"anchor day {anchor} is not"):
        named_cycle(2026, 1, anchor, UTC_ZONE)
