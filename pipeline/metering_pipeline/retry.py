"""Retry with capped exponential backoff, for writes that must eventually succeed (ClickHouse sinks).

Only failures the caller's `transient` rule accepts are retried (ClickHouse writers pass
`warehouse.errors.is_transient`, an e-mail sender `any_error`): anything else is a bug or a permanent
error that no amount of waiting fixes, so it is raised at once and stops the caller instead of
looping while the worker looks healthy. The rule belongs to whoever knows the failures, so this
module depends on none of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from metering_pipeline.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")


def any_error(error: BaseException) -> bool:
    """Every failure is worth another attempt: for actions bounded by `max_attempts` (an e-mail send)."""
    return True


class FailingStreak:
    """Since when an action has been failing without a success in between, and with what: a health check
    tells a worker stuck on its writes from a busy one by it."""

    def __init__(self) -> None:
        self.since: float | None = None  # time.monotonic() of the first failure in a row; None after a success
        self.error: BaseException | None = None  # the latest failure

    def failed(self, error: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
        self.error = error

    def succeeded(self) -> None:
        self.since = None
        self.error = None

    def seconds(self, now: float) -> float:
        """How long it has been failing as of `now` (time.monotonic()); 0 when it is not."""
        return 0.0 if self.since is None else now - self.since


class RetriesExhausted(Exception):
    def __init__(self, what: str, attempts: int, error: Exception) -> None:
        super().__init__(f"{what} failed {attempts} times; last error: {error}")
        self.attempts = attempts
        self.error = error


async def until_success(
    action: Callable[[], Awaitable[T]],
    what: str,
    *,
    transient: Callable[[BaseException], bool],
    first_delay: float = 0.2,
    max_delay: float = 15.0,
    max_attempts: int | None = None,
    streak: FailingStreak | None = None,
) -> T:
    """Keep trying while failures are `transient`: the caller blocks (and so stops consuming) instead of
    dropping or buffering without bound. Any other failure is raised at once, noted with `what`.

    With `max_attempts`, gives up with RetriesExhausted (for side effects that must not block
    the stream forever, such as one e-mail address that keeps bouncing). `streak`, when given,
    records since when the action has been failing (reset by its success).
    """
    delay = first_delay
    attempt = 1
    while True:
        try:
            result = await action()
        except Exception as error:
            if not transient(error):
                error.add_note(f"while trying to {what} (not retried: not a transient error)")
                raise
            if streak is not None:
                streak.failed(error)
            if max_attempts is not None and attempt >= max_attempts:
                raise RetriesExhausted(what, attempt, error) from error
            log.warning("retrying", what=what, attempt=attempt, delay=round(delay, 2), error=str(error)[:300])
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
            attempt += 1
        else:
            if streak is not None:
                streak.succeeded()
            return result
