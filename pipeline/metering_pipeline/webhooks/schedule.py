"""The retry schedule: the delay before each attempt, the first one's included (Standard Webhooks' own: at once,
5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h; then the delivery has failed)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

DEFAULT_SCHEDULE = "0s,5s,5m,30m,2h,5h,10h,10h"
_UNITS = {
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
}
_DELAY = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")


def parse_schedule(text: str) -> tuple[timedelta, ...]:
    """`0s,5s,5m` (units ms, s, m, h; a bare number is seconds) as delays; ValueError naming the bad part."""
    delays = []
    for part in text.split(","):
        match = _DELAY.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"{part.strip()!r} is not a delay: write 500ms, 5s, 5m or 2h")
        delays.append(float(match[1]) * _UNITS[match[2] or "s"])
    return tuple(delays)


def next_attempt_at(delays: tuple[timedelta, ...], attempts_made: int, now: datetime) -> datetime | None:
    """When the attempt after `attempts_made` is due; None once the schedule is spent (the delivery has failed)."""
    if attempts_made >= len(delays):
        return None
    return now + delays[attempts_made]
