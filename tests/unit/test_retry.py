"""Only transient failures are retried; anything else stops the writer at once, and a health check sees
how long a writer has been failing."""

from __future__ import annotations

import asyncio
import socket

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError, ProgrammingError, StreamFailureError

from metering_pipeline.retry import FailingStreak, RetriesExhausted, any_error, until_success
from metering_pipeline.warehouse.errors import TRANSIENT_CODES, is_transient
from metering_pipeline.worker.health import failing_writer


def _server_error(code: int, name: str, status: int = 500) -> DatabaseError:
    """As clickhouse-connect raises a ClickHouse error answer (code from the X-ClickHouse-Exception-Code header)."""
    return DatabaseError(
        f"Received ClickHouse exception, code: {code}, server response: Code: {code}. "
        f"DB::Exception: ... ({name}) (for url http://ch:8123)",
        code=code,
        name=name,
    )


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(),
        TimeoutError(),
        TimeoutError(),
        socket.gaierror(-3, "Temporary failure in name resolution"),
        OperationalError(
            "Error HTTPConnectionPool(host='127.0.0.1', port=8123): Max retries exceeded "
            "(Caused by NewConnectionError(...: Connection refused)) executing HTTP request attempt 1"
        ),
        OperationalError("Error HTTPConnectionPool(host='127.0.0.1', port=8123): Read timed out. (read timeout=300)"),
        OperationalError("HTTP driver received HTTP status 503, server response: upstream unavailable"),  # 429/503/504
        DatabaseError(
            "HTTP driver received HTTP status 502, server response: Bad Gateway"
        ),  # a proxy, no ClickHouse code
        _server_error(252, "TOO_MANY_PARTS"),
        _server_error(241, "MEMORY_LIMIT_EXCEEDED"),
        _server_error(202, "TOO_MANY_SIMULTANEOUS_QUERIES", 429),
        _server_error(159, "TIMEOUT_EXCEEDED", 408),
        _server_error(242, "TABLE_IS_READ_ONLY"),
        _server_error(999, "KEEPER_EXCEPTION"),
        OperationalError("Received ClickHouse exception, code: 209 (SOCKET_TIMEOUT)", code=209),  # answered 503
    ],
    ids=repr,
)
def test_connection_failures_timeouts_and_retryable_server_codes_are_transient(error):
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        _server_error(60, "UNKNOWN_TABLE", 404),
        _server_error(16, "NO_SUCH_COLUMN_IN_TABLE"),
        _server_error(62, "SYNTAX_ERROR", 400),
        _server_error(27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED", 400),
        _server_error(516, "AUTHENTICATION_FAILED", 403),
        _server_error(164, "READONLY"),  # a read-only user stays read-only
        DatabaseError("HTTP driver received HTTP status 404, server response: Not Found"),
        StreamFailureError("Code: 60. DB::Exception: Unknown table (UNKNOWN_TABLE)", code=60),  # an error mid-stream
        ProgrammingError("Attempt to execute concurrent queries within the same session."),
        TypeError("cannot write float to ClickHouse"),
        KeyError("metric_key"),
        RuntimeError("a bug"),
    ],
    ids=repr,
)
def test_bugs_and_permanent_server_errors_are_not_transient(error):
    assert not is_transient(error)


def test_the_transient_codes_are_server_states_that_pass_not_schema_or_request_errors():
    assert {159, 202, 209, 210, 241, 242, 252, 999} <= TRANSIENT_CODES
    assert not {16, 27, 60, 62, 81, 164, 516} & TRANSIENT_CODES


class _Flaky:
    """Fails with the given errors in turn, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "written"


def test_a_permanent_error_is_raised_at_once_with_what_was_being_done():
    action = _Flaky(_server_error(60, "UNKNOWN_TABLE", 404))
    with pytest.raises(DatabaseError) as raised:
        asyncio.run(until_success(action, "write usage_records", transient=is_transient, first_delay=0.01))
    assert action.calls == 1
    assert raised.value.code == 60
    assert any("write usage_records" in note for note in raised.value.__notes__)


def test_transient_errors_are_retried_and_the_streak_says_since_when_until_a_success():
    streak = FailingStreak()
    action = _Flaky(ConnectionRefusedError(), OperationalError("Read timed out"))
    observed: list[float | None] = []

    async def scenario() -> str:
        async def watched() -> str:
            observed.append(streak.since)
            return await action()

        return await until_success(
            watched, "write usage_rollups", transient=is_transient, first_delay=0.01, streak=streak
        )

    assert asyncio.run(scenario()) == "written"
    assert action.calls == 3
    assert observed[0] is None and observed[1] is not None and observed[2] == observed[1]  # since the first failure
    assert streak.since is None and streak.error is None  # the success reset it
    assert streak.seconds(123.0) == 0.0


def test_a_transient_error_after_a_permanent_one_is_never_reached():
    action = _Flaky(TypeError("bug"), ConnectionRefusedError())
    with pytest.raises(TypeError):
        asyncio.run(until_success(action, "write threshold_events", transient=is_transient, first_delay=0.01))
    assert action.calls == 1


def test_with_any_error_every_failure_gets_its_attempts_then_gives_up():
    action = _Flaky(RuntimeError("550 mailbox full"), RuntimeError("550 mailbox full"), RuntimeError("550"))
    with pytest.raises(RetriesExhausted) as gave_up:
        asyncio.run(until_success(action, "e-mail", transient=any_error, first_delay=0.01, max_attempts=2))
    assert action.calls == 2 and gave_up.value.attempts == 2


def test_health_names_the_writer_failing_longest_once_past_the_limit():
    healthy, short, long = FailingStreak(), FailingStreak(), FailingStreak()
    short.since, short.error = 95.0, ConnectionRefusedError("refused")
    long.since, long.error = 40.0, OperationalError("Read timed out")
    writers = [
        ("checkpoint writer of partition 0", healthy),
        ("checkpoint writer of partition 3", long),
        ("alert archive", short),
    ]

    assert failing_writer(writers, unhealthy_after=60, now=100.0) is None  # 60 s is not more than 60 s
    assert (
        failing_writer(writers, unhealthy_after=60, now=101.5)
        == "checkpoint writer of partition 3 failing for 62 s: Read timed out"
    )
    assert failing_writer([("alert archive", healthy)], unhealthy_after=1, now=1e9) is None
    assert failing_writer([], unhealthy_after=1, now=1e9) is None
