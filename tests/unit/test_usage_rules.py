"""The pure usage rules: period bucketing, exact aggregation, intake verdicts, dedup, metric resolution."""

from __future__ import annotations

import base64
import json
import sys
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, Inexact
from pathlib import Path

import jiter
import orjson
import pytest
from counted_records import counted as counted_record
from hypothesis import given, settings, strategies as st

from metering_pipeline.usage.aggregation import MERGEABLE, Aggregate
from metering_pipeline.usage.dedup import DedupWindow
from metering_pipeline.usage.intake import EVIDENCE_BYTES, IntakeRules, Message, read_message, read_message_by_model
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.periods import period_bounds, rollup_starts
from metering_pipeline.usage.rollups import LIFETIME, PartitionRollups
from metering_pipeline.usage.routed_record import CountedRecord
from metering_pipeline.worker import changelog
from metering_pipeline.worker.state_store import PartitionStore, StoreResources
from metering_schemas import AggregationType, MetricDefinition, PeriodType, RejectReason, ResetPeriod

UTC = UTC


@pytest.mark.parametrize(
    ("at", "period", "start", "end"),
    [
        (
            datetime(2026, 11, 24, 10, 0, tzinfo=UTC),
            PeriodType.HOURLY,
            datetime(2026, 11, 24, 10, tzinfo=UTC),
            datetime(2026, 11, 24, 11, tzinfo=UTC),
        ),
        (
            datetime(2026, 11, 24, 9, 59, 59, 999999, tzinfo=UTC),
            PeriodType.HOURLY,
            datetime(2026, 11, 24, 9, tzinfo=UTC),
            datetime(2026, 11, 24, 10, tzinfo=UTC),
        ),
        (
            datetime(2024, 2, 29, 23, 59, tzinfo=UTC),
            PeriodType.MONTHLY,
            datetime(2024, 2, 1, tzinfo=UTC),
            datetime(2024, 3, 1, tzinfo=UTC),
        ),
        (
            datetime(2100, 2, 28, 12, tzinfo=UTC),
            PeriodType.DAILY,
            datetime(2100, 2, 28, tzinfo=UTC),
            datetime(2100, 3, 1, tzinfo=UTC),
        ),
        (
            datetime(2026, 12, 31, 23, 30, tzinfo=UTC),
            PeriodType.MONTHLY,
            datetime(2026, 12, 1, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        (
            datetime(2026, 12, 31, 23, 30, tzinfo=UTC),
            PeriodType.DAILY,
            datetime(2026, 12, 31, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
        ),
        # 00:30 at +02:00 is 22:30 UTC the day before: periods are UTC.
        (
            datetime(2026, 3, 1, 0, 30, tzinfo=timezone(timedelta(hours=2))),
            PeriodType.MONTHLY,
            datetime(2026, 2, 1, tzinfo=UTC),
            datetime(2026, 3, 1, tzinfo=UTC),
        ),
    ],
)
def test_periods_are_utc_calendar_buckets(at, period, start, end):
    assert period_bounds(period, at) == (start, end)
    assert dict(rollup_starts(at))[period] == start


def test_the_all_time_window_spans_every_timestamp():
    start, end = period_bounds(ResetPeriod.NEVER, datetime(2026, 1, 1, tzinfo=UTC))
    assert start == datetime(1970, 1, 1, tzinfo=UTC) and end.year == 2106


def test_sums_are_exact_and_rounding_is_an_error():
    aggregate = Aggregate()
    for quantity in ("0.1", "0.2", "12345678901234567890.123456789012345678"):
        aggregate.add(Decimal(quantity))
    assert aggregate.total(AggregationType.SUM) == Decimal("12345678901234567890.423456789012345678")
    assert aggregate.total(AggregationType.COUNT) == 3
    assert aggregate.total(AggregationType.MAX) == Decimal("12345678901234567890.123456789012345678")
    assert aggregate.total(AggregationType.MIN) == Decimal("0.1")
    huge = Aggregate()
    huge.add(Decimal("9" * 76))
    with pytest.raises(Inexact):
        huge.add(Decimal("0.1"))  # 77 significant digits would need rounding


def test_average_is_rounded_once_half_even_to_18_places():
    aggregate = Aggregate()
    for quantity in ("1", "1", "2"):
        aggregate.add(Decimal(quantity))
    assert aggregate.total(AggregationType.AVG) == Decimal("1.333333333333333333")


@settings(max_examples=200)
@given(
    st.lists(st.decimals(min_value=-(10**6), max_value=10**6, places=6, allow_nan=False), min_size=1, max_size=40),
    st.integers(min_value=1, max_value=39),
)
def test_aggregates_merge_to_the_same_result_however_records_are_split(quantities, cut):
    whole, left, right = Aggregate(), Aggregate(), Aggregate()
    for n, quantity in enumerate(quantities):
        whole.add(quantity)
        (left if n < cut else right).add(quantity)
    right.merge(left)
    for aggregation in MERGEABLE:
        assert right.total(aggregation) == whole.total(aggregation)
    assert whole.total(AggregationType.SUM) == sum(quantities, Decimal(0))


def catalog(*definitions: MetricDefinition) -> MetricCatalog:
    return MetricCatalog({d.id: d for d in definitions})


TOKENS = MetricDefinition(id="tokens", key="tokens", name="t", aggregation_type=AggregationType.SUM)
TOKENS_ORG1 = MetricDefinition(
    id="org-1:tokens", key="tokens", name="t", aggregation_type=AggregationType.MAX, org_id="org-1"
)
NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)
NOW_MS = 1_795_521_600_000  # NOW in epoch milliseconds, as accepted records carry it


def message(value: bytes | None, offset: int = 7) -> Message:
    return Message("usage.recorded", 2, offset, NOW, b"k", value)


def read(value: bytes | None, *definitions: MetricDefinition):
    """(accepted, rejected) of a message none of whose records a filter leaves out."""
    intake = read_message(message(value), catalog(*(definitions or (TOKENS,))), IntakeRules())
    assert intake.filtered == 0
    return intake.accepted, intake.rejected


def test_quantities_keep_every_digit_and_default_to_one_with_the_message_time():
    accepted, rejected = read(
        b'{"metricKey":"tokens","subjectType":"org","subjectId":"o","quantity":12345678901234567890.123456789012345678}'
    )
    assert rejected == [] and str(accepted[0].quantity) == "12345678901234567890.123456789012345678"
    [plain], _ = read(b'{"metricKey":"tokens","subjectType":"org","subjectId":"o"}')
    assert Decimal(plain.quantity) == 1 and plain.timestamp_ms == NOW_MS
    assert plain.record_id == "@usage.recorded/2/7"  # no id: counted once per Kafka position


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", RejectReason.INVALID_JSON),
        (b"[1, 2]", RejectReason.INVALID_RECORD),
        (b'{"records": []}', RejectReason.INVALID_RECORD),
        (b'{"metricKey":"tokens","subjectType":"org","subjectId":"o","quantity":"NaN"}', RejectReason.INVALID_RECORD),
        (b'{"metricKey":"tokens","subjectType":"org","subjectId":"o","quantity":"abc"}', RejectReason.INVALID_RECORD),
        (b'{"metricKey":"nope","subjectType":"org","subjectId":"o"}', RejectReason.UNKNOWN_METRIC),
        (
            b'{"metricKey":"tokens","subjectType":"org","subjectId":"o","timestamp":"2026-10-01T00:00:00Z"}',
            RejectReason.TOO_LATE,
        ),
        (
            b'{"metricKey":"tokens","subjectType":"org","subjectId":"o","timestamp":"2026-11-24T12:06:00Z"}',
            RejectReason.FUTURE_TIMESTAMP,
        ),
    ],
)
def test_each_bad_input_is_dead_lettered_with_its_reason(value, reason):
    accepted, [letter] = read(value)
    assert accepted == [] and letter.reason is reason
    assert letter.source.offset == 7 and letter.message


