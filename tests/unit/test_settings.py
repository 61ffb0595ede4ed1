"""Settings come from METERING_* env vars and reach every client's options."""

from __future__ import annotations

from datetime import timedelta

import pytest

from metering_pipeline.settings import Settings
from metering_pipeline.tables import render


def test_defaults_match_the_documented_contract(monkeypatch):
    for name in ("METERING_KAFKA_BOOTSTRAP", "METERING_CLICKHOUSE_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.kafka_bootstrap == "localhost:9092"
    assert settings.clickhouse_url == "http://localhost:8123"


def test_kafka_sasl_options_come_from_env(monkeypatch):
    monkeypatch.setenv("METERING_KAFKA_BOOTSTRAP", "broker-1:9093")
    monkeypatch.setenv("METERING_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("METERING_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("METERING_KAFKA_SASL_USERNAME", "metering")
    monkeypatch.setenv("METERING_KAFKA_SASL_PASSWORD", "s3cret")
    settings = Settings()
    assert settings.kafka_client_options() == {
        "bootstrap_servers": "broker-1:9093",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "metering",
        "sasl_plain_password": "s3cret",
    }
    assert "s3cret" not in repr(settings)


def test_clickhouse_url_and_credentials_become_client_options(monkeypatch):
    monkeypatch.setenv("METERING_CLICKHOUSE_URL", "https://ch.example.com:8443")
    monkeypatch.setenv("METERING_CLICKHOUSE_USER", "metering")
    monkeypatch.setenv("METERING_CLICKHOUSE_PASSWORD", "pw")
    monkeypatch.setenv("METERING_CLICKHOUSE_REQUEST_TIMEOUT", "30")
    options = Settings().clickhouse_client_options()
    assert options == {
        "host": "ch.example.com",
        "port": 8443,
        "interface": "https",
        "username": "metering",
        "password": "pw",
        "verify": True,
        "connect_timeout": 5.0,  # every client has explicit timeouts (clickhouse-connect's default waits 300 s)
        "send_receive_timeout": 30.0,
    }


def test_tables_align_columns_under_a_rule():
    assert render(["a", "long"], [(1, None), ("xyz", 2)]).splitlines() == [
        "a    long",
        "---  ----",
        "1",
        "xyz  2",
    ]


def test_decimals_print_with_every_significant_digit_and_no_exponent():
    from decimal import Decimal

    from metering_pipeline.tables import decimal_text

    assert decimal_text(Decimal("1.25E+1")) == "12.5"
    assert decimal_text(Decimal("12.500000000000000000")) == "12.5"
    assert decimal_text(Decimal("100")) == "100"
    assert decimal_text(Decimal("0.000000000000000001")) == "0.000000000000000001"


def test_an_empty_tls_file_variable_means_no_file(monkeypatch):
    monkeypatch.setenv("METERING_KAFKA_SSL_CAFILE", "")
    monkeypatch.setenv("METERING_CLICKHOUSE_CA_CERT", " ")
    settings = Settings()
    assert settings.kafka_ssl_cafile is None and settings.clickhouse_ca_cert is None


@pytest.mark.parametrize(("raw", "seconds"), [("300", 300), ("300.5", 300.5), ("PT5M", 300), ("P1DT1S", 86401)])
def test_durations_are_read_as_seconds_or_iso_8601(monkeypatch, raw, seconds):
    monkeypatch.setenv("METERING_DEDUP_WINDOW", raw)
    monkeypatch.setenv("METERING_ALLOWED_LATENESS", raw)
    settings = Settings()
    assert settings.dedup_window.total_seconds() == settings.allowed_lateness.total_seconds() == seconds


@pytest.mark.parametrize(
    ("protocol", "mechanism"), [("PLAINTEXT", "SCRAM-SHA-512"), ("SSL", "PLAIN"), ("SASL_SSL", None)]
)
def test_a_sasl_mechanism_and_a_sasl_protocol_come_together(monkeypatch, protocol, mechanism):
    monkeypatch.setenv("METERING_KAFKA_SECURITY_PROTOCOL", protocol)
    if mechanism:
        monkeypatch.setenv("METERING_KAFKA_SASL_MECHANISM", mechanism)
    with pytest.raises(ValueError, match="METERING_KAFKA_SASL_MECHANISM needs"):
        Settings()


def test_a_bad_setting_is_one_line_naming_the_variable_without_a_traceback(monkeypatch):
    from click.testing import CliRunner

    from metering_pipeline.cli import main

    monkeypatch.setenv("METERING_DEDUP_WINDOW", "xyz")
    result = CliRunner().invoke(main, ["summary", "--metric", "m", "--subject", "a:b", "--period", "HOURLY"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: settings: METERING_DEDUP_WINDOW: ") and result.output.count("\n") == 1


@pytest.mark.parametrize(("replicas", "insync"), [(1, 1), (2, 1), (3, 2), (5, 4)])
def test_in_sync_replicas_default_to_one_fewer_than_the_replicas(replicas, insync):
    assert Settings(replication_factor=replicas).insync_replicas == insync


def test_in_sync_replicas_are_what_is_set_within_the_replicas():
    assert Settings(replication_factor=3, min_insync_replicas=3).insync_replicas == 3
    with pytest.raises(ValueError, match="METERING_MIN_INSYNC_REPLICAS \\(4\\) exceeds METERING_REPLICATION_FACTOR"):
        Settings(replication_factor=3, min_insync_replicas=4)


def test_raw_records_must_outlive_the_allowed_lateness(monkeypatch):
    monkeypatch.setenv("METERING_RECORDS_TTL", "P90D")
    assert Settings().records_ttl == timedelta(days=90)
    assert Settings(records_ttl=timedelta(days=66)).records_ttl == timedelta(days=66)
    with pytest.raises(ValueError, match="METERING_RECORDS_TTL .* is shorter than METERING_ALLOWED_LATENESS"):
        Settings(records_ttl=timedelta(days=65))  # a month's first record must outlive its invoice: 31 + 35 days
