"""How a definition topic's entry is read: JSON numbers keep every digit, a tombstone deletes, garbage is ignored."""

from __future__ import annotations

from decimal import Decimal

from metering_pipeline.definitions import parse_entry
from metering_schemas import Plan, UsageThreshold

THRESHOLD = b'{"id": "t1", "metricKey": "m", "subjectType": "org", "subjectId": "o", "threshold": %s}'


def test_a_threshold_written_as_a_json_number_keeps_every_digit():
    entry = parse_entry(UsageThreshold, b"t1", THRESHOLD % b"12345678901234567890.123456789012345678")
    assert entry is not None and entry[1] is not None
    assert entry[1].threshold == Decimal("12345678901234567890.123456789012345678")


def test_a_price_written_as_a_json_number_keeps_every_digit():
    value = (
        b'{"key": "p", "name": "p", "currency": "USD", "prices": [{"metricKey": "m", "model": "PER_UNIT", '
        b'"unitPrice": 12345678901234567890.123456789012345678}]}'
    )
    entry = parse_entry(Plan, b"p", value)
    assert entry is not None and entry[1] is not None
    assert entry[1].prices[0].unit_price == Decimal("12345678901234567890.123456789012345678")


def test_a_tombstone_deletes_and_an_unreadable_entry_is_ignored():
    assert parse_entry(UsageThreshold, b"t1", None) == ("t1", None)
    assert parse_entry(UsageThreshold, b"t1", b"{not json") is None
    assert parse_entry(UsageThreshold, b"t1", THRESHOLD % b'"1_000"') is None
