"""ClickHouse's HTTP interface in front of the embedded ClickHouse engine (chdb).

No ClickHouse server can be installed on the dev and CI machines, but chdb embeds the real
ClickHouse 26.x engine. This process serves that engine on ClickHouse's HTTP protocol so
clickhouse-connect, curl and Grafana talk to it exactly as they would to a server: the
SQL, the formats and the error codes are ClickHouse's own; only the HTTP layer is ours.

Each request runs on its own chdb connection handle, so `database`, URL settings and
`SET`/`USE` stay scoped to the request as on a server. A request with `session_id` gets
a handle that lives as long as the session (temporary tables, `SET`), and its per-request
URL settings are undone afterwards. chdb hosts one engine per process and its calls are
serialized with one lock; the HTTP layer is threaded.

    python -m metering_pipeline.stack.clickhouse_endpoint --port 8123 --data-dir DIR
        [--user U --password P] [--tls-cert CHAIN.pem --tls-key KEY.pem]   # HTTPS, like ClickHouse's https_port
"""

from __future__ import annotations

import argparse
import base64
import binascii
import gzip
import hmac
import json
import logging
import re
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import lz4.frame
import zstandard
from chdb import session as chdb_session

log = logging.getLogger("metering_pipeline.stack.clickhouse_endpoint")

KEEP_ALIVE_TIMEOUT_S = 60
TLS_HANDSHAKE_TIMEOUT_S = 10
RESPONSE_CHUNK_BYTES = 1 << 20
DEFAULT_SESSION_TIMEOUT_S = 60
MAX_SESSION_TIMEOUT_S = 3600
HTTP_COMPRESSION_LEVEL = 3

# fmt: off
# URL parameters the HTTP handler consumes itself; they are never engine settings.
RESERVED_PARAMS = frozenset(
    {
        "query", "database", "default_format", "query_id", "session_id", "session_timeout",
        "session_check", "close_session", "compress", "decompress", "user", "password",
        "quota_key", "buffer_size", "wait_end_of_query", "client_protocol_version", "role",
        "stacktrace", "http_response_headers",
    }
)
# Names that are in system.settings but only steer the HTTP transport.
TRANSPORT_SETTINGS = frozenset(
    {
        "database", "default_format", "enable_http_compression", "send_progress_in_http_headers",
        "http_headers_progress_interval_ms", "cancel_http_readonly_queries_on_client_close",
    }
)
# fmt: on
# chdb reads these `fmt` names itself (pandas, pyarrow); ClickHouse has no such formats.
CHDB_PYTHON_FORMATS = frozenset({"dataframe", "arrowtable", "datastore", "debug"})
# Statements that return a result set even when it has no rows.
RESULT_KINDS = frozenset({"SELECT", "WITH", "(", "SHOW", "DESC", "DESCRIBE", "EXPLAIN", "EXISTS", "CHECK", "KILL"})

# ClickHouse error codes this module raises itself.
SYNTAX_ERROR = 62
BAD_ARGUMENTS = 36
NOT_IMPLEMENTED = 48
UNKNOWN_FORMAT = 73
CANNOT_DECOMPRESS = 271
SESSION_NOT_FOUND = 372
INVALID_SESSION_TIMEOUT = 374
AUTHENTICATION_FAILED = 516
STD_EXCEPTION = 1001
ERROR_NAMES = {
    SYNTAX_ERROR: "SYNTAX_ERROR",
    BAD_ARGUMENTS: "BAD_ARGUMENTS",
    NOT_IMPLEMENTED: "NOT_IMPLEMENTED",
    UNKNOWN_FORMAT: "UNKNOWN_FORMAT",
    CANNOT_DECOMPRESS: "CANNOT_DECOMPRESS",
    SESSION_NOT_FOUND: "SESSION_NOT_FOUND",
    INVALID_SESSION_TIMEOUT: "INVALID_SESSION_TIMEOUT",
    AUTHENTICATION_FAILED: "AUTHENTICATION_FAILED",
    STD_EXCEPTION: "STD_EXCEPTION",
}

