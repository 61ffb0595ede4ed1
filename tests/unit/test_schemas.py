"""The wire contract: how producers' JSON is read, what the pipeline emits, and that the shipped JSON Schema
files are current."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import jsonschema
import pytest
from pydantic import BaseModel, ValidationError

from metering_pipeline.usage.aggregation import MERGEABLE, Aggregate
from metering_pipeline.usage.periods import period_in
from metering_pipeline.usage.rollups import Rollup, RollupChange
from metering_pipeline.usage.thresholds import EXCEEDED, Alert
from metering_pipeline.worker.rollup_partition import aggregated_event
from metering_schemas import (
    AggregationType,
    InvoiceLine,
    MetricDefined,
    MetricDefinition,
    PeriodType,
    Price,
    ResetPeriod,
    ThresholdAction,
    ThresholdAlert,
    UsageAggregated,
    UsageRecord,
    UsageRecordBatch,
    UsageSummary,
    UsageThreshold,
)
from metering_schemas.json_schema import CONTRACT, SCHEMA_DIR, render

RECORD = {"metricKey": "api_calls", "subjectType": "org", "subjectId": "org-123"}
THRESHOLD = {"id": "t1", "metricKey": "api_calls", "subjectType": "org", "subjectId": "*", "threshold": "100"}
PRICE = {"metricKey": "api_calls", "model": "PER_UNIT", "unitPrice": "0.02"}


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


# Strings Decimal() reads that are not JSON numbers (issue 23): each was accepted (" 1 " as 1, "١٢" as 12) before.
NOT_JSON_NUMBERS = [
    "1_000",
    " 1 ",
    "١٢",
    "٣",
    "１",
    "01",
    "-01",
    "00.5",
    "+1",
    ".5",
    "1.",
    "-.5",
    "1e",
    "1e+",
    "e3",
    "-",
    "0x10",
    "1\n",
    "\t1",
    "1 000",
    "1,5",
    "nan",
    "Infinity",
    "1E+3 ",
]
JSON_NUMBERS = ["0", "-0", "7", "-12.50", "0.000000000000000001", "1e3", "1E+3", "2.5e-3", "-1E-0", "0e0"]


@pytest.mark.parametrize("given", NOT_JSON_NUMBERS)
def test_a_decimal_string_outside_the_json_number_grammar_is_refused_everywhere(given):
    """Quantities, thresholds, prices and aggregates all read strings by the JSON number grammar, with one error."""
    refusals = []
    for model, fields, field in (
        (UsageRecord, RECORD, "quantity"),
        (UsageThreshold, THRESHOLD, "threshold"),
        (Price, PRICE, "unitPrice"),
        (UsageAggregated, json.loads(AGGREGATED), "totalQuantity"),
    ):
        with pytest.raises(ValidationError) as error:
            model.model_validate({**fields, field: given})
        [problem] = error.value.errors()
        refusals.append((problem["loc"], problem["type"]))
    assert refusals == [
        (("quantity",), "decimal_parsing"),
        (("threshold",), "decimal_parsing"),
        (("unitPrice",), "decimal_parsing"),
        (("totalQuantity",), "decimal_parsing"),
    ]


@pytest.mark.parametrize("given", JSON_NUMBERS)
def test_a_decimal_string_in_json_number_form_is_read_as_that_number(given):
    assert UsageRecord.model_validate({**RECORD, "quantity": given}).quantity == Decimal(given)
    assert Price.model_validate({**PRICE, "unitPrice": given.lstrip("-")}).unit_price == Decimal(given.lstrip("-"))


# Not "1\n": JSON Schema patterns are ECMA 262 regexes, whose $ is the end of the text, but the Python validator uses
# `re.search`, whose $ also matches before a final newline.
@pytest.mark.parametrize("given", [text for text in NOT_JSON_NUMBERS if not text.endswith("\n")] + JSON_NUMBERS)
def test_the_shipped_schema_files_state_the_same_grammar(given):
    """Non-Python producers validating with the schema files refuse exactly the strings the models refuse."""
    accepted = given in JSON_NUMBERS
    assert schema_of("usage-record.schema.json").is_valid({**RECORD, "quantity": given}) is accepted
    plan = {"key": "basic", "name": "Basic", "currency": "USD", "prices": [{**PRICE, "unitPrice": given.lstrip("-")}]}
    assert schema_of("plan.schema.json").is_valid(plan) is accepted


@pytest.mark.parametrize(
    "given",
    ["2026-11-24T10:00:00Z", "2026-11-24T11:00:00+01:00", "2026-11-24T10:00:00", 1795514400, 1795514400000],
)
def test_timestamps_in_iso_or_epoch_seconds_or_ms_are_read_as_utc(given):
    record = UsageRecord.model_validate({**RECORD, "timestamp": given})
    assert record.timestamp == datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
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


# The events exactly as the worker wrote them with hand-built dicts before they had models: consumers depend on
# every name and format, so the models must read and write these bytes unchanged.
ALERT = (
    b'{"id":"t1/org:org-1/MONTHLY/2026-11-01T00:00:00Z/threshold.exceeded@100","type":"threshold.exceeded",'
    b'"thresholdId":"t1","metricKey":"tokens","subjectType":"org","subjectId":"org-1","threshold":"100",'
    b'"value":"100.000000000000000001","periodType":"MONTHLY","periodStart":"2026-11-01T00:00:00Z",'
    b'"periodEnd":"2026-12-01T00:00:00Z","action":"BLOCK","notifyEmails":["ops@example.com"],'
    b'"occurredAt":"2026-11-24T12:30:00.123456Z"}'
)
AGGREGATED = (
    b'{"type":"usage.aggregated","metricKey":"tokens","subjectType":"org","subjectId":"org-1",'
    b'"periodType":"HOURLY","periodStart":"2026-11-24T10:00:00Z","periodEnd":"2026-11-24T11:00:00Z",'
    b'"totalQuantity":"3.75","recordCount":2,"version":41}'
)
DEFINED = (
    b'{"id":"metric.defined:org-1:tokens:7","type":"metric.defined","occurredAt":"2026-11-24T12:30:00Z",'
    b'"metric":{"id":"org-1:tokens","key":"tokens","name":"Tokens","description":"","unit":"",'
    b'"aggregationType":"SUM","resetPeriod":"MONTHLY","orgId":"org-1"}}'
)
# Fields added since are written after the old ones (an old event reads with their defaults).
ALERT_NOW = ALERT[:-1] + b',"dimensions":{},"timeZone":"UTC","localPeriodStart":null}'
AGGREGATED_NOW = AGGREGATED[:-1] + b',"dimensions":{},"timeZone":"UTC","localPeriodStart":null}'
DEFINED_NOW = DEFINED[:-2] + b',"valueProperty":null,"groupBy":{},"filter":{}}}'
EVENTS = [
    (ThresholdAlert, ALERT, ALERT_NOW, "threshold-alert.schema.json"),
    (UsageAggregated, AGGREGATED, AGGREGATED_NOW, "usage-aggregated.schema.json"),
    (MetricDefined, DEFINED, DEFINED_NOW, "metric-defined.schema.json"),
]
BIG = "1234567890123456789012345678901234567890123456789012345678.123456789012345678"  # Decimal(76, 18) at its limit


def schema_of(file_name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((SCHEMA_DIR / file_name).read_text()))


@pytest.mark.parametrize(("model", "wire", "now", "file_name"), EVENTS, ids=lambda v: getattr(v, "__name__", None))
def test_emitted_events_keep_their_old_bytes_and_append_new_fields_and_match_their_schema_files(
    model: type[BaseModel], wire: bytes, now: bytes, file_name: str
):
    event = model.model_validate_json(wire)
    assert event.to_json() == now
    assert model.model_validate_json(now) == event
    schema_of(file_name).validate(json.loads(now))


def test_emitted_event_schemas_require_every_field_and_decimal_strings():
    alert = json.loads(ALERT_NOW)
    schema = schema_of("threshold-alert.schema.json")
    assert not list(schema.iter_errors(alert))
    assert list(schema.iter_errors({**alert, "value": 100.5})), "a JSON number is not what the worker emits"
    assert list(schema.iter_errors({**alert, "occurredAt": "2026-11-24T13:30:00+01:00"})), "timestamps end in Z"
    assert list(schema.iter_errors({**alert, "type": "usage.aggregated"}))
    assert list(schema.iter_errors({k: v for k, v in alert.items() if k != "notifyEmails"}))
    aggregated = json.loads(AGGREGATED_NOW)
    assert list(
        schema_of("usage-aggregated.schema.json").iter_errors({k: v for k, v in aggregated.items() if k != "type"})
    )


def test_aggregates_hold_what_clickhouse_decimal_76_18_holds():
    aggregated = UsageAggregated.model_validate_json(AGGREGATED.replace(b'"3.75"', f'"{BIG}"'.encode()))
    assert aggregated.total_quantity == Decimal(BIG)
    assert json.loads(aggregated.to_json())["totalQuantity"] == BIG  # 58 + 18 digits, every one kept
    schema_of("usage-aggregated.schema.json").validate(json.loads(aggregated.to_json()))
    alert = ThresholdAlert.model_validate({**json.loads(ALERT), "value": BIG, "threshold": BIG[:-1]})
    assert (str(alert.value), str(alert.threshold)) == (BIG, BIG[:-1])
    for refused in ("1" + BIG, BIG + "9", "NaN"):  # 59 digits before the point, 19 after it, not a number
        with pytest.raises(ValidationError):
            UsageAggregated.model_validate({**json.loads(AGGREGATED), "totalQuantity": refused})


def test_summaries_and_invoice_lines_hold_what_clickhouse_decimal_76_18_holds():
    """What the API, the CLI and stored invoices carry: usage_summary's totals and the units billed from them."""
    summary = UsageSummary(
        id="s",
        metric_key="tokens",
        subject_type="org",
        subject_id="org-1",
        period_type=PeriodType.MONTHLY,
        period_start=datetime(2026, 11, 1, tzinfo=UTC),
        period_end=datetime(2026, 12, 1, tzinfo=UTC),
        total_quantity=Decimal(BIG),
        record_count=11,
    )
    written = json.loads(summary.to_json())
    assert written["totalQuantity"] == BIG and UsageSummary.model_validate(written) == summary
    schema_of("usage-summary.schema.json").validate(written)
    line = InvoiceLine.model_validate(
        {
            "type": "USAGE",
            "planKey": "p",
            "metricKey": "tokens",
            "startsAt": "2026-11-01",
            "endsAt": "2026-12-01",
            "quantity": BIG,
            "includedUnits": BIG,
            "billableUnits": "0",
            "amount": "0.00",
        }
    )
    assert (str(line.quantity), str(line.included_units)) == (BIG, BIG)
    for refused in ("1" + BIG, BIG + "9"):
        with pytest.raises(ValidationError):
            UsageSummary.model_validate({**written, "totalQuantity": refused})
        with pytest.raises(ValidationError):
            InvoiceLine.model_validate({**line.model_dump(by_alias=True), "billableUnits": refused})
    # A single record keeps the producers' contract.
    with pytest.raises(ValidationError):
        UsageRecord.model_validate({**RECORD, "quantity": BIG})


