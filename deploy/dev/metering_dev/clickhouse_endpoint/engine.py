"""The chdb engine behind one lock: per-request and per-session connection handles, and how
`database` and URL settings are applied to them for one query and undone afterwards."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from chdb import session as chdb_session

from metering_dev.clickhouse_endpoint.errors import (
    BAD_ARGUMENTS,
    SESSION_NOT_FOUND,
    STD_EXCEPTION,
    UNKNOWN_FORMAT,
    ClickHouseError,
)
from metering_dev.clickhouse_endpoint.log import log
from metering_dev.clickhouse_endpoint.query_request import TRANSPORT_SETTINGS, QueryRequest
from metering_dev.clickhouse_endpoint.sql import Statement, analyze

# chdb reads these `fmt` names itself (pandas, pyarrow); ClickHouse has no such formats.
CHDB_PYTHON_FORMATS = frozenset({"dataframe", "arrowtable", "datastore", "debug"})
# Statements that return a result set even when it has no rows.
RESULT_KINDS = frozenset({"SELECT", "WITH", "(", "SHOW", "DESC", "DESCRIBE", "EXPLAIN", "EXISTS", "CHECK", "KILL"})

_SETTING_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ChdbHandle(Protocol):
    """The part of chdb's Session this module uses."""

    def query(self, sql: Any, fmt: str = ..., udf_path: str = ..., params: Any = ...) -> Any: ...
    def send_insert(self, query: str, fmt: str = ...) -> Any: ...
    def close(self) -> None: ...


@dataclass
class QueryOutcome:
    body: bytes
    result_format: str | None
    summary: dict[str, str]


@dataclass
class _HttpSession:
    """A session's handle plus what we know of its state, so restoring it costs no lookups.

    `changed` mirrors the handle's non-default settings; None after a `SET` statement
    (then it is read back from system.settings when next needed).
    """

    handle: ChdbHandle
    timeout_s: int
    changed: dict[str, str] | None
    database: str = "default"
    expires_at: float = 0.0


def _summary(
    *,
    read_rows: int = 0,
    read_bytes: int = 0,
    written_rows: int = 0,
    written_bytes: int = 0,
    result_bytes: int = 0,
    elapsed_s: float = 0.0,
) -> dict[str, str]:
    """X-ClickHouse-Summary from what chdb reports (it does not count result rows)."""
    return {
        "read_rows": str(read_rows),
        "read_bytes": str(read_bytes),
        "written_rows": str(written_rows),
        "written_bytes": str(written_bytes),
        "result_bytes": str(result_bytes),
        "elapsed_ns": str(int(elapsed_s * 1_000_000_000)),
    }