# fmt: off
# ClickHouse's src/Server/HTTP/exceptionCodeToHTTPStatus.cpp, by numeric code.
_HTTP_STATUS_BY_CODES: tuple[tuple[frozenset[int], int], ...] = (
    (frozenset({194}), 401),
    (frozenset({192, 193, 497, 512, 516}), 403),
    (
        frozenset({6, 8, 15, 25, 26, 27, 36, 37, 38, 41, 44, 53, 62, 72, 117, 123, 167, 168, 223, 321, 376, 427,
                   441, 675, 676}),
        400,
    ),
    (frozenset({46, 47, 50, 56, 60, 63, 73, 78, 81, 115, 152, 336, 511}), 404),
    (frozenset({229}), 413),
    (frozenset({48}), 501),
    (frozenset({76, 209, 439}), 503),
    (frozenset({381}), 411),
    (frozenset({159}), 408),
    (frozenset({779}), 415),
)
# fmt: on

_CODE_RE = re.compile(r"Code: (\d+)\.")
_VERSION_SUFFIX_RE = re.compile(r"\(version [^)]*\)\s*$")
_SETTING_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---------------------------------------------------------------------------- errors


class ClickHouseError(Exception):
    """An error answered the way ClickHouse answers it: code, message, HTTP status."""

    def __init__(self, code: int, message: str, *, engine_text: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.engine_text = engine_text

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """chdb raises RuntimeError/ChdbError whose text holds ClickHouse's own `Code: N. ...`."""
        text = str(exc)
        start = text.find("Code: ")
        match = _CODE_RE.search(text, start) if start >= 0 else None
        if match is None:
            return cls(STD_EXCEPTION, text.strip() or type(exc).__name__)
        return cls(int(match.group(1)), text[start:].strip(), engine_text=True)

    @property
    def http_status(self) -> int:
        for codes, status in _HTTP_STATUS_BY_CODES:
            if self.code in codes:
                return status
        return 500

    def body(self, version: str) -> bytes:
        """`Code: N. DB::Exception: text. (NAME) (version X)`, as the server prints it."""
        if self.engine_text:
            text = self.message
        else:
            name = ERROR_NAMES.get(self.code, "UNKNOWN_EXCEPTION")
            text = f"Code: {self.code}. DB::Exception: {self.message.rstrip('.')}. ({name})"
        if not _VERSION_SUFFIX_RE.search(text):
            text = f"{text} (version {version})"
        return f"{text}\n".encode()


# ------------------------------------------------------------------- SQL scanning


_TOKEN_RE = re.compile(
    rb"""
      (?P<ws>\s++)
    | (?P<line_comment>(?:--|\#)[^\n]*+)
    | (?P<block_comment>/\*)
    | (?P<string>'(?:[^'\\]|\\.|'')*+(?:'|\Z))
    | (?P<quoted>"(?:[^"\\]|\\.|"")*+(?:"|\Z)|`(?:[^`\\]|\\.|``)*+(?:`|\Z))
    | (?P<heredoc>\$[A-Za-z0-9_]*\$)
    | (?P<word>[A-Za-z_][A-Za-z0-9_$]*+)
    | (?P<number>[0-9][0-9A-Za-z_.]*+)
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True)
class Token:
    kind: str
    text: bytes
    start: int
    end: int
    depth: int

    def is_word(self, *words: bytes) -> bool:
        return self.kind == "word" and self.text.upper() in words


def _comment_end(sql: bytes, pos: int) -> int:
    """End of a (nestable, as in ClickHouse) block comment opening at `pos`."""
    depth, i = 0, pos
    while i < len(sql):
        if sql.startswith(b"/*", i):
            depth, i = depth + 1, i + 2
        elif sql.startswith(b"*/", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(sql)


def _heredoc_end(sql: bytes, tag_start: int, tag_end: int) -> int:
    closing = sql.find(sql[tag_start:tag_end], tag_end)
    return len(sql) if closing < 0 else closing + (tag_end - tag_start)


def tokens(sql: bytes) -> Iterator[Token]:
    """Lex just enough SQL to find clause keywords: skips comments, literals, quoted names."""
    pos, depth = 0, 0
    while pos < len(sql):
        match = _TOKEN_RE.match(sql, pos)
        assert match is not None  # the last alternative matches any byte
        kind, end = match.lastgroup or "punct", match.end()
        if kind == "block_comment":
            end = _comment_end(sql, pos)
        elif kind == "heredoc":
            end, kind = _heredoc_end(sql, pos, end), "string"
        if kind not in ("ws", "line_comment", "block_comment"):
            text = sql[pos:end]
            if kind == "punct" and text in (b"(", b"[", b"{"):
                yield Token(kind, text, pos, end, depth)
                depth += 1
            else:
                if kind == "punct" and text in (b")", b"]", b"}"):
                    depth = max(0, depth - 1)
                yield Token(kind, text, pos, end, depth)
        pos = end


@dataclass(frozen=True)
class Statement:
    """What the endpoint must know about a query before handing it to the engine."""

    kind: str
    output_format: str | None = None
    insert_format: str | None = None
    insert_head: bytes = b""
    data_offset: int = 0

    @property
    def carries_data(self) -> bool:
        return self.insert_format is not None


def _data_start(sql: bytes, pos: int) -> int:
    """Inline INSERT data starts after the first newline, else after the blanks (ParserInsertQuery)."""
    while pos < len(sql) and sql[pos] in b" \t\f":
        pos += 1
    if sql.startswith(b"\r", pos):
        pos += 1
    if sql.startswith(b"\n", pos):
        pos += 1
    return pos


def _analyze_insert(sql: bytes, stream: Iterator[Token]) -> Statement:
    """Split `INSERT ... FORMAT fmt <data>` into head, format and data; other inserts run as SQL."""
    previous = b"INSERT"
    for token in stream:
        if token.depth == 0 and token.is_word(b"VALUES", b"SELECT", b"WITH"):
            return Statement("INSERT")
        if token.depth == 0 and token.is_word(b"FORMAT") and previous not in (b"INTO", b"TABLE", b"FUNCTION", b"."):
            name = next(stream, None)
            if name is None or name.kind != "word":
                return Statement("INSERT")  # the engine reports the syntax error
            return Statement(
                "INSERT",
                insert_format=name.text.decode(),
                insert_head=sql[: token.start],
                data_offset=_data_start(sql, name.end),
            )
        previous = token.text.upper()
    return Statement("INSERT")


def _trailing_format(top_level: Sequence[Token]) -> str | None:
    """The `FORMAT name` clause, which only `SETTINGS` may follow."""
    for i in range(len(top_level) - 2, -1, -1):
        keyword, name = top_level[i], top_level[i + 1]
        if keyword.is_word(b"FORMAT") and name.kind == "word":
            rest = top_level[i + 2 :]
            if not rest or rest[0].is_word(b"SETTINGS"):
                return name.text.decode()
    return None


def analyze(sql: bytes) -> Statement:
    """Classify a query, find its FORMAT clause and reject multi-statements like the server."""
    stream = tokens(sql)
    first = next(stream, None)
    if first is None:
        raise ClickHouseError(SYNTAX_ERROR, "Empty query")
    kind = first.text.upper().decode(errors="replace") if first.kind == "word" else first.text.decode(errors="replace")
    if kind == "INSERT":
        return _analyze_insert(sql, stream)
    top_level: list[Token] = []
    for token in stream:
        if token.depth != 0:
            continue
        if token.text == b";":
            if any(t.text != b";" for t in stream):
                raise ClickHouseError(SYNTAX_ERROR, "Multi-statements are not allowed")
            break
        top_level.append(token)
    return Statement(kind, output_format=_trailing_format(top_level))


# ----------------------------------------------------------------- compression


def _decode_frames(data: bytes, new_decoder: Callable[[], Any]) -> bytes:
    """Clients compress each block as its own frame; decode every concatenated frame."""
    out: list[bytes] = []
    rest = data
    while rest:
        decoder = new_decoder()
        out.append(decoder.decompress(rest))
        if not decoder.eof:
            raise ClickHouseError(CANNOT_DECOMPRESS, "Truncated compressed request body")
        rest = decoder.unused_data
    return b"".join(out)


_REQUEST_DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.decompress,
    "x-gzip": gzip.decompress,
    "deflate": lambda data: _decode_frames(data, zlib.decompressobj),
    "lz4": lambda data: _decode_frames(data, lz4.frame.LZ4FrameDecompressor),
    "zstd": lambda data: _decode_frames(data, lambda: zstandard.ZstdDecompressor().decompressobj()),
}
_RESPONSE_ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "lz4": lz4.frame.compress,
    "zstd": lambda data: zstandard.ZstdCompressor(level=HTTP_COMPRESSION_LEVEL).compress(data),
    "gzip": lambda data: gzip.compress(data, compresslevel=HTTP_COMPRESSION_LEVEL),
    "deflate": lambda data: zlib.compress(data, HTTP_COMPRESSION_LEVEL),
}


def decode_request_body(body: bytes, content_encoding: str | None) -> bytes:
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    decoder = _REQUEST_DECODERS.get(encoding)
    if decoder is None:
        raise ClickHouseError(
            NOT_IMPLEMENTED,
            f"Content-Encoding '{encoding}' is not supported by this endpoint; use gzip, deflate, lz4 or zstd",
        )
    try:
        return decoder(body)
    except ClickHouseError:
        raise
    except Exception as exc:  # each codec raises its own error type
        raise ClickHouseError(CANNOT_DECOMPRESS, f"Cannot decompress {encoding} request body: {exc}") from exc


def choose_response_encoding(accept_encoding: str | None) -> str | None:
    """The first encoding the client lists that we can produce (q=0 means refused)."""
    for item in (accept_encoding or "").split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if name in _RESPONSE_ENCODERS and params.replace(" ", "") not in ("q=0", "q=0.0"):
            return name
    return None


def encode_response_body(body: bytes, encoding: str) -> bytes:
    return _RESPONSE_ENCODERS[encoding](body)


# -------------------------------------------------------------------- requests


@dataclass
class QueryRequest:
    """One query as ClickHouse's HTTP handler sees it, transport details already stripped."""

    sql: bytes
    bind_params: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
    database: str | None = None
    default_format: str | None = None
    query_id: str = ""
    session_id: str | None = None
    session_timeout_s: int = DEFAULT_SESSION_TIMEOUT_S
    session_check: bool = False
    compress_response: bool = False


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _session_timeout(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_SESSION_TIMEOUT_S
    try:
        timeout = int(raw)
    except ValueError as exc:
        raise ClickHouseError(INVALID_SESSION_TIMEOUT, f"Invalid session timeout: '{raw}'") from exc
    if timeout < 0 or timeout > MAX_SESSION_TIMEOUT_S:
        raise ClickHouseError(
            INVALID_SESSION_TIMEOUT, f"Session timeout {timeout} is out of range 0..{MAX_SESSION_TIMEOUT_S}"
        )
    return timeout


def build_query_request(params: Sequence[tuple[str, str]], body: bytes, setting_names: frozenset[str]) -> QueryRequest:
    """ClickHouse semantics: URL `query` + newline + body is the query; the rest are options."""
    last: dict[str, str] = {}
    bind_params: dict[str, str] = {}
    settings: dict[str, str] = {}
    for name, value in params:
        if name.startswith("param_"):
            bind_params[name[len("param_") :]] = value
        elif name in RESERVED_PARAMS or name in TRANSPORT_SETTINGS:
            last[name] = value
        elif name in setting_names:
            settings[name] = value
        else:
            log.debug("ignoring unknown parameter name=%s", name)
    if _truthy(last.get("compress")) or _truthy(last.get("decompress")):
        raise ClickHouseError(NOT_IMPLEMENTED, "ClickHouse block compression (compress/decompress=1) is not supported")
    url_query = last.get("query", "").encode()
    sql = url_query + b"\n" + body if url_query and body else url_query or body
    return QueryRequest(
        sql=sql,
        bind_params=bind_params,
        settings=settings,
        database=last.get("database") or None,
        default_format=last.get("default_format") or None,
        query_id=last.get("query_id") or str(uuid.uuid4()),
        session_id=last.get("session_id") or None,
        session_timeout_s=_session_timeout(last.get("session_timeout")),
        session_check=_truthy(last.get("session_check")),
        compress_response=_truthy(last.get("enable_http_compression")),
    )


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, str]]:
    """Form fields (`query`, `param_x`, settings) of a multipart/form-data request."""
    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise ClickHouseError(BAD_ARGUMENTS, "Malformed multipart/form-data body")
    fields: list[tuple[str, str]] = []
    for part in message.iter_parts():
        if part.get_filename() is not None:
            raise ClickHouseError(NOT_IMPLEMENTED, "External data (multipart file tables) is not supported")
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str):
            fields.append((name, payload.decode() if isinstance(payload, bytes) else ""))
    return fields