def test_a_message_over_the_size_limit_is_refused_whole_with_its_bytes():
    value = b'{"metricKey":"tokens","subjectType":"org","subjectId":"o","metadata":{"x":"' + b"y" * 100 + b'"}}'
    _, [letter] = read_message(message(value), catalog(TOKENS), IntakeRules(max_message_bytes=64))[:2]
    assert letter.reason is RejectReason.TOO_LARGE and base64.b64decode(letter.original_value_base64) == value


def test_one_bad_record_in_a_batch_is_rejected_alone():
    batch = {
        "records": [
            {"id": "a", "metricKey": "tokens", "subjectType": "org", "subjectId": "o"},
            {"id": "b", "metricKey": "tokens", "subjectType": "org"},
            {"metricKey": "tokens", "subjectType": "org", "subjectId": "o", "quantity": "2.5"},
        ]
    }
    accepted, [letter] = read(orjson.dumps(batch))
    assert [a.record_id for a in accepted] == ["a", "@usage.recorded/2/7/2"]
    assert (letter.reason, letter.index, letter.record["id"]) == (RejectReason.INVALID_RECORD, 1, "b")


def test_epoch_seconds_and_milliseconds_are_timestamps():
    for stamp in (1795521600, 1795521600000):  # 2026-11-24T12:00:00Z
        [record], _ = read(
            orjson.dumps({"metricKey": "tokens", "subjectType": "org", "subjectId": "o", "timestamp": stamp})
        )
        assert record.timestamp_ms == NOW_MS