class Engine:
    """The chdb engine behind one lock, with per-request and per-session connection handles."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._path = str(data_dir.resolve())
        self._lock = threading.Lock()
        self._closed = False
        self._sessions: dict[str, _HttpSession] = {}
        # The primary handle keeps the engine up between requests; closing it flushes it.
        self._primary = self._open_handle()
        try:
            self.version = self._scalar("SELECT version()")
            self.timezone = self._scalar("SELECT timezone()")
            names = self._scalar("SELECT name FROM system.settings").split()
            self.setting_names = frozenset(n for n in names if _SETTING_NAME_RE.match(n)) - TRANSPORT_SETTINGS
            # chdb starts every handle with a few non-default settings; a new session starts there.
            self._startup_changed = _changed_settings(self._primary)
        except BaseException:
            self._primary.close()
            raise

    def _scalar(self, sql: str) -> str:
        return _text(_engine_call(self._primary.query, sql, "TabSeparated"))

    def close(self) -> None:
        """Waits for the running query, then closes every handle so the engine shuts down cleanly."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for http_session in self._sessions.values():
                with suppress(Exception):
                    http_session.handle.close()
            self._sessions.clear()
            self._primary.close()

    def execute(self, request: QueryRequest) -> QueryOutcome:
        statement = analyze(request.sql)
        fmt = self._output_format(statement, request)
        with self._lock:
            if self._closed:
                raise ClickHouseError(STD_EXCEPTION, "The server is shutting down")
            self._expire_sessions(time.monotonic())
            with self._handle_for(request) as (handle, http_session):
                if http_session is None:
                    _apply_request_options(handle, request)
                    return self._run(handle, statement, request, fmt)
                with _session_scope(http_session, request, statement):
                    return self._run(handle, statement, request, fmt)

    @staticmethod
    def _output_format(statement: Statement, request: QueryRequest) -> str:
        """FORMAT clause, else default_format, else TabSeparated; chdb honours the clause itself."""
        fmt = statement.output_format or request.default_format or "TabSeparated"
        if fmt.lower() in CHDB_PYTHON_FORMATS:
            raise ClickHouseError(UNKNOWN_FORMAT, f"Unknown format {fmt}")
        return fmt

    # -- handles and sessions

    def _open_handle(self) -> ChdbHandle:
        try:
            handle: ChdbHandle = chdb_session.Session(self._path)
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from exc
        return handle

    def _expire_sessions(self, now: float) -> None:
        for session_id, http_session in list(self._sessions.items()):
            if http_session.expires_at <= now:
                log.debug("session expired session_id=%s", session_id)
                with suppress(Exception):
                    http_session.handle.close()
                del self._sessions[session_id]

    @contextmanager
    def _handle_for(self, request: QueryRequest) -> Iterator[tuple[ChdbHandle, _HttpSession | None]]:
        """The session's handle, or a fresh handle for this request only.

        `readonly` cannot be switched off again once set, so a request that sets it runs on
        a handle of its own even inside a session.
        """
        if request.session_id is None or "readonly" in request.settings:
            handle = self._open_handle()
            try:
                yield handle, None
            finally:
                handle.close()
            return
        http_session = self._sessions.get(request.session_id)
        if http_session is None:
            if request.session_check:
                raise ClickHouseError(SESSION_NOT_FOUND, f"Session {request.session_id} not found")
            http_session = _HttpSession(self._open_handle(), request.session_timeout_s, dict(self._startup_changed))
            self._sessions[request.session_id] = http_session
        http_session.timeout_s = request.session_timeout_s
        try:
            yield http_session.handle, http_session
        finally:
            http_session.expires_at = time.monotonic() + http_session.timeout_s

    # -- running

    def _run(self, handle: ChdbHandle, statement: Statement, request: QueryRequest, fmt: str) -> QueryOutcome:
        if statement.carries_data:
            return self._insert_data(handle, statement, request.sql)
        result = _engine_call(handle.query, request.sql, fmt, params=request.bind_params)
        body = result.bytes() or b""
        produces_result = statement.kind in RESULT_KINDS or bool(body)
        return QueryOutcome(
            body=body,
            result_format=(statement.output_format or fmt) if produces_result else None,
            summary=_summary(
                read_rows=result.rows_read(),
                read_bytes=result.bytes_read(),
                written_rows=result.rows_written(),
                written_bytes=result.bytes_written(),
                result_bytes=len(body),
                elapsed_s=result.elapsed(),
            ),
        )

    @staticmethod
    def _insert_data(handle: ChdbHandle, statement: Statement, sql: bytes) -> QueryOutcome:
        """Stream the inline data into chdb's insert API: the engine parses the format itself."""
        assert statement.insert_format is not None
        try:
            head = statement.insert_head.decode()
        except UnicodeDecodeError as exc:
            raise ClickHouseError(BAD_ARGUMENTS, "The INSERT statement is not valid UTF-8") from exc
        inserter = _engine_call(handle.send_insert, head, statement.insert_format)
        try:
            data = sql[statement.data_offset :]
            if data:
                inserter.append(data)
            result = inserter.finish()
        except Exception as exc:
            with suppress(Exception):
                inserter.cancel()
            raise ClickHouseError.from_engine(exc) from exc
        return QueryOutcome(
            body=b"",
            result_format=None,
            summary=_summary(
                read_rows=result.rows_written,
                read_bytes=len(sql) - statement.data_offset,
                written_rows=result.rows_written,
                written_bytes=result.bytes_written,
                elapsed_s=result.elapsed,
            ),
        )


def _engine_call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except Exception as exc:
        raise ClickHouseError.from_engine(exc) from exc