# ------------------------------------------------------------------------ auth


@dataclass(frozen=True)
class Authenticator:
    """One configured user, checked the way ClickHouse reads HTTP credentials."""

    user: str | None = None
    password: str | None = None

    def check(self, headers: Mapping[str, str], params: Mapping[str, str]) -> str:
        """The authenticated user name; raises AUTHENTICATION_FAILED like the server.

        `headers` has lower-cased names.
        """
        user, password = _request_credentials(headers, params)
        if self.user is None:
            return user  # no --user: anyone is the password-less default user
        user_ok = hmac.compare_digest(user.encode(), self.user.encode())
        password_ok = hmac.compare_digest(password.encode(), (self.password or "").encode())
        if not (user_ok and password_ok):
            raise ClickHouseError(
                AUTHENTICATION_FAILED,
                f"{user}: Authentication failed: password is incorrect, or there is no user with such name",
            )
        return user


_MIXED_AUTH = "Invalid authentication: it is not allowed to use {} and another authentication method simultaneously"


def _request_credentials(headers: Mapping[str, str], params: Mapping[str, str]) -> tuple[str, str]:
    """X-ClickHouse-User/Key headers, Basic auth or user/password params; mixing them is an error."""
    header_user = headers.get("x-clickhouse-user", "")
    header_key = headers.get("x-clickhouse-key", "")
    authorization = headers.get("authorization", "")
    in_params = "user" in params or "password" in params
    if header_user or header_key:
        if authorization or in_params:
            raise ClickHouseError(AUTHENTICATION_FAILED, _MIXED_AUTH.format("X-ClickHouse HTTP headers"))
        return header_user, header_key
    if authorization:
        if in_params:
            raise ClickHouseError(AUTHENTICATION_FAILED, _MIXED_AUTH.format("Authorization HTTP header"))
        return _basic_credentials(authorization)
    return params.get("user") or "default", params.get("password", "")