def _record(metadata: str, record_id: str = "r", quantity: str = "1") -> bytes:
    return (
        b'{"id":"' + record_id.encode() + b'","metricKey":"tokens","subjectType":"org","subjectId":"o",'
        b'"quantity":"' + quantity.encode() + b'","metadata":{"x":"' + metadata.encode() + b'"}}'
    )


def test_metadata_over_its_limit_is_refused_as_too_large_and_at_the_limit_accepted():
    rules = IntakeRules(max_metadata_bytes=1000)
    fits = "y" * (1000 - len('{"x":""}'))
    [accepted], [] = read_message(message(_record(fits)), catalog(TOKENS), rules)[:2]
    assert len(accepted.metadata_json) == 1000
    [], [letter] = read_message(message(_record(fits + "y")), catalog(TOKENS), rules)[:2]
    assert letter.reason is RejectReason.TOO_LARGE and "metadata of 1001 bytes" in letter.message
    [], [letter] = read_message(message(_record("é" * 500)), catalog(TOKENS), rules)[:2]  # counted in UTF-8 bytes
    assert letter.reason is RejectReason.TOO_LARGE


def test_dead_letters_of_large_messages_keep_bounded_evidence_and_say_so():
    big = _record("y" * 300_000, quantity="x")  # refused (not a number), 300 KB
    [], [letter] = read(big)
    assert letter.truncated and letter.record is None and letter.original_size == len(big)
    assert base64.b64decode(letter.original_value_base64) == big[:EVIDENCE_BYTES]
    assert len(letter.to_json()) < 2 * EVIDENCE_BYTES
    batch = b'{"records":[' + big + b"," + _record("small", "s2", quantity="x") + b"]}"
    [], letters = read(batch)
    assert [(x.index, x.truncated, x.record is None) for x in letters] == [(0, True, True), (1, False, False)]
    assert letters[1].record["id"] == "s2" and letters[1].original_value_base64 is None
    small = _record("z", quantity="x")
    [], [letter] = read(small)
    assert (
        not letter.truncated and letter.record["id"] == "r" and base64.b64decode(letter.original_value_base64) == small
    )


