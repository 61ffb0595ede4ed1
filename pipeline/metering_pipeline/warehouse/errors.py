"""Which failures of a ClickHouse write are worth retrying.

A writer that retries everything turns a schema mismatch or a bug into an endless loop of
warnings while the worker looks busy; one that retries nothing turns a restart of
ClickHouse into a crash. So only what can succeed later without anyone changing the code,
the schema or the configuration is transient: the connection (refused, reset, timed out),
the server error codes below, and, when the answer carries no ClickHouse code (a proxy or load
balancer answered), HTTP 5xx statuses.
"""

from __future__ import annotations

import asyncio
import re
import ssl

from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

# ClickHouse error codes (src/Common/ErrorCodes.cpp) after which the same insert can succeed unchanged.
# Every write of the product is idempotent, so re-sending an insert that may have been applied is safe.
TRANSIENT_CODES: frozenset[int] = frozenset(
    {
        3,  # UNEXPECTED_END_OF_FILE: the request body was cut off (connection dropped mid-insert)
        76,  # CANNOT_OPEN_FILE: out of file descriptors (ClickHouse answers it 503 Service Unavailable)
        159,  # TIMEOUT_EXCEEDED
        173,  # CANNOT_ALLOCATE_MEMORY
        201,  # QUOTA_EXPIRED: the quota's interval ends
        202,  # TOO_MANY_SIMULTANEOUS_QUERIES
        203,  # NO_FREE_CONNECTION
        209,  # SOCKET_TIMEOUT
        210,  # NETWORK_ERROR
        225,  # NO_ZOOKEEPER
        236,  # ABORTED
        241,  # MEMORY_LIMIT_EXCEEDED
        242,  # TABLE_IS_READ_ONLY: a replica lost its Keeper session
        243,  # NOT_ENOUGH_SPACE: merges, TTLs or an operator free it; the backlog waits in Kafka meanwhile
        252,  # TOO_MANY_PARTS: inserts throttled until merges catch up
        279,  # ALL_CONNECTION_TRIES_FAILED (distributed tables)
        285,  # TOO_FEW_LIVE_REPLICAS
        286,  # UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE
        319,  # UNKNOWN_STATUS_OF_INSERT
        394,  # QUERY_WAS_CANCELLED: the server is shutting down
        425,  # SYSTEM_ERROR: an OS call failed (errno)
        439,  # CANNOT_SCHEDULE_TASK: the server's thread pools are full
        999,  # KEEPER_EXCEPTION
    }
)

_HTTP_STATUS = re.compile(r"HTTP driver received HTTP status (\d{3})")


def untrusted_certificate(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a client error (clickhouse-connect wraps urllib3's), if any."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def is_transient(error: BaseException) -> bool:
    """True when retrying the same write later can succeed; False for bugs and permanent server errors
    (unknown table or column, wrong type, refused credentials, an untrusted certificate, ...), which must
    stop the writer."""
    if untrusted_certificate(error) is not None:
        return False
    if isinstance(error, (OSError, TimeoutError, asyncio.TimeoutError)):  # ConnectionError is an OSError
        return True
    if not isinstance(error, DatabaseError):
        return False  # a bug on this side (TypeError, ValueError, ...)
    if error.code is not None:
        return error.code in TRANSIENT_CODES
    if isinstance(error, OperationalError):  # no code: the connection failed, or a 429/503/504 answer
        return True
    status = _HTTP_STATUS.search(str(error))
    return status is not None and int(status.group(1)) >= 500