def _basic_credentials(authorization: str) -> tuple[str, str]:
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        raise ClickHouseError(
            AUTHENTICATION_FAILED, f"Invalid authentication: '{scheme}' HTTP Authorization scheme is not supported"
        )
    try:
        user, _, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ClickHouseError(AUTHENTICATION_FAILED, "Invalid authentication: malformed Basic credentials") from exc
    if not user:
        raise ClickHouseError(AUTHENTICATION_FAILED, "Got an empty user name from Authorization HTTP header")
    return user, password


# ---------------------------------------------------------------------- engine


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


# ------------------------------------------------------------------------ HTTP


_CONTENT_TYPES: tuple[tuple[str, str], ...] = (
    ("tabseparated", "text/tab-separated-values; charset=UTF-8"),
    ("tsv", "text/tab-separated-values; charset=UTF-8"),
    ("csvwithnames", "text/csv; charset=UTF-8; header=present"),
    ("csv", "text/csv; charset=UTF-8; header=absent"),
    ("json", "application/json; charset=UTF-8"),
    ("xml", "application/xml; charset=UTF-8"),
    ("pretty", "text/plain; charset=UTF-8"),
    ("values", "text/plain; charset=UTF-8"),
    ("markdown", "text/markdown; charset=UTF-8"),
)
_TEXT_PLAIN = "text/plain; charset=UTF-8"


