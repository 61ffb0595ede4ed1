"""Why a Kafka client could not connect, in one sentence a user can act on.

When bootstrapping fails, aiokafka logs the cause (refused credentials, an untrusted
certificate, nothing listening) but raises only "Unable to bootstrap from [...]". Commands
that report failures in one line probe the first bootstrap server once more to name the
cause. The message names the server and the user, never the password.
"""

from __future__ import annotations

import asyncio
import ssl

from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, KafkaError, SaslAuthenticationFailed, UnsupportedSaslMechanismError

from metering_pipeline.settings import Settings

PROBE_TIMEOUT = 10.0


def first_bootstrap_server(settings: Settings) -> tuple[str, int]:
    first = settings.kafka_bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return host.strip("[]") or "localhost", int(port or 9092)


async def probe(settings: Settings) -> BaseException | None:
    """Connect (and authenticate) to the first bootstrap server; the error that stopped it, or None."""
    host, port = first_bootstrap_server(settings)
    options = settings.kafka_client_options()
    options.pop("bootstrap_servers")
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            connection = await create_conn(host, port, request_timeout_ms=int(PROBE_TIMEOUT * 1000), **options)
        connection.close()
    except (OSError, KafkaError, TimeoutError) as error:
        return error
    return None


def describe(settings: Settings, error: BaseException | None) -> str | None:
    """One line for the cause `error` (from `probe`), or None when it says nothing more than the original error."""
    host, port = first_bootstrap_server(settings)
    where = f"Kafka at {host}:{port}"
    if isinstance(error, SaslAuthenticationFailed):
        return (
            f"{where} refused the credentials of user {settings.kafka_sasl_username!r} "
            f"({settings.kafka_sasl_mechanism}): {error}; check METERING_KAFKA_SASL_USERNAME and "
            f"METERING_KAFKA_SASL_PASSWORD"
        )
    if isinstance(error, UnsupportedSaslMechanismError):
        return f"{where} does not accept SASL mechanism {settings.kafka_sasl_mechanism}: {error}"
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"{where}: its TLS certificate is not trusted ({error.verify_message}); "
            f"set METERING_KAFKA_SSL_CAFILE to the CA that signed it"
        )
    if isinstance(error, ssl.SSLError):
        return f"{where}: TLS handshake failed ({error}); is METERING_KAFKA_SECURITY_PROTOCOL right for this listener?"
    if isinstance(error, ConnectionRefusedError):
        return f"{where}: connection refused (nothing listens there)"
    if isinstance(error, KafkaConnectionError):
        return (
            f"{where}: the connection was closed during the handshake ({error}); "
            f"is METERING_KAFKA_SECURITY_PROTOCOL ({settings.kafka_security_protocol}) right for this listener?"
        )
    if isinstance(error, TimeoutError):
        return (
            f"{where}: no answer within {PROBE_TIMEOUT:.0f} s; "
            f"is METERING_KAFKA_SECURITY_PROTOCOL ({settings.kafka_security_protocol}) right for this listener?"
        )
    return None


def explain_connection_failure(settings: Settings) -> str | None:
    """Why clients cannot bootstrap from `settings.kafka_bootstrap`, or None when the probe finds no clearer cause."""
    return describe(settings, asyncio.run(probe(settings)))