def test_event_timestamps_are_written_in_utc_with_z():
    east = timezone(timedelta(hours=2))
    defined = MetricDefined(
        id="metric.defined:m:0",
        occurred_at=datetime(2026, 11, 24, 14, 30, tzinfo=east),
        metric=MetricDefinition(id="m", key="m", name="m", aggregation_type=AggregationType.COUNT),
    )
    assert json.loads(defined.to_json())["occurredAt"] == "2026-11-24T12:30:00Z"
    aggregated = UsageAggregated.model_validate(
        {**json.loads(AGGREGATED), "periodStart": "2026-11-24T10:00:00", "periodEnd": "2026-11-24T12:00:00+01:00"}
    )
    written = json.loads(aggregated.to_json())
    assert (written["periodStart"], written["periodEnd"]) == ("2026-11-24T10:00:00Z", "2026-11-24T11:00:00Z")


def test_the_worker_builds_the_events_it_always_wrote():
    limit = UsageThreshold(
        id="t1",
        metric_key="tokens",
        subject_type="org",
        subject_id="*",
        threshold=Decimal(100),
        action=ThresholdAction.BLOCK,
        notify_emails=["ops@example.com"],
    )
    alert = Alert(
        EXCEEDED,
        limit,
        "org",
        "org-1",
        Decimal("100.000000000000000001"),
        ResetPeriod.MONTHLY,
        datetime(2026, 11, 1, tzinfo=UTC),
        datetime(2026, 11, 24, 12, 30, 0, 123456, tzinfo=UTC),
    )
    # The zone fields as the worker fills them (an old event read back has no local start: null).
    worker_fields = b',"dimensions":{},"timeZone":"UTC","localPeriodStart":"2026-11-01T00:00:00+00:00"}'
    assert alert.to_event().to_json() == ALERT[:-1] + worker_fields
    aggregate = Aggregate()
    aggregate.add(Decimal("1.5"))
    aggregate.add(Decimal("2.25"))
    change = RollupChange.of(
        ("tokens", "org", "org-1", PeriodType.HOURLY, datetime(2026, 11, 24, 10, tzinfo=UTC), ()),
        Rollup(AggregationType.SUM, aggregate.count, aggregate.sum, aggregate.min, aggregate.max, 41, "tokens"),
    )
    assert aggregated_event(change) == AGGREGATED[:-1] + (
        b',"dimensions":{},"timeZone":"UTC","localPeriodStart":"2026-11-24T10:00:00+00:00"}'
    )