def content_type_for(fmt: str | None) -> str:
    if fmt is None:
        return _TEXT_PLAIN
    lowered = fmt.lower()
    for prefix, content_type in _CONTENT_TYPES:
        if lowered.startswith(prefix):
            return content_type
    return "application/octet-stream"  # Native, RowBinary*, Parquet, Arrow, ORC, Avro, ...


def _parse_url_params(query_string: str) -> list[tuple[str, str]]:
    try:
        return parse_qsl(query_string, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        raise ClickHouseError(BAD_ARGUMENTS, "URL parameters are not valid UTF-8") from exc


class ClickHouseHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], engine: Engine, authenticator: Authenticator,
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(address, ClickHouseRequestHandler)
        self.engine = engine
        self.authenticator = authenticator
        self.tls = tls
        self.display_name = socket.gethostname()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """With TLS, the handshake runs here, in the connection's own thread, so a slow or
        failing client never holds up accepting the others."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
        try:
            tls_request = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # e.g. a client that does not trust our CA
            log.info("tls handshake failed client=%s error=%s", client_address[0], exc)
            return
        try:
            super().finish_request(tls_request, client_address)
        finally:
            self.shutdown_request(tls_request)

    def server_bind(self) -> None:
        """HTTPServer.server_bind resolves the FQDN, which can stall without DNS; we never need it."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class ClickHouseRequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler; every response carries Content-Length."""

    protocol_version = "HTTP/1.1"
    server_version = "metering-clickhouse-endpoint"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    timeout = KEEP_ALIVE_TIMEOUT_S
    server: ClickHouseHTTPServer

    def do_GET(self) -> None:  # http.server's naming
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def version_string(self) -> str:
        return self.server_version

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Silenced: `_handle` logs one line per request without the query string."""

    def log_message(self, format: str, *args: Any) -> None:  # the base class names it `format`
        log.debug("http " + format, *args)

    # -- request flow

    def _handle(self) -> None:
        started = time.monotonic()
        url = urlsplit(self.path)
        query_id = ""
        status = 200
        try:
            raw_body = self._read_body()
            params = _parse_url_params(url.query)
            if self._is_health_check(url.path, params, raw_body):
                self._send(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
                return
            request = self._prepare(params, raw_body)
            query_id = request.query_id
            self._send_outcome(request, self.server.engine.execute(request))
        except ClickHouseError as exc:
            status = exc.http_status
            self._send_error(exc, query_id)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            status = 499
        except Exception as exc:  # answer like the server instead of dropping the socket
            log.exception("unexpected error serving request")
            status = 500
            self._send_error(ClickHouseError(STD_EXCEPTION, f"{type(exc).__name__}: {exc}"), query_id)
        finally:
            log.debug(
                "request method=%s path=%s status=%s query_id=%s elapsed_ms=%.1f",
                self.command,
                url.path,
                status,
                query_id,
                (time.monotonic() - started) * 1000,
            )

    def _is_health_check(self, path: str, params: Sequence[tuple[str, str]], body: bytes) -> bool:
        if path in ("/ping", "/replicas_status"):
            return True
        return self.command == "GET" and path == "/" and not body and all(name != "query" for name, _ in params)

    def _prepare(self, params: list[tuple[str, str]], raw_body: bytes) -> QueryRequest:
        """Authenticate first (before any decompression work), then assemble the query."""
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.server.authenticator.check(headers, dict(params))
        body = decode_request_body(raw_body, headers.get("content-encoding"))
        content_type = headers.get("content-type", "")
        if content_type.lower().startswith("multipart/form-data"):
            params = params + parse_multipart(content_type, body)
            body = b""
        return build_query_request(params, body, self.server.engine.setting_names)

    # -- body

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        try:
            size = int(length)
        except ValueError as exc:
            self.close_connection = True
            raise ClickHouseError(BAD_ARGUMENTS, f"Invalid Content-Length: {length}") from exc
        body = self.rfile.read(size)
        if len(body) != size:
            self.close_connection = True
            raise ConnectionError("client closed the connection before sending the whole body")
        return body

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                self.close_connection = True
                raise ClickHouseError(BAD_ARGUMENTS, "Malformed chunked request body") from exc
            if size == 0:
                break
            chunk = self.rfile.read(size)
            if len(chunk) != size:
                self.close_connection = True
                raise ConnectionError("client closed the connection inside a chunk")
            parts.append(chunk)
            self.rfile.readline()  # the CRLF after each chunk
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(parts)

    # -- responses

    def _common_headers(self, query_id: str) -> dict[str, str]:
        engine = self.server.engine
        return {
            "X-ClickHouse-Query-Id": query_id or str(uuid.uuid4()),
            "X-ClickHouse-Server-Display-Name": self.server.display_name,
            "X-ClickHouse-Timezone": engine.timezone,
            "Keep-Alive": f"timeout={KEEP_ALIVE_TIMEOUT_S}",
        }

    def _send_outcome(self, request: QueryRequest, outcome: QueryOutcome) -> None:
        headers = self._common_headers(request.query_id)
        headers["Content-Type"] = content_type_for(outcome.result_format)
        if outcome.result_format is not None:
            headers["X-ClickHouse-Format"] = outcome.result_format
        if request.settings.get("session_timezone"):
            headers["X-ClickHouse-Timezone"] = request.settings["session_timezone"]
        headers["X-ClickHouse-Summary"] = json.dumps(outcome.summary, separators=(",", ":"))
        body = outcome.body
        encoding = choose_response_encoding(self.headers.get("Accept-Encoding")) if request.compress_response else None
        if encoding is not None and body:
            body = encode_response_body(body, encoding)
            headers["Content-Encoding"] = encoding
        self._send(200, body, headers)

    def _send_error(self, error: ClickHouseError, query_id: str) -> None:
        headers = self._common_headers(query_id)
        headers["Content-Type"] = _TEXT_PLAIN
        headers["X-ClickHouse-Exception-Code"] = str(error.code)
        with suppress(ConnectionError, TimeoutError):
            self._send(error.http_status, error.body(self.server.engine.version), headers)

    def _send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        view = memoryview(body)
        for offset in range(0, len(view), RESPONSE_CHUNK_BYTES):
            self.wfile.write(view[offset : offset + RESPONSE_CHUNK_BYTES])


# ------------------------------------------------------------------- lifecycle


def server_tls_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """TLS 1.2+ with the given PEM certificate chain (leaf first) and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