def _use_database(handle: ChdbHandle, database: str) -> None:
    _engine_call(handle.query, "USE {db:Identifier}", "TabSeparated", params={"db": database})


def _text(result: Any) -> str:
    """A one-value TabSeparated chdb result as text."""
    text: str = result.bytes().decode().strip()
    return text


def _current_database(handle: ChdbHandle) -> str:
    return _text(_engine_call(handle.query, "SELECT currentDatabase()", "TabSeparated"))


def _changed_settings(handle: ChdbHandle) -> dict[str, str]:
    raw = _engine_call(handle.query, "SELECT name, value FROM system.settings WHERE changed", "JSONEachRow").bytes()
    rows = (json.loads(line) for line in raw.splitlines() if line.strip())
    return {row["name"]: row["value"] for row in rows}


def _apply_request_options(handle: ChdbHandle, request: QueryRequest) -> None:
    """`database` and URL settings on a handle that lives for this request only."""
    if request.database:
        _use_database(handle, request.database)
    if request.settings:
        _apply_settings(handle, request.settings)


@contextmanager
def _session_scope(http_session: _HttpSession, request: QueryRequest, statement: Statement) -> Iterator[None]:
    """Apply `database` and URL settings to a session's handle for one query, then undo them.

    As on a server, a `USE` or `SET` statement run in a session changes the session itself.
    """
    handle = http_session.handle
    switch_database = bool(request.database) and request.database != http_session.database
    if request.settings and http_session.changed is None:
        http_session.changed = _changed_settings(handle)
    try:
        if switch_database:
            _use_database(handle, request.database or "")
        if request.settings:
            _apply_settings(handle, request.settings)
        yield
    finally:
        _end_session_scope(http_session, request, statement, switch_database)


def _end_session_scope(http_session: _HttpSession, request: QueryRequest, statement: Statement, switched: bool) -> None:
    """Best effort: a failed undo is logged, never turned into the query's error."""
    handle = http_session.handle
    try:
        if statement.kind == "USE":
            http_session.database = _current_database(handle)
        elif switched:
            _use_database(handle, http_session.database)
    except ClickHouseError as exc:  # e.g. the query dropped the session's database
        log.warning("could not restore session database code=%s", exc.code)
        with suppress(ClickHouseError):
            http_session.database = _current_database(handle)
    if statement.kind == "SET":
        http_session.changed = None
    elif request.settings and http_session.changed is not None:
        try:
            _restore_settings(handle, request.settings, http_session.changed)
        except ClickHouseError as exc:
            log.warning("could not restore session settings names=%s code=%s", ",".join(request.settings), exc.code)
            http_session.changed = None


def _check_setting_names(names: Sequence[str]) -> None:
    """Names come from system.settings; still, only plain identifiers get into SQL text."""
    for name in names:
        if not _SETTING_NAME_RE.match(name):
            raise ClickHouseError(BAD_ARGUMENTS, f"Invalid setting name {name!r}")


def _set_statement(names: Sequence[str], prefix: str) -> str:
    """`SET` over names read from system.settings; the values travel as query parameters."""
    _check_setting_names(names)
    return "SET " + ", ".join(f"`{name}` = {{{prefix}{i}:String}}" for i, name in enumerate(names))


def _apply_settings(handle: ChdbHandle, settings: Mapping[str, str]) -> None:
    names = list(settings)
    params = {f"s{i}": settings[name] for i, name in enumerate(names)}
    _engine_call(handle.query, _set_statement(names, "s"), "TabSeparated", params=params)


def _restore_settings(handle: ChdbHandle, applied: Mapping[str, str], changed: Mapping[str, str]) -> None:
    """Put a session's settings back: its own values where it had any, else the defaults."""
    to_value = [name for name in applied if name in changed]
    to_default = [name for name in applied if name not in changed]
    if to_value:
        params = {f"s{i}": changed[name] for i, name in enumerate(to_value)}
        _engine_call(handle.query, _set_statement(to_value, "s"), "TabSeparated", params=params)
    if to_default:
        _check_setting_names(to_default)
        _engine_call(handle.query, "SET " + ", ".join(f"`{name}` = DEFAULT" for name in to_default), "TabSeparated")
