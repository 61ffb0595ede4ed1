"""What `/ready` says of writers: a worker whose ClickHouse writes keep failing is not ready.

A writer retries transient failures (ClickHouse restarting, a network blip) and the worker
keeps consuming, so for a while that is normal; past `writer_unhealthy_after` seconds `/ready`
answers 503 with the reason, so that a load balancer, a rolling restart or an on-call person
sees it before the backlog grows (consumption pauses at `max_buffered_records`). `/health`
(liveness) stays 200: restarting the worker would not bring ClickHouse back.
"""

from __future__ import annotations

from collections.abc import Iterable

from metering_pipeline.retry import FailingStreak


def failing_writer(writers: Iterable[tuple[str, FailingStreak]], unhealthy_after: float, now: float) -> str | None:
    """The reason of the writer failing longest, when it has been failing more than `unhealthy_after` seconds
    as of `now` (time.monotonic()); None when none has."""
    seconds, name, streak = max(
        ((streak.seconds(now), name, streak) for name, streak in writers),
        key=lambda entry: entry[0],
        default=(0.0, "", None),
    )
    if streak is None or seconds <= unhealthy_after:
        return None
    return f"{name} failing for {seconds:.0f} s: {str(streak.error)[:1000]}"
