"""One query as ClickHouse's HTTP handler sees it: URL and multipart parameters sorted into
the SQL, its bind parameters, engine settings and the options the transport consumes itself."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from urllib.parse import parse_qsl

from metering_dev.clickhouse_endpoint.errors import (
    BAD_ARGUMENTS,
    INVALID_SESSION_TIMEOUT,
    NOT_IMPLEMENTED,
    ClickHouseError,
)
from metering_dev.clickhouse_endpoint.log import log

DEFAULT_SESSION_TIMEOUT_S = 60
MAX_SESSION_TIMEOUT_S = 3600

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


def parse_url_params(query_string: str) -> list[tuple[str, str]]:
    try:
        return parse_qsl(query_string, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        raise ClickHouseError(BAD_ARGUMENTS, "URL parameters are not valid UTF-8") from exc
