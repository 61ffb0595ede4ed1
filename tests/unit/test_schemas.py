"""The wire contract: how producers' JSON is read, and that the shipped JSON Schema files are current."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest
from pydantic import ValidationError

from metering_schemas import AggregationType, MetricDefinition, ResetPeriod, UsageRecord, UsageRecordBatch
from metering_schemas.json_schema import CONTRACT, SCHEMA_DIR, render

RECORD = {"metricKey": "api_calls", "subjectType": "org", "subjectId": "org-123"}


def test_quantity_defaults_to_one_and_timestamp_to_none():
    record = UsageRecord.model_validate(RECORD)
    assert record.quantity == Decimal(1)
    assert record.timestamp is None
    assert record.id is None
    assert record.metadata == {}


@pytest.mark.parametrize("given", ["0.1", 0.1, "12345678901234567890.123456789012345678", 7])
def test_quantity_is_exact_decimal_from_number_or_string(given):
    record = UsageRecord.model_validate({**RECORD, "quantity": given})
    assert isinstance(record.quantity, Decimal)
    assert record.quantity == Decimal(str(given))


@pytest.mark.parametrize("given", ["NaN", "Infinity", "-inf", "abc", "1e40", "0.0000000000000000001"])
def test_non_finite_non_numeric_or_out_of_range_quantity_is_refused(given):
    with pytest.raises(ValidationError) as error:
        UsageRecord.model_validate({**RECORD, "quantity": given})
    assert error.value.errors()[0]["loc"] == ("quantity",)


@pytest.mark.parametrize(
    "given",
    ["2026-11-24T10:00:00Z", "2026-11-24T11:00:00+01:00", "2026-11-24T10:00:00", 1795514400, 1795514400000],
)
def test_timestamps_in_iso_or_epoch_seconds_or_ms_are_read_as_utc(given):
    record = UsageRecord.model_validate({**RECORD, "timestamp": given})
    assert record.timestamp == datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc)
    assert record.timestamp.utcoffset().total_seconds() == 0


def test_missing_required_fields_are_named_in_camel_case():
    with pytest.raises(ValidationError) as error:
        UsageRecord.model_validate({"quantity": 1})
    missing = {e["loc"][0] for e in error.value.errors() if e["type"] == "missing"}
    assert missing == {"metricKey", "subjectType", "subjectId"}


def test_enums_are_accepted_in_any_case():
    metric = MetricDefinition.model_validate(
        {"id": "m1", "key": "api_calls", "name": "API calls", "aggregationType": "sum", "resetPeriod": "Monthly"}
    )
    assert metric.aggregation_type is AggregationType.SUM
    assert metric.reset_period is ResetPeriod.MONTHLY
    with pytest.raises(ValidationError):
        MetricDefinition.model_validate({"id": "m1", "key": "k", "name": "n", "aggregationType": "median"})


def test_serialisation_uses_camel_case_and_keeps_decimals_exact():
    record = UsageRecord.model_validate({**RECORD, "quantity": "0.10"})
    payload = record.to_json().decode()
    assert '"metricKey":"api_calls"' in payload
    assert '"quantity":"0.10"' in payload


def test_batch_requires_at_least_one_record():
    with pytest.raises(ValidationError):
        UsageRecordBatch.model_validate({"records": []})
    assert len(UsageRecordBatch.model_validate({"records": [RECORD, RECORD]}).records) == 2


@pytest.mark.parametrize("file_name", sorted(CONTRACT))
def test_shipped_json_schema_files_match_the_models(file_name):
    shipped = (SCHEMA_DIR / file_name).read_text()
    assert shipped == render(CONTRACT[file_name]), "run: python -m metering_schemas.json_schema"