def serve(host: str, port: int, data_dir: str | Path, user: str | None = None, password: str | None = None,
          tls_cert: str | Path | None = None, tls_key: str | Path | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then close the engine so its data is flushed; HTTPS when given a certificate."""
    tls = server_tls_context(tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
    engine = Engine(Path(data_dir))
    try:
        server = ClickHouseHTTPServer((host, port), engine, Authenticator(user, password), tls)
    except BaseException:
        engine.close()
        raise
    restore_signals = _install_stop_signals(server)
    bound_host, bound_port = server.server_address[:2]
    log.info(
        "listening host=%s port=%s data_dir=%s engine_version=%s auth=%s tls=%s",
        bound_host,
        bound_port,
        data_dir,
        engine.version,
        "on" if user is not None else "off",
        "on" if tls is not None else "off",
    )
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        restore_signals()
        server.server_close()
        engine.close()
        log.info("stopped port=%s", bound_port)


def _install_stop_signals(server: ThreadingHTTPServer) -> Callable[[], None]:
    """SIGTERM/SIGINT stop serve_forever from another thread (shutdown() blocks its caller)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("stopping signal=%s", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, name="endpoint-shutdown", daemon=True).start()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m metering_pipeline.stack.clickhouse_endpoint",
        description="Serve the embedded ClickHouse engine (chdb) on ClickHouse's HTTP interface.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--data-dir", type=Path, required=True, help="engine data; persists across restarts")
    parser.add_argument("--user", help="require this user (default: accept anyone, like a password-less default)")
    parser.add_argument("--password", help="password of --user")
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate chain (leaf first)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if args.password is not None and args.user is None:
        parser.error("--password needs --user")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    serve(args.host, args.port, args.data_dir, user=args.user, password=args.password,
          tls_cert=args.tls_cert, tls_key=args.tls_key)


if __name__ == "__main__":
    main()
