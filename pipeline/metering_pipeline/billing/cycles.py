"""Billing cycles: the periods a subscription is invoiced for, in its time zone.

A calendar cycle is the local calendar month. An anniversary cycle starts at local midnight on
its anchor day of every month, the day clamped to the month's length: an anchor on the 31st
bills from Jan 31, Feb 28 (29), Mar 31, Apr 30, … Each cycle ends where the next one starts, so
cycles never overlap and leave no gap, whatever the anchor and the zone's clock changes.
"""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import Context, Decimal, localcontext

from metering_pipeline.usage.periods import time_zone
from metering_schemas import Subscription

CALENDAR_ANCHOR = 1  # a calendar cycle is an anniversary cycle anchored on the 1st


class InvalidAnchor(ValueError):
    """An anchor day outside 1…31."""


def cycle_start(year: int, month: int, anchor_day: int, zone: tzinfo) -> datetime:
    """The UTC instant at which the cycle of this month starts: local midnight of the anchor day, clamped."""
    if not 1 <= anchor_day <= 31:
        raise InvalidAnchor(f"billing anchor day {anchor_day} is not a day of a month (1…31)")
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    # A midnight that does not exist (clocks jump at 00:00) converts to the jump's instant, when the day starts.
    return datetime.combine(date(year, month, day), time(0), tzinfo=zone).astimezone(UTC)


def anchor_of(subscription_start: datetime, zone: tzinfo) -> int:
    """An anniversary anchor taken from a subscription's start: its local day of the month."""
    return subscription_start.astimezone(zone).day


def subscription_anchor(subscription: Subscription) -> int:
    """The day of the month a subscription's cycles start on: the 1st for calendar billing; its anchor, else its
    start's local day, for anniversary billing."""
    if subscription.billing_time == "calendar":
        return CALENDAR_ANCHOR
    return subscription.billing_anchor or anchor_of(subscription.start_at, time_zone(subscription.time_zone))


def named_cycle(year: int, month: int, anchor_day: int, zone: tzinfo) -> tuple[datetime, datetime]:
    """The cycle that starts in this local month (an invoice's `period`), [start, end) as UTC instants."""
    return cycle_start(year, month, anchor_day, zone), cycle_start(*_next(year, month), anchor_day, zone)


def local_days(start: datetime, end: datetime, zone: tzinfo) -> Decimal:
    """How many local days [start, end) covers, each calendar day of the zone counting 1 whatever its length (a
    23- or 25-hour day is one day), a part of a day by the share of that day's seconds it covers."""
    with localcontext(_FRACTION):
        return _day_number(end, zone) - _day_number(start, zone)


def _day_number(at: datetime, zone: tzinfo) -> Decimal:
    """Days since the epoch on the zone's calendar, with the elapsed part of the day as an exact fraction."""
    day = at.astimezone(zone).date()
    midnight = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
    following = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
    elapsed = Decimal((at - midnight) // timedelta(microseconds=1))
    length = Decimal((following - midnight) // timedelta(microseconds=1))
    with localcontext(_FRACTION):
        return Decimal(day.toordinal()) + elapsed / length


_FRACTION = Context(prec=60)  # a day's share: exact enough that proration rounds once, with its line


def _next(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)
