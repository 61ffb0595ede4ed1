"""Retry with capped exponential backoff, for writes that must eventually succeed (ClickHouse sinks)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from metering_pipeline.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")


async def until_success(action: Callable[[], Awaitable[T]], what: str, first_delay: float = 0.2, max_delay: float = 15.0) -> T:
    """Keep trying: the caller blocks (and so stops consuming) instead of dropping or buffering without bound."""
    delay = first_delay
    attempt = 1
    while True:
        try:
            return await action()
        except Exception as error:  # noqa: BLE001 - any failure of the remote side is retried
            log.warning("retrying", what=what, attempt=attempt, delay=round(delay, 2), error=str(error)[:300])
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
            attempt += 1