@pytest.mark.parametrize("aggregation", MERGEABLE)
@pytest.mark.parametrize(
    "period, start",
    [
        (PeriodType.HOURLY, datetime(2026, 11, 24, 23, tzinfo=UTC)),
        (PeriodType.DAILY, datetime(2026, 12, 31, tzinfo=UTC)),
        (PeriodType.MONTHLY, datetime(2026, 12, 1, tzinfo=UTC)),
        (PeriodType.MONTHLY, datetime(1970, 1, 1, tzinfo=UTC)),
    ],
)
@pytest.mark.parametrize(
    "quantities",
    [
        ["1"],
        ["0"],
        ["-0"],
        ["85.50", "0.5"],
        ["1E+3", "2"],
        ["-7.000000000000000001", "3"],
        ["12345678901234567890.123456789012345678"] * 3,
        ["99999999999999999999.999999999999999999"] * 1000,
    ],
)
@pytest.mark.parametrize("zone", ["UTC", "Asia/Kathmandu"])
def test_usage_aggregated_is_built_byte_for_byte_as_the_model_writes_it(aggregation, period, start, quantities, zone):
    """The worker builds the event without the model (hot path); the model is the contract."""
    aggregate = Aggregate()
    for quantity in quantities:
        aggregate.add(Decimal(quantity))
    rollup = Rollup(
        aggregation, aggregate.count, aggregate.sum, aggregate.min, aggregate.max, len(quantities) * 1_000_003, "m-1"
    )
    change = RollupChange.of(("m.key", "org", 'ö-1 "quoted"', period_in(period, zone), start, ()), rollup)
    model = UsageAggregated(
        metric_key="m.key",
        subject_type="org",
        subject_id='ö-1 "quoted"',
        period_type=period,
        period_start=start,
        period_end=change.period_end,
        total_quantity=rollup.total(),
        record_count=aggregate.count,
        version=rollup.version,
        time_zone=zone,
        local_period_start=start.astimezone(ZoneInfo(zone)).isoformat(),
    )
    assert aggregated_event(change) == model.to_json()
