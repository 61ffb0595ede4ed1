"""Lifecycle: the TLS context, serve() until SIGTERM/SIGINT, and the command line (main)."""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from metering_dev.clickhouse_endpoint.auth import Authenticator
from metering_dev.clickhouse_endpoint.engine import Engine
from metering_dev.clickhouse_endpoint.handler import ClickHouseHTTPServer
from metering_dev.clickhouse_endpoint.log import log


def server_tls_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """TLS 1.2+ with the given PEM certificate chain (leaf first) and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


def serve(
    host: str,
    port: int,
    data_dir: str | Path,
    user: str | None = None,
    password: str | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
) -> None:
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
        prog="python -m metering_dev.clickhouse_endpoint",
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
    serve(
        args.host,
        args.port,
        args.data_dir,
        user=args.user,
        password=args.password,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
