"""The one line a command prints when Kafka cannot be reached names the cause, never the password."""

from __future__ import annotations

import ssl

from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from metering_pipeline.kafka_errors import describe, first_bootstrap_server
from metering_pipeline.settings import Settings

SETTINGS = Settings(
    kafka_bootstrap="broker-1:9094,broker-2:9094",
    kafka_security_protocol="SASL_SSL",
    kafka_sasl_mechanism="SCRAM-SHA-512",
    kafka_sasl_username="metering",
    kafka_sasl_password="s3cret-pw",
)


def test_each_cause_gets_its_own_sentence():
    refused = describe(SETTINGS, SaslAuthenticationFailed("invalid credentials"))
    assert refused is not None and refused.startswith(
        "Kafka at broker-1:9094 refused the credentials of user 'metering'"
    )
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_message = "self-signed certificate in certificate chain"
    assert "METERING_KAFKA_SSL_CAFILE" in describe(SETTINGS, untrusted)
    assert "connection refused" in describe(SETTINGS, ConnectionRefusedError())
    assert "METERING_KAFKA_SECURITY_PROTOCOL (SASL_SSL)" in describe(SETTINGS, KafkaConnectionError("closed"))
    assert describe(SETTINGS, None) is None and describe(SETTINGS, ValueError("other")) is None
    for error in (SaslAuthenticationFailed("x"), untrusted, ConnectionRefusedError(), KafkaConnectionError("y")):
        assert "s3cret-pw" not in describe(SETTINGS, error)


def test_the_first_bootstrap_server_is_probed():
    assert first_bootstrap_server(SETTINGS) == ("broker-1", 9094)
    assert first_bootstrap_server(Settings(kafka_bootstrap="[::1]:9092")) == ("::1", 9092)