def test_an_orgs_own_definition_overrides_the_global_one_for_its_subjects():
    both = catalog(TOKENS, TOKENS_ORG1)
    assert both.resolve("tokens", "org-1") is TOKENS_ORG1
    assert both.resolve("tokens", "org-2") is TOKENS
    [user], _ = read_message(
        message(b'{"metricKey":"tokens","subjectType":"user","subjectId":"u","metadata":{"orgId":"org-1"}}'),
        both,
        IntakeRules(),
    )[:2]
    assert (user.metric_id, user.aggregation) == (TOKENS_ORG1.id, TOKENS_ORG1.aggregation_type)
    both.delete("org-1:tokens")
    assert both.resolve("tokens", "org-1") is TOKENS


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_either_accepted_or_dead_lettered_never_raised(value):
    accepted, rejected = read(value)
    assert all(letter.source == message(value).source() and letter.reason and letter.message for letter in rejected)
    try:
        document = jiter.from_json(value, float_mode="decimal", allow_inf_nan=False)  # JSON as the intake reads it
    except ValueError:  # not JSON: refused as a whole, with its bytes as evidence
        [letter] = rejected
        assert accepted == [] and (letter.reason, letter.index) == (RejectReason.INVALID_JSON, None)
        assert base64.b64decode(letter.original_value_base64 or "") == value
        return
    if isinstance(document, dict) and "records" not in document:
        records = [document]
    elif isinstance(document, dict) and isinstance(document["records"], list) and document["records"]:
        records = document["records"]
    else:  # JSON, but neither a record nor a batch of them: one dead letter
        records = [None]
        assert accepted == []
    assert len(accepted) + len(rejected) == len(records)  # each record accepted or dead-lettered, once
    if isinstance(document, dict) and records is document.get("records"):  # a batch: each letter names its record
        assert all(letter.index is not None for letter in rejected)


def test_a_null_in_a_batch_is_dead_lettered_alone_naming_its_index_and_the_others_count():
    batch = b'{"records":[' + _record("a", "r1") + b",null," + _record("b", "r3") + b"]}"
    for reader in (read_message, read_message_by_model):
        accepted, [letter] = reader(message(batch), catalog(TOKENS), IntakeRules())[:2]
        assert [record.record_id for record in accepted] == ["r1", "r3"]
        assert (letter.reason, letter.index, letter.record) == (RejectReason.INVALID_RECORD, 1, None)
        assert letter.original_value_base64 is None and "null" in letter.message


def test_a_duplicate_is_dropped_within_the_window_and_counted_after_it():
    window = DedupWindow(timedelta(hours=1))
    assert window.first_sighting(("org", "o", "r1"), NOW)
    assert not window.first_sighting(("org", "o", "r1"), NOW + timedelta(minutes=30))
    assert window.first_sighting(("org", "other", "r1"), NOW)  # same id, other subject: another record
    window.expire(NOW + timedelta(hours=2))
    assert window.first_sighting(("org", "o", "r1"), NOW + timedelta(hours=2))


def counted(record_id: str, quantity: str, at: datetime) -> CountedRecord:
    return counted_record(record_id, at, quantity, metric="tokens")


def test_rollups_count_each_record_once_in_hour_day_month_and_all_time_and_restore_exactly(tmp_path: Path):
    state = PartitionRollups(timedelta(hours=24))
    touched: set = set()
    assert state.apply(
        [counted("a", "1.5", NOW), counted("a", "1.5", NOW), counted("b", "2", NOW - timedelta(days=40))],
        3,
        NOW,
        touched,
    ) == (2, 1)
    assert len(touched) == 7  # a: hour, day, month, all time; b: its own hour, day, month (all time shared)
    lifetime = state.rollups[("tokens", "org", "o", LIFETIME, datetime(1970, 1, 1, tzinfo=UTC), ())]
    assert lifetime.total() == Decimal("3.5") and lifetime.version == 3
    checkpoint = state.checkpoint()
    assert len(checkpoint.records) == 2 and {c.key for c in checkpoint.rollups} == touched
    store, _ = PartitionStore.open(tmp_path / "p0", "changelog/0", StoreResources.of_size(8 << 20, 8 << 20))
    store.write(
        [*map(changelog.rollup_entry, checkpoint.rollups), *changelog.identities_entries(3, checkpoint.identities)],
        replay_from=None,
    )
    restored = PartitionRollups(timedelta(hours=24), stored=store)
    assert restored.apply([counted("a", "1.5", NOW)], 4, NOW) == (0, 1)  # the restored window still knows "a"
    # b's hour and day (Oct 15) ended before the horizon (Oct 20); its month runs to Nov 1 and stays.
    evicted = restored.evict_before(NOW - timedelta(days=35))
    assert {key[3] for key, _ in evicted} == {PeriodType.HOURLY, PeriodType.DAILY}
    store.close()


