"""The threaded HTTP/1.1 server and its request handler: ClickHouse's endpoints, headers and content types."""

from __future__ import annotations

import json
import socket
import socketserver
import ssl
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from metering_dev.clickhouse_endpoint.auth import Authenticator
from metering_dev.clickhouse_endpoint.compression import (
    choose_response_encoding,
    decode_request_body,
    encode_response_body,
)
from metering_dev.clickhouse_endpoint.engine import Engine, QueryOutcome
from metering_dev.clickhouse_endpoint.errors import BAD_ARGUMENTS, STD_EXCEPTION, ClickHouseError
from metering_dev.clickhouse_endpoint.log import log
from metering_dev.clickhouse_endpoint.query_request import (
    QueryRequest,
    build_query_request,
    parse_multipart,
    parse_url_params,
)

KEEP_ALIVE_TIMEOUT_S = 60
TLS_HANDSHAKE_TIMEOUT_S = 10
RESPONSE_CHUNK_BYTES = 1 << 20


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


class ClickHouseHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], engine: Engine, authenticator: Authenticator, tls: ssl.SSLContext | None = None
    ) -> None:
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
            params = parse_url_params(url.query)
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
        except Exception as exc:  # noqa: BLE001 - answer like the server instead of dropping the socket
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
