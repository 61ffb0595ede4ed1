"""The worker's own encodings: routed batches (version 2 MessagePack, version 1 JSON still read) and changelog
entries round-trip exactly, including what an older worker left on the topics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import msgspec
import orjson
import pytest
from hypothesis import given, strategies as st

from metering_pipeline.usage.aggregation import MERGEABLE
from metering_pipeline.usage.periods import EPOCH
from metering_pipeline.usage.rollups import LIFETIME, PartitionRollups, Rollup, RollupChange, RollupKey
from metering_pipeline.usage.routed_record import AcceptedRecord, CountedRecord, RoutedRecord
from metering_pipeline.warehouse.sink import records_body
from metering_pipeline.worker import changelog, routing
from metering_pipeline.worker.state_store import PartitionStore, StoreResources
from metering_schemas import AggregationType, MetricDefinition, PeriodType, ResetPeriod

UTC = UTC
TOKENS = MetricDefinition(
    id="tokens-v2", key="tokens", name="t", aggregation_type=AggregationType.MAX, reset_period=ResetPeriod.MONTHLY
)
BIG = "-12345678901234567890.123456789012345678"


def accepted(
    quantity: str,
    at: datetime,
    subject_id: str = "ö-1",
    metadata: str = '{"region":"eu"}',
    metric: MetricDefinition = TOKENS,
) -> AcceptedRecord:
    return AcceptedRecord(
        "org",
        subject_id,
        "r-1",
        "tokens",
        metric.id,
        metric.aggregation_type,
        quantity,
        (at - EPOCH) // timedelta(milliseconds=1),
        metadata,
        metric.reset_period is ResetPeriod.NEVER,
    )


def test_routed_batches_round_trip_exactly():
    at = datetime(2026, 11, 24, 10, 15, 30, 123000, tzinfo=UTC)
    records = [
        accepted(BIG, at),
        accepted("1E+3", at, 'o\u2028"x"'),
        accepted("0.000000000000000001", at, metadata="{}"),
    ]
    value = routing.encode(records)
    assert value[:1] == routing.ROUTED_V2
    decoded = routing.decode(value)
    assert [
        (r.subject_type, r.subject_id, r.record_id, r.metric_key, r.metric_id, r.aggregation, r.metadata_json)
        for r in decoded
    ] == [("org", a.subject_id, "r-1", "tokens", "tokens-v2", AggregationType.MAX, a.metadata_json) for a in records]
    assert [str(r.quantity) for r in decoded] == [BIG, "1E+3", "1E-18"]
    assert all(r.timestamp == at for r in decoded)


@given(
    st.decimals(
        allow_nan=False, allow_infinity=False, places=18, min_value=Decimal("-1e20"), max_value=Decimal("1e20")
    ),
    st.integers(min_value=0, max_value=4102444800000),
)
def test_any_quantity_and_millisecond_travels_unchanged(quantity, ms):
    at = datetime.fromtimestamp(ms / 1000, tz=UTC)
    [record] = routing.decode(routing.encode([accepted(str(quantity), at)]))
    assert record.quantity == quantity and str(record.quantity) == str(quantity) and record.timestamp_ms == ms


def test_version_1_json_batches_left_by_an_older_worker_still_decode():
    at_ms = 1_764_000_000_123
    legacy = orjson.dumps([["org", "o", "r-1", "tokens", "tokens-v2", "SUM", BIG, at_ms, '{"a":1}']])
    [record] = routing.decode(legacy)
    assert record == CountedRecord(
        "org", "o", "r-1", "tokens", "tokens-v2", AggregationType.SUM, Decimal(BIG), at_ms, '{"a":1}'
    )
    assert record.all_time  # an older worker kept an all-time rollup for every metric


def test_version_2_batches_routed_before_records_said_whether_they_count_all_time_still_do():
    older = routing.ROUTED_V2 + msgspec.msgpack.encode(
        [["org", "o", "r-1", "tokens", "tokens-v2", "SUM", "1.5", 1_764_000_000_123, "{}"]]
    )
    [record] = routing.decode(older)
    assert record.all_time and record.quantity == Decimal("1.5")


def test_what_a_metric_read_from_the_payload_travels_with_the_record_and_older_batches_have_none():
    at = datetime(2026, 11, 24, 10, 15, 30, 123000, tzinfo=UTC)
    grouped = msgspec.structs.replace(
        accepted("2.50", at), dimensions=(("model", "gpt-4"), ("region", "")), distinct="user-ö"
    )
    [record] = routing.decode(routing.encode([grouped]))
    assert (record.dimensions, record.distinct, str(record.quantity)) == (
        (("model", "gpt-4"), ("region", "")),
        "user-ö",
        "2.50",
    )
    older = routing.ROUTED_V2 + msgspec.msgpack.encode(
        [["org", "o", "r-1", "tokens", "tokens-v2", "SUM", "1.5", 1_764_000_000_123, "{}", False]]
    )
    [record] = routing.decode(older)
    assert (record.dimensions, record.distinct) == ((), None)


def test_routed_batches_are_cut_by_what_the_records_carry_dimensions_and_distinct_values_included():
    at = datetime(2026, 11, 24, 10, tzinfo=UTC)
    value = "x" * 100_000
    plain = [accepted("1", at, metadata="{}") for _ in range(10)]
    assert [len(batch) for batch in routing.batches(plain)] == [10]
    heavy = [
        msgspec.structs.replace(accepted("1", at, metadata="{}"), dimensions=(("d", value),), distinct=value)
        for _ in range(10)
    ]
    cut = list(routing.batches(heavy))
    assert len(cut) > 1 and sum(map(len, cut)) == 10
    assert all(len(routing.encode(batch)) <= routing.ROUTED_BATCH_BYTES for batch in cut)


def test_an_unknown_routed_encoding_is_refused_loudly():
    with pytest.raises(ValueError, match="unknown encoding"):
        routing.decode(b"\x07whatever")


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[Callable[..., PartitionStore]]:
    """Changelog entries written into a partition's store (each call a store of its own), as a restore writes them."""
    opened: list[PartitionStore] = []

    def write(entries: list[tuple[bytes, bytes | None]]) -> PartitionStore:
        store, _ = PartitionStore.open(
            tmp_path / f"p{len(opened)}", "changelog/0", StoreResources.of_size(8 << 20, 8 << 20)
        )
        opened.append(store)
        store.write(entries, replay_from=None)
        return store

    yield write
    for store in opened:
        store.close()