def test_records_for_periods_already_closed_are_refused_not_counted_into_fresh_rollups():
    state = PartitionRollups(timedelta(hours=24))
    horizon = NOW - timedelta(days=2)
    old, fresh = counted("old", "5", horizon - timedelta(hours=1, seconds=1)), counted("new", "1", horizon)
    border = counted("border", "1", horizon - timedelta(hours=1))  # its hour ends exactly at the horizon: still open
    assert state.apply([old, fresh, border], 2, NOW, None, closed_before=horizon) == (2, 0)
    checkpoint = state.checkpoint()
    assert checkpoint.closed == [(2, old)] and [r.record_id for r in checkpoint.records] == ["new", "border"]
    lifetime = state.rollups[("tokens", "org", "o", LIFETIME, datetime(1970, 1, 1, tzinfo=UTC), ())]
    assert lifetime.total() == Decimal(2)  # nothing of "old" was counted
    assert state.checkpoint().closed == []


def test_plain_decimals_drop_clickhouse_scale_but_keep_every_digit():
    from metering_pipeline.usage.aggregation import plain

    assert [
        str(plain(Decimal(v))) for v in ("1850.500000000000000000", "1000.000000000000000000", "0E-18", "1E+3")
    ] == ["1850.5", "1000", "0", "1000"]
    big = "12345678901234567890123456789012345678"
    assert str(plain(Decimal(big + ".000000000000000000"))) == big


def test_metadata_beyond_orjsons_limits_is_kept_exactly_or_the_record_refused():
    from metering_pipeline.usage.intake import metadata_json

    big = 10**40
    [accepted], _ = read(
        b'{"metricKey":"tokens","subjectType":"org","subjectId":"o","metadata":{"n":' + str(big).encode() + b"}}"
    )
    assert json.loads(accepted.metadata_json) == {"n": big}
    deep: dict = {"a": 1}
    for _ in range(300):  # deeper than orjson renders
        deep = {"a": deep}
    assert json.loads(metadata_json(deep)) == deep
    for _ in range(5000):
        deep = {"a": deep}
    assert metadata_json(deep) is None


def test_timestamps_that_overflow_when_converted_to_utc_are_refused_as_invalid_records():
    _, [letter] = read(
        b'{"metricKey":"tokens","subjectType":"org","subjectId":"o","timestamp":"0001-01-01T00:00:00+01:00"}'
    )
    assert letter.reason is RejectReason.INVALID_RECORD and "out of range" in letter.message
    _, [late] = read(
        b'{"metricKey":"tokens","subjectType":"org","subjectId":"o","timestamp":"9999-12-31T23:59:59-01:00"}'
    )
    assert late.reason is RejectReason.INVALID_RECORD


def test_rollups_hold_one_string_per_metric_and_subject_however_many_records_name_them():
    def fresh(text: str) -> str:  # a new object with the same text, as decoding each record makes one
        return "".join([text[:1], text[1:]])

    at_ms = int(NOW.timestamp() * 1000)
    records = [
        CountedRecord(
            fresh("org"),
            fresh("o-1"),
            f"r{n}",
            fresh("tokens"),
            fresh("tokens-v2"),
            AggregationType.SUM,
            Decimal(n + 1),
            at_ms,
            "{}",
        )
        for n in range(3)
    ]
    assert records[0].metric_id is not records[1].metric_id
    state = PartitionRollups(timedelta(hours=24))
    state.apply(records, 0, NOW)
    rollups = state.rollups
    assert len(rollups) == 4 and all(rollup.count == 3 for rollup in rollups.values())
    # The one interned object, not the copy of whichever record came last.
    assert all(rollup.metric_id is sys.intern(fresh("tokens-v2")) for rollup in rollups.values())
    assert all(key[0] is sys.intern(fresh("tokens")) and key[2] is sys.intern(fresh("o-1")) for key in rollups)
