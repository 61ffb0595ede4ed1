"""Retry with capped exponential backoff, for writes that must eventually succeed (ClickHouse sinks)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from metering_pipeline.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")


class RetriesExhausted(Exception):
    def __init__(self, what: str, attempts: int, error: Exception) -> None:
        super().__init__(f"{what} failed {attempts} times; last error: {error}")
        self.attempts = attempts
        self.error = error


async def until_success(action: Callable[[], Awaitable[T]], what: str, first_delay: float = 0.2, max_delay: float = 15.0,
                        max_attempts: int | None = None) -> T:
    """Keep trying: the caller blocks (and so stops consuming) instead of dropping or buffering without bound.

    With `max_attempts`, gives up with RetriesExhausted (for side effects that must not block
    the stream forever, such as one e-mail address that keeps bouncing).
    """
    delay = first_delay
    attempt = 1
    while True:
        try:
            return await action()
        except Exception as error:  # noqa: BLE001 - any failure of the remote side is retried
            if max_attempts is not None and attempt >= max_attempts:
                raise RetriesExhausted(what, attempt, error) from error
            log.warning("retrying", what=what, attempt=attempt, delay=round(delay, 2), error=str(error)[:300])
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
            attempt += 1