def stored_rollup_keys(store: PartitionStore) -> set[RollupKey]:
    return {key for key, _ in store.rollups(limit=1 << 40) or ()}


def test_changelog_rollup_entries_restore_the_same_rollups_and_tombstones_delete_them(stored):
    hour = ("tokens", "org", 'ö "1"', PeriodType.HOURLY, datetime(2026, 11, 24, 10, tzinfo=UTC), ())
    lifetime = ("tokens", "org", "o", LIFETIME, datetime(1970, 1, 1, tzinfo=UTC), ())
    big = Rollup(AggregationType.SUM, 3, Decimal("1" * 58 + ".5"), Decimal(BIG), Decimal("7"), 41, "tokens-v2")
    empty = Rollup(AggregationType.COUNT, version=0)
    entries = [
        changelog.rollup_entry(RollupChange.of(hour, big)),
        changelog.rollup_entry(RollupChange.of(lifetime, empty)),
    ]
    store = stored(entries)
    restored = PartitionRollups(timedelta(hours=1), stored=store)
    assert stored_rollup_keys(store) == {hour, lifetime}
    assert {
        key: (r.aggregation, r.count, r.sum, r.min, r.max, r.version, r.metric_id)
        for key in (hour, lifetime)
        if (r := restored.get(key)) is not None
    } == {
        hour: (AggregationType.SUM, 3, big.sum, big.min, big.max, 41, "tokens-v2"),
        lifetime: (AggregationType.COUNT, 0, Decimal(0), None, None, 0, None),
    }
    tombstoned = stored([*entries, (changelog.rollup_tombstone(hour), None)])
    assert stored_rollup_keys(tombstoned) == {lifetime}
    again = PartitionRollups(timedelta(hours=1), stored=tombstoned)
    assert again.get(hour) is None and again.get(lifetime) is not None


