"""One way to open a ClickHouse client, so credentials and TLS options reach every caller."""

from __future__ import annotations

import re

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from metering_pipeline.settings import Settings

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote_identifier(name: str) -> str:
    """Database names cannot be bound as parameters in DDL; accept only plain identifiers."""
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain ClickHouse identifier: {name!r}")
    return f"`{name}`"


def connect(settings: Settings, *, database: str | None = None, timeout: float | None = None) -> Client:
    """A client bound to `database` (default: the product's database); `timeout` replaces the request timeout
    (for a quick look whether ClickHouse answers at all)."""
    options = settings.clickhouse_client_options()
    if timeout is not None:
        options["send_receive_timeout"] = timeout
    return clickhouse_connect.get_client(
        **options,
        database=settings.clickhouse_database if database is None else database,
        autogenerate_session_id=False,  # sessions serialize requests; the product needs none
    )