def test_changelog_entries_written_before_rollups_named_their_metric_still_restore(stored):
    rollup_key = ("tokens", "org", "o", PeriodType.DAILY, datetime(2026, 11, 24, tzinfo=UTC), ())
    key = changelog.rollup_tombstone(rollup_key)
    rollup = PartitionRollups(timedelta(hours=1), stored=stored([(key, b'["AVG",2,"3","1","2",9]')])).get(rollup_key)
    assert rollup is not None
    assert (rollup.total(), rollup.version, rollup.metric_id) == (Decimal("1.5"), 9, None)


def test_identity_entries_round_trip_with_their_times(stored):
    seen = datetime(2026, 11, 24, 10, 0, 30, tzinfo=UTC)
    identities = [(("org", "o", f"r{n}"), seen) for n in range(changelog.IDENTITIES_PER_ENTRY + 3)]
    entries = changelog.identities_entries(12, identities)
    assert [len(orjson.loads(value)) for _, value in entries] == [changelog.IDENTITIES_PER_ENTRY, 3]
    store = stored(entries)
    restored = PartitionRollups(timedelta(hours=1), stored=store)
    assert all(identity in restored.dedup for identity, _ in identities)
    assert ("org", "o", f"r{len(identities)}") not in restored.dedup
    # Each entry's newest identity time came through: the entries are seen at `seen`, not before it.
    assert list(store.identity_entries_before(seen)) == []
    assert list(store.identity_entries_before(seen + timedelta(seconds=1))) == [key for key, _ in entries]


@given(st.integers(min_value=-2_208_988_800_000, max_value=4_102_444_800_000))
def test_usage_records_times_are_written_as_clickhouse_datetime64_text_of_the_same_millisecond(ms):
    record = CountedRecord("org", "o", "r", "tokens", "tokens", AggregationType.SUM, Decimal(1), ms, "{}")
    [*_, times, _quantities, _metadata, _metric, _dimensions, _distinct] = orjson.loads(records_body([record]))
    assert datetime.fromisoformat(times[0]).replace(tzinfo=UTC) == record.timestamp
    assert len(times[0]) == len("2026-11-24 10:15:30.123")


@pytest.mark.parametrize("aggregation", MERGEABLE)
@pytest.mark.parametrize(
    "quantities", [[], ["7.50"], ["7.50", "7.50"], ["3", "-1E+2", BIG, "0.5"], ["2", "2.0", "1E+1"]]
)
def test_a_frozen_rollup_writes_the_texts_of_its_values_and_total(aggregation: AggregationType, quantities: list[str]):
    """The texts are shared where the values are the same object (a rollup of one record): never a wrong one."""
    at = datetime(2026, 11, 24, 10, tzinfo=UTC)
    state = PartitionRollups(timedelta(hours=1))
    records = [
        CountedRecord("org", "o", f"r{n}", "m", "m", aggregation, Decimal(q), int(at.timestamp() * 1000), "{}")
        for n, q in enumerate(quantities)
    ]
    state.apply(records, 0, at)
    rollups = state.rollups.items() if quantities else [(("m", "org", "o", LIFETIME, at, ()), Rollup(aggregation))]
    for key, rollup in rollups:
        change = RollupChange.of(key, rollup)
        assert (change.sum_text, change.min_text, change.max_text, change.total_text) == (
            str(rollup.sum),
            None if rollup.min is None else str(rollup.min),
            None if rollup.max is None else str(rollup.max),
            str(rollup.total()),
        )


@pytest.mark.parametrize("reset_period", list(ResetPeriod))
def test_a_routed_record_counts_all_time_only_for_a_metric_that_never_resets(reset_period: ResetPeriod):
    at = datetime(2026, 11, 24, 10, 15, tzinfo=UTC)
    metric = TOKENS.model_copy(update={"reset_period": reset_period})
    record = accepted("1", at, metric=metric)
    [routed] = routing.decode(routing.encode([record]))
    assert routed.all_time is (reset_period is ResetPeriod.NEVER)
    state = PartitionRollups(timedelta(hours=1))
    state.apply([routed], 0, at)
    assert sorted(str(key[3].value) for key in state.rollups) == sorted(
        ["DAILY", "HOURLY", "MONTHLY", *(["NEVER"] if reset_period is ResetPeriod.NEVER else [])]
    )


def test_an_accepted_record_has_the_routed_layout_the_rollup_stage_decodes():
    """The router encodes AcceptedRecord as it is and the rollup stage decodes CountedRecord: both are the one
    RoutedRecord layout, the quantity's type aside (a field added to one and not the other would shift every field
    after it)."""
    assert AcceptedRecord.__struct_fields__ == CountedRecord.__struct_fields__ == RoutedRecord.__struct_fields__
    assert AcceptedRecord.__struct_config__.array_like and CountedRecord.__struct_config__.array_like
    [decoded] = routing.decode(routing.encode([accepted("1", datetime(2026, 11, 24, tzinfo=UTC))]))
    assert type(decoded) is CountedRecord
    with pytest.raises(TypeError, match="all_time"):  # intake always says; only records of older workers lack it
        AcceptedRecord("org", "o", "r", "tokens", "tokens", AggregationType.SUM, "1", 0, "{}")  # type: ignore[call-arg]


def test_routed_bytes_stay_what_every_worker_wrote_and_reads():
    """The routed topic outlives any one worker version: these bytes, pinned from the layout's two struct
    definitions before they became one, decode the same."""
    records = [
        AcceptedRecord(
            "org",
            "ö-1",
            "r-1",
            "users",
            "users-v2",
            AggregationType.UNIQUE_COUNT,
            "-1.50E+3",
            1_764_000_000_123,
            '{"a":1}',
            True,
            (("model", "m"), ("region", "eu")),
            "u-7",
        ),
        AcceptedRecord("org", "o", "r-2", "tokens", "tokens", AggregationType.SUM, "2", 1_764_000_000_124, "{}", False),
    ]
    before_zones = (  # 12 fields a record, as written before time_zone was appended
        b"\x02\x92\x9c\xa3org\xa4\xc3\xb6-1\xa3r-1\xa5users\xa8users-v2\xacUNIQUE_COUNT\xa8-1.50E+3"
        b'\xcf\x00\x00\x01\x9a\xb6\x97\xe8{\xa7{"a":1}\xc3\x92\x92\xa5model\xa1m\x92\xa6region\xa2eu\xa3u-7'
        b"\x9c\xa3org\xa1o\xa3r-2\xa6tokens\xa6tokens\xa3SUM\xa12\xcf\x00\x00\x01\x9a\xb6\x97\xe8|\xa2{}\xc2\x90\xc0"
    )
    pinned = (  # 13: the subject's zone last ("" for UTC)
        b"\x02\x92\x9d\xa3org\xa4\xc3\xb6-1\xa3r-1\xa5users\xa8users-v2\xacUNIQUE_COUNT\xa8-1.50E+3"
        b'\xcf\x00\x00\x01\x9a\xb6\x97\xe8{\xa7{"a":1}\xc3\x92\x92\xa5model\xa1m\x92\xa6region\xa2eu\xa3u-7\xa0'
        b"\x9d\xa3org\xa1o\xa3r-2\xa6tokens\xa6tokens\xa3SUM\xa12\xcf\x00\x00\x01\x9a\xb6\x97\xe8|\xa2{}\xc2\x90\xc0"
        b"\xa0"
    )
    assert routing.encode(records) == pinned
    expected = [
        (*msgspec.structs.astuple(r)[:6], Decimal(r.quantity), *msgspec.structs.astuple(r)[7:]) for r in records
    ]
    assert [msgspec.structs.astuple(r) for r in routing.decode(pinned)] == expected
    assert [msgspec.structs.astuple(r) for r in routing.decode(before_zones)] == expected
