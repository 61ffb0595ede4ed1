"""Rollups of metrics that read the payload (issue 15), without I/O: UNIQUE_COUNT over hours, days and months, LATEST
with its ties, dimension rows beside the total row, duplicates, cardinality bounds, the changelog round trip, and
thresholds on a dimension row."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from counted_records import counted, ms, view
from hypothesis import HealthCheck, given, settings, strategies as st

from metering_pipeline.usage.meter import Dimensions
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.periods import EPOCH, rollup_starts
from metering_pipeline.usage.rollups import (
    LIFETIME,
    CardinalityLimits,
    PartitionRollups,
    Rollup,
    RollupChange,
    RollupKey,
    ValuesRollup,
)
from metering_pipeline.usage.routed_record import CountedRecord
from metering_pipeline.usage.thresholds import APPROACHING, EXCEEDED, PartitionThresholds, ThresholdBook, dimensions_of
from metering_pipeline.worker import changelog
from metering_pipeline.worker.state_store import PartitionStore, StoreResources
from metering_schemas import AggregationType, MetricDefinition, PeriodType, ResetPeriod, UsageThreshold

UTC = UTC
SUM, COUNT, LATEST, UNIQUE = (
    AggregationType.SUM,
    AggregationType.COUNT,
    AggregationType.LATEST,
    AggregationType.UNIQUE_COUNT,
)
HOURLY, DAILY, MONTHLY = PeriodType.HOURLY, PeriodType.DAILY, PeriodType.MONTHLY
NOW = datetime(2026, 11, 24, 12, 30, tzinfo=UTC)
WINDOW = timedelta(days=2)  # dedup window
DAY = datetime(2026, 11, 24, tzinfo=UTC)
NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)


def user(record_id: str, at: datetime, who: str, dimensions: Dimensions = (), **fields: Any) -> CountedRecord:
    return counted(record_id, at, aggregation=UNIQUE, distinct=who, dimensions=dimensions, **fields)


def latest(record_id: str, at: datetime, quantity: str, dimensions: Dimensions = (), **fields: Any) -> CountedRecord:
    return counted(record_id, at, quantity, aggregation=LATEST, dimensions=dimensions, **fields)


def key(
    period: PeriodType | ResetPeriod,
    start: datetime,
    dimensions: Dimensions = (),
    subject: str = "o",
    metric: str = "m",
) -> RollupKey:
    return (metric, "org", subject, period, start, dimensions)


def lifetime(dimensions: Dimensions = (), **fields: Any) -> RollupKey:
    return key(LIFETIME, EPOCH, dimensions, **fields)


def hour_of(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def rollups_of(state: PartitionRollups) -> dict[RollupKey, Rollup]:
    """Every rollup of the state: in RAM, and (over a store) in the store, as the state reads it."""
    keys = list(state.rollups)
    if isinstance(state.stored, PartitionStore):
        keys += (key for key, _ in state.stored.rollups(limit=1 << 40) or ())
    return {k: rollup for k in dict.fromkeys(keys) if (rollup := state.get(k)) is not None}


def totals(state: PartitionRollups) -> dict[RollupKey, Decimal]:
    return {k: rollup.total() for k, rollup in rollups_of(state).items()}


def state_view(state: PartitionRollups) -> dict[RollupKey, tuple]:
    return {k: view(rollup) for k, rollup in rollups_of(state).items()}


def exact_view(state: PartitionRollups) -> dict[RollupKey, tuple]:
    """`state_view` with every Decimal also by its text (exactness: no lost digits, no changed exponent)."""
    return {
        k: tuple((v, str(v)) if isinstance(v, Decimal) else v for v in value) for k, value in state_view(state).items()
    }


# --- UNIQUE_COUNT over hours, days and months ------------------------------------------------------------------------


def test_a_days_distinct_count_is_counted_over_the_day_not_summed_from_its_hours():
    state = PartitionRollups(WINDOW)
    ten, eleven = DAY.replace(hour=10, minute=5), DAY.replace(hour=11, minute=50)
    assert state.apply([user("a", ten, "u1"), user("b", eleven, "u1"), user("c", eleven, "u2")], 0, NOW) == (3, 0)
    found = totals(state)
    assert found[key(HOURLY, hour_of(ten))] == 1
    assert found[key(HOURLY, hour_of(eleven))] == 2
    assert found[key(DAILY, DAY)] == 2  # not 1 + 2
    assert found[key(MONTHLY, NOVEMBER)] == 2
    assert found[lifetime()] == 2
    assert state.rollups[key(DAILY, DAY)].count == 3  # record_count still counts records
    assert state.rollups[key(DAILY, DAY)].values == {"u1", "u2"}


def test_one_user_in_two_hours_counts_one_in_each_hour_and_one_in_the_day_and_month():
    state = PartitionRollups(WINDOW)
    state.apply([user("a", DAY.replace(hour=3), "u1"), user("b", DAY.replace(hour=20), "u1")], 0, NOW)
    assert totals(state) == {
        key(HOURLY, DAY.replace(hour=3)): 1,
        key(HOURLY, DAY.replace(hour=20)): 1,
        key(DAILY, DAY): 1,
        key(MONTHLY, NOVEMBER): 1,
        lifetime(): 1,
    }


def test_distinct_values_across_a_day_and_a_month_boundary_count_in_each_period_they_touch():
    before, after = datetime(2026, 11, 30, 23, 30, tzinfo=UTC), datetime(2026, 12, 1, 0, 30, tzinfo=UTC)
    state = PartitionRollups(timedelta(days=60))
    state.apply([user("a", before, "u1"), user("b", after, "u1"), user("c", after, "u2")], 0, after)
    found = totals(state)
    assert (
        found[key(DAILY, datetime(2026, 11, 30, tzinfo=UTC))],
        found[key(DAILY, datetime(2026, 12, 1, tzinfo=UTC))],
    ) == (1, 2)
    assert (found[key(MONTHLY, NOVEMBER)], found[key(MONTHLY, datetime(2026, 12, 1, tzinfo=UTC))]) == (1, 2)
    assert found[lifetime()] == 2


def test_distinct_values_are_compared_as_strings():
    state = PartitionRollups(WINDOW)
    state.apply(
        [
            user("a", NOW, "1"),
            user("b", NOW, "1.0"),
            user("c", NOW, "01"),
            user("d", NOW, "1"),
            user("e", NOW, ""),
            user("f", NOW, ""),
        ],
        0,
        NOW,
    )
    assert state.rollups[key(DAILY, DAY)].values == {"1", "1.0", "01", ""}
    assert totals(state)[key(DAILY, DAY)] == 4


def test_distinct_counts_per_dimension_row_and_in_the_total_row():
    a, b = (("model", "a"),), (("model", "b"),)
    state = PartitionRollups(WINDOW)
    state.apply(
        [user("1", NOW, "u1", a), user("2", NOW, "u2", a), user("3", NOW, "u1", b), user("4", NOW, "u1", a)], 0, NOW
    )
    for period, start in (*rollup_starts(NOW), (LIFETIME, EPOCH)):
        assert state.rollups[key(period, start, a)].values == {"u1", "u2"}
        assert state.rollups[key(period, start, b)].values == {"u1"}
        assert state.rollups[key(period, start)].values == {"u1", "u2"}  # u1 in both rows counts once in the total
        assert totals(state)[key(period, start)] == 2
        assert (state.rollups[key(period, start, a)].count, state.rollups[key(period, start)].count) == (3, 4)


def _periods(at: datetime, all_time: bool) -> list[tuple[PeriodType | ResetPeriod, datetime]]:
    return [*rollup_starts(at), *([(LIFETIME, EPOCH)] if all_time else [])]


# Records over the last days of November and the first of December: hours, days and a month boundary.
MOMENTS = st.integers(0, 5 * 24 * 4 - 1).map(lambda n: datetime(2026, 11, 28, tzinfo=UTC) + timedelta(minutes=15 * n))
DIMENSIONS = st.sampled_from(
    [(), (("model", "a"),), (("model", "b"),), (("model", "a"), ("region", "eu")), (("model", ""), ("region", "us"))]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            MOMENTS,
            st.sampled_from(["u1", "u2", "u3", "u4", "", "7"]),
            DIMENSIONS,
            st.decimals(-100, 100, places=3, allow_nan=False),
        ),
        max_size=40,
    ),
    st.booleans(),
)
def test_unique_counts_equal_the_distinct_values_of_each_rows_records_in_each_period(draws, all_time):
    records = [
        user(f"r{n}", at, who, dims, quantity=str(q), all_time=all_time) for n, (at, who, dims, q) in enumerate(draws)
    ]
    state = PartitionRollups(timedelta(days=60))
    state.apply(records, 0, datetime(2026, 12, 3, tzinfo=UTC))
    expected: dict[RollupKey, set[str]] = defaultdict(set)
    records_in: dict[RollupKey, list[CountedRecord]] = defaultdict(list)
    for record in records:
        for period, start in _periods(record.timestamp, all_time):
            for row in {(), record.dimensions}:
                expected[key(period, start, row)].add(record.distinct)
                records_in[key(period, start, row)].append(record)
    assert set(state.rollups) == set(expected)
    for row, values in expected.items():
        rollup = state.rollups[row]
        assert rollup.values == values and rollup.total() == len(values)
        assert rollup.count == len(records_in[row])
        assert rollup.sum == sum((r.quantity for r in records_in[row]), Decimal(0))


# --- LATEST --------------------------------------------------------------------------------------------------------


def test_latest_is_the_quantity_of_the_latest_record_whatever_order_they_arrive_in():
    ten, eleven = DAY.replace(hour=10, minute=59), DAY.replace(hour=11, minute=1)
    records = [
        latest("early", DAY.replace(hour=10, minute=1), "5"),
        latest("late-ten", ten, "7.50"),
        latest("eleven", eleven, "3"),
    ]
    for order in (records, records[::-1], [records[1], records[2], records[0]]):
        state = PartitionRollups(WINDOW)
        for offset, record in enumerate(order):  # one message each
            state.apply([record], offset, NOW)
        found = {k: (r.total(), str(r.total())) for k, r in state.rollups.items()}
        assert found[key(HOURLY, DAY.replace(hour=10))] == (Decimal("7.50"), "7.50")  # the hour's latest
        assert found[key(HOURLY, DAY.replace(hour=11))] == (Decimal(3), "3")
        assert found[key(DAILY, DAY)] == found[key(MONTHLY, NOVEMBER)] == found[lifetime()] == (Decimal(3), "3")


def test_a_tie_in_time_goes_to_the_greatest_id_as_a_string_in_every_period():
    at = DAY.replace(hour=9)
    tied = [latest("r10", at, "10"), latest("r9", at, "9"), latest("r1", at, "1"), latest("R99", at, "99")]
    for order in (tied, tied[::-1], tied[1:] + tied[:1]):
        state = PartitionRollups(WINDOW)
        state.apply(order, 0, NOW)
        for rollup in state.rollups.values():
            assert (rollup.total(), rollup.latest_id, rollup.latest_ms) == (Decimal(9), "r9", ms(at))  # "r9" > "r10"


def test_a_later_millisecond_beats_a_greater_id():
    at = DAY.replace(hour=9)
    state = PartitionRollups(WINDOW)
    state.apply([latest("b", at + timedelta(milliseconds=1), "2"), latest("z", at, "26")], 0, NOW)
    assert {r.total() for r in state.rollups.values()} == {Decimal(2)}


def test_latest_per_dimension_row_and_in_the_total_row():
    a, b = (("model", "a"),), (("model", "b"),)
    state = PartitionRollups(WINDOW)
    state.apply(
        [
            latest("1", NOW - timedelta(minutes=20), "1", a),
            latest("2", NOW - timedelta(minutes=10), "2", b),
            latest("3", NOW - timedelta(minutes=25), "3", a),
        ],
        0,
        NOW,
    )
    found = totals(state)
    assert found[key(DAILY, DAY, a)] == 1 and found[key(DAILY, DAY, b)] == 2 and found[key(DAILY, DAY)] == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            MOMENTS,
            st.sampled_from(["a", "b", "aa", "b0", "é", "Z"]),
            st.decimals(-1000, 1000, places=4, allow_nan=False),
            DIMENSIONS,
        ),
        max_size=30,
        unique_by=lambda t: t[1] + str(t[0]),
    ),
    st.randoms(use_true_random=False),
    st.integers(1, 5),
)
def test_latest_in_every_row_and_period_is_the_max_by_time_then_id_whatever_the_order_and_messages(draws, rng, chunk):
    records = [latest(f"{name}@{at.isoformat()}", at, str(q), dims) for at, name, q, dims in draws]
    shuffled = list(records)
    rng.shuffle(shuffled)
    state = PartitionRollups(timedelta(days=60))
    for offset, start in enumerate(range(0, len(shuffled), chunk)):
        state.apply(shuffled[start : start + chunk], offset, datetime(2026, 12, 3, tzinfo=UTC))
    best: dict[RollupKey, CountedRecord] = {}
    for record in records:
        for period, start in _periods(record.timestamp, True):
            for row in {(), record.dimensions}:
                k = key(period, start, row)
                if k not in best or (record.timestamp_ms, record.record_id) > (best[k].timestamp_ms, best[k].record_id):
                    best[k] = record
    assert set(state.rollups) == set(best)
    for k, record in best.items():
        rollup = state.rollups[k]
        assert (rollup.total(), str(rollup.total()), rollup.latest_ms, rollup.latest_id) == (
            record.quantity,
            str(record.quantity),
            record.timestamp_ms,
            record.record_id,
        )
        change = RollupChange.of(k, rollup)
        assert (change.total_text, change.latest) == (
            str(record.quantity),
            (str(record.quantity), record.timestamp_ms, record.record_id),
        )


# --- grouped metrics: a total row and a row per combination ----------------------------------------------------------


def test_a_grouped_metric_has_a_total_row_and_one_row_per_combination_with_exact_sums():
    a_eu, a_us, b_eu = (
        (("model", "a"), ("region", "eu")),
        (("model", "a"), ("region", "us")),
        (("model", "b"), ("region", "eu")),
    )
    state = PartitionRollups(WINDOW)
    touched: set = set()
    state.apply(
        [
            counted("1", NOW, "0.1", dimensions=a_eu),
            counted("2", NOW, "0.2", dimensions=a_eu),
            counted("3", NOW, "12345678901234567890.123456789012345678", dimensions=a_us),
            counted("4", NOW, "-1.5", dimensions=b_eu),
        ],
        0,
        NOW,
        touched,
    )
    for period, start in (*rollup_starts(NOW), (LIFETIME, EPOCH)):
        rows = {k[5]: (r.count, r.total()) for k, r in state.rollups.items() if k[3] is period and k[4] == start}
        assert rows == {
            (): (4, Decimal("12345678901234567888.923456789012345678")),
            a_eu: (2, Decimal("0.3")),
            a_us: (1, Decimal("12345678901234567890.123456789012345678")),
            b_eu: (1, Decimal("-1.5")),
        }
    assert len(state.rollups) == 4 * 4 and touched == set(state.rollups)
    assert str(state.rollups[key(DAILY, DAY, a_eu)].total()) == "0.3"


def test_count_min_max_and_avg_keep_their_meaning_in_every_row():
    a, b = (("k", "a"),), (("k", "b"),)
    for aggregation, expected_total, expected_a in (
        (COUNT, 3, 2),
        (AggregationType.MAX, Decimal(9), Decimal(5)),
        (AggregationType.MIN, Decimal(1), Decimal(1)),
        (AggregationType.AVG, Decimal(5), Decimal(3)),
    ):
        state = PartitionRollups(WINDOW)
        state.apply(
            [
                counted("1", NOW, "1", aggregation=aggregation, dimensions=a),
                counted("2", NOW, "5", aggregation=aggregation, dimensions=a),
                counted("3", NOW, "9", aggregation=aggregation, dimensions=b),
            ],
            0,
            NOW,
        )
        assert (state.rollups[key(DAILY, DAY)].total(), state.rollups[key(DAILY, DAY, a)].total()) == (
            expected_total,
            expected_a,
        ), aggregation


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(MOMENTS, DIMENSIONS, st.decimals(-(10**6), 10**6, places=18, allow_nan=False)), max_size=30))
def test_grouped_sums_are_exact_and_the_total_row_is_every_records_sum(draws):
    records = [counted(f"r{n}", at, str(q), dimensions=dims) for n, (at, dims, q) in enumerate(draws)]
    state = PartitionRollups(timedelta(days=60))
    state.apply(records, 0, datetime(2026, 12, 3, tzinfo=UTC))
    expected: dict[RollupKey, list[Decimal]] = defaultdict(list)
    for record in records:
        for period, start in _periods(record.timestamp, True):
            for row in {(), record.dimensions}:
                expected[key(period, start, row)].append(record.quantity)
    assert set(state.rollups) == set(expected)
    for k, quantities in expected.items():
        assert (state.rollups[k].count, state.rollups[k].total()) == (len(quantities), sum(quantities, Decimal(0)))


# --- duplicates ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["grouped", "unique", "latest"])
def test_a_duplicate_record_id_is_counted_once_for_every_kind(kind):
    a, b = (("model", "a"),), (("model", "b"),)
    make = {
        "grouped": lambda at, q, dims, who: counted("dup", at, q, dimensions=dims),
        "unique": lambda at, q, dims, who: user("dup", at, who, dims, quantity=q),
        "latest": lambda at, q, dims, who: latest("dup", at, q, dims),
    }[kind]
    state = PartitionRollups(WINDOW)
    assert state.apply([make(NOW - timedelta(minutes=5), "2", a, "u1")], 0, NOW) == (1, 0)
    before = state_view(state)
    state.checkpoint()
    # The same id again: the same record, or one that differs in everything but its id (later, other row, value).
    touched: set = set()
    assert state.apply([make(NOW - timedelta(minutes=5), "2", a, "u1"), make(NOW, "40", b, "u2")], 1, NOW, touched) == (
        0,
        2,
    )
    assert state_view(state) == before and touched == set()
    checkpoint = state.checkpoint()
    assert checkpoint.rollups == [] and checkpoint.records == [] and checkpoint.distinct == []


def test_a_duplicate_within_one_message_is_counted_once():
    state = PartitionRollups(WINDOW)
    assert state.apply(
        [
            user("x", NOW, "u1"),
            user("x", NOW, "u2"),
            latest("y", NOW, "1", metric="l"),
            latest("y", NOW + timedelta(seconds=1), "2", metric="l"),
        ],
        0,
        NOW,
    ) == (2, 2)
    assert state.rollups[key(DAILY, DAY)].values == {"u1"}
    assert state.rollups[key(DAILY, DAY, metric="l")].total() == 1


# --- cardinality limits ---------------------------------------------------------------------------------------------


def test_a_new_combination_past_the_bound_is_refused_whole_and_changes_no_rollup():
    a, b, c = (("model", "a"),), (("model", "b"),), (("model", "c"),)
    state = PartitionRollups(WINDOW, CardinalityLimits(combinations=2))
    assert state.apply([counted("1", NOW, "1", dimensions=a), counted("2", NOW, "2", dimensions=b)], 0, NOW) == (2, 0)
    state.checkpoint()
    before = exact_view(state)
    touched: set = set()
    refused = counted("3", NOW, "5", dimensions=c)
    assert state.apply([refused], 1, NOW, touched) == (0, 0)
    assert exact_view(state) == before and touched == set()  # the total row included: nothing half counted
    checkpoint = state.checkpoint()
    [(offset, record, why)] = checkpoint.limited
    assert (offset, record) == (1, refused) and "METERING_MAX_DIMENSION_COMBINATIONS" in why and "2" in why
    assert checkpoint.rollups == [] and checkpoint.records == [] and checkpoint.identities == []
    assert not checkpoint.is_empty()  # the refusal itself must be written (dead-lettered)


def test_a_record_refused_at_a_bound_is_not_remembered_as_seen():
    a, b = (("model", "a"),), (("model", "b"),)
    state = PartitionRollups(WINDOW, CardinalityLimits(combinations=1))
    state.apply([counted("1", NOW, dimensions=a)], 0, NOW)
    assert state.apply([counted("2", NOW, dimensions=b)], 1, NOW) == (0, 0)
    state.limits = CardinalityLimits(combinations=2)  # raised (a restart with a higher bound)
    assert state.apply([counted("2", NOW, dimensions=b)], 2, NOW) == (1, 0)  # counted now: not a duplicate
    assert state.rollups[key(DAILY, DAY, b)].count == 1 and state.rollups[key(DAILY, DAY)].count == 2


def test_records_of_known_combinations_still_count_at_the_bound():
    a, b, c = (("model", "a"),), (("model", "b"),), (("model", "c"),)
    state = PartitionRollups(WINDOW, CardinalityLimits(combinations=2))
    state.apply([counted("1", NOW, "1", dimensions=a), counted("2", NOW, "2", dimensions=b)], 0, NOW)
    assert state.apply(
        [
            counted("3", NOW, "3", dimensions=c),
            counted("4", NOW, "4", dimensions=a),
            counted("5", NOW, "5", dimensions=b),
            counted("6", NOW, "6"),
        ],
        1,
        NOW,
    ) == (3, 0)
    assert [r.record_id for _, r, _ in state.checkpoint().limited] == ["3"]
    assert totals(state)[key(DAILY, DAY)] == 1 + 2 + 4 + 5 + 6  # an ungrouped record of the metric: the total row only
    assert totals(state)[key(DAILY, DAY, a)] == 5 and key(DAILY, DAY, c) not in state.rollups


def test_the_combination_bound_is_per_subject_and_metric():
    a, b = (("model", "a"),), (("model", "b"),)
    state = PartitionRollups(WINDOW, CardinalityLimits(combinations=1))
    assert state.apply(
        [
            counted("1", NOW, dimensions=a),
            counted("2", NOW, dimensions=b, subject="other"),
            counted("3", NOW, dimensions=b, metric="n"),
        ],
        0,
        NOW,
    ) == (3, 0)
    assert state.apply([counted("4", NOW, dimensions=b)], 1, NOW) == (0, 0)


def test_a_new_combination_in_a_new_hour_is_refused_when_its_day_is_at_the_bound():
    a, b = (("model", "a"),), (("model", "b"),)
    state = PartitionRollups(WINDOW, CardinalityLimits(combinations=1))
    state.apply([counted("1", NOW - timedelta(hours=3), dimensions=a)], 0, NOW)
    before = exact_view(state)
    assert state.apply([counted("2", NOW, dimensions=b)], 1, NOW) == (0, 0)  # a fresh hour, but not a fresh day
    assert exact_view(state) == before


def test_a_new_distinct_value_past_the_bound_is_refused_and_known_values_still_count():
    state = PartitionRollups(WINDOW, CardinalityLimits(distinct_values=2))
    state.apply([user("1", NOW, "u1"), user("2", NOW, "u2")], 0, NOW)
    state.checkpoint()
    before = exact_view(state)
    touched: set = set()
    assert state.apply([user("3", NOW, "u3")], 1, NOW, touched) == (0, 0)
    assert exact_view(state) == before and touched == set()
    [(offset, record, why)] = state.checkpoint().limited
    assert (offset, record.record_id) == (1, "3") and "METERING_MAX_DISTINCT_VALUES" in why
    assert state.apply([user("4", NOW, "u1"), user("5", NOW + timedelta(hours=1), "u2")], 2, NOW) == (2, 0)
    assert state.rollups[key(DAILY, DAY)].count == 4 and totals(state)[key(DAILY, DAY)] == 2
    checkpoint = state.checkpoint()
    assert checkpoint.limited == [] and checkpoint.distinct == [(key(HOURLY, hour_of(NOW) + timedelta(hours=1)), "u2")]


def test_the_distinct_bound_counts_in_every_period_and_row_the_record_would_touch():
    a, b = (("model", "a"),), (("model", "b"),)
    state = PartitionRollups(WINDOW, CardinalityLimits(distinct_values=2))
    state.apply([user("1", NOW, "u1", a), user("2", NOW, "u2", b)], 0, NOW)  # each row 1 value, the total row 2
    before = exact_view(state)
    assert state.apply([user("3", NOW + timedelta(hours=1), "u3", a)], 1, NOW) == (
        0,
        0,
    )  # its row has room, the total not
    assert exact_view(state) == before and len(state.checkpoint().limited) == 1


def test_eviction_frees_the_combination_count():
    a, b = (("model", "a"),), (("model", "b"),)
    october = datetime(2026, 10, 10, 9, tzinfo=UTC)
    state = PartitionRollups(WINDOW, CardinalityLimits(combinations=1))
    state.apply([counted("1", october, dimensions=a, all_time=False)], 0, NOW)
    assert state.apply([counted("2", october, dimensions=b, all_time=False)], 1, NOW) == (0, 0)
    state.checkpoint()
    evicted = state.evict_before(NOVEMBER + timedelta(hours=1))  # October's hour, day and month, both rows each
    assert {k[5] for k, _ in evicted} == {(), a} and len(evicted) == 6 and state.rollups == {}
    # The same period again (no eviction horizon given): its combination count started over.
    assert state.apply([counted("2", october, dimensions=b, all_time=False)], 2, NOW) == (1, 0)
    assert state.apply([counted("3", october, dimensions=a, all_time=False)], 3, NOW) == (0, 0)  # at the bound again


# --- the changelog round trip ----------------------------------------------------------------------------------------

A, B, C = (("model", "a"),), (("model", "b"),), (("model", "c"),)


def _rounds() -> list[list[CountedRecord]]:
    """Messages over two days and a month boundary, for a grouped SUM, a grouped UNIQUE_COUNT, a grouped LATEST and a
    plain SUM metric."""
    t = datetime(2026, 11, 30, 22, 15, tzinfo=UTC)
    return [
        [
            counted("s1", t, "0.1", dimensions=A, metric="sum"),
            counted("s2", t, "2", dimensions=B, metric="sum"),
            user("u1", t, "alice", A, metric="uniq"),
            user("u2", t, "bob", B, metric="uniq"),
            latest("l1", t, "5", A, metric="last"),
            counted("p1", t, "1.5", metric="plain"),
        ],
        [
            user("u3", t + timedelta(hours=1), "alice", B, metric="uniq"),
            latest("l2", t - timedelta(minutes=5), "8", B, metric="last"),  # earlier than l1: the total keeps l1
            latest("l3", t + timedelta(hours=2), "1.250", A, metric="last"),
            counted("s3", t + timedelta(hours=2), "0.2", dimensions=A, metric="sum"),
        ],
        [
            user("u4", t + timedelta(hours=2), "carol", A, metric="uniq"),
            counted("p2", t, "3", metric="plain"),
            latest("l4", t + timedelta(hours=2), "9", A, metric="last"),
        ],  # a tie with l3: "l4" > "l3"
    ]


def _continuation() -> list[CountedRecord]:
    t = datetime(2026, 12, 1, 3, tzinfo=UTC)
    return [
        user("u1", t, "zed", A, metric="uniq"),  # a duplicate id: not counted
        user("u5", t, "alice", A, metric="uniq"),
        user("u6", t, "dave", A, metric="uniq"),
        user("u7", t, "erin", C, metric="uniq"),  # a third combination: past the bound of 2
        latest("l5", t - timedelta(hours=4), "0", A, metric="last"),  # late: wins nothing
        latest("l6", t + timedelta(minutes=1), "2", B, metric="last"),
        latest("l4", t + timedelta(hours=1), "99", A, metric="last"),  # a duplicate id
        counted("s4", t, "0.7", dimensions=B, metric="sum"),
        counted("s1", t, "100", dimensions=A, metric="sum"),
        counted("p3", t, "1", metric="plain"),
    ]


LIMITS = CardinalityLimits(combinations=2, distinct_values=1_000)


def _entries(checkpoint) -> list[tuple[bytes, bytes | None]]:
    """A checkpoint's changelog entries, as the worker writes them."""
    return [
        *map(changelog.rollup_entry, checkpoint.rollups),
        *changelog.distinct_entries(checkpoint.distinct),
        *changelog.identities_entries(checkpoint.generation, checkpoint.identities),
    ]


def _store(path: Path, entries: list[tuple[bytes, bytes | None]]) -> PartitionStore:
    """The entries written into a partition's store at `path`, as a restore writes them."""
    store, _ = PartitionStore.open(path, "changelog/0", StoreResources.of_size(8 << 20, 8 << 20))
    store.write(entries, replay_from=None)
    return store


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[Callable[[list[tuple[bytes, bytes | None]]], PartitionStore]]:
    """`_store` in the test's tmp_path, one store per call, closed after the test."""
    opened: list[PartitionStore] = []

    def write(entries: list[tuple[bytes, bytes | None]]) -> PartitionStore:
        opened.append(_store(tmp_path / f"p{len(opened)}", entries))
        return opened[-1]

    yield write
    for store in opened:
        store.close()


def test_payload_state_restored_from_its_changelog_equals_the_original_and_continues_exactly(stored):
    seen = datetime(2026, 12, 1, 4, tzinfo=UTC)
    original = PartitionRollups(timedelta(days=10), LIMITS)
    entries: list = []
    for offset, records in enumerate(_rounds()):
        original.apply(records, offset, seen)
        entries += _entries(original.checkpoint())
    restored = PartitionRollups(timedelta(days=10), LIMITS, stored=stored(entries))
    assert exact_view(restored) == exact_view(original)
    last = original.rollups[key(DAILY, datetime(2026, 12, 1, tzinfo=UTC), metric="last")]
    assert (last.latest_id, last.total()) == ("l4", Decimal(9))
    assert original.rollups[key(MONTHLY, NOVEMBER, metric="uniq")].values == {"alice", "bob"}
    # Both go on alike: duplicates, new and known distinct values, a combination past the bound, late LATEST records.
    more = _continuation()
    assert original.apply(more, 10, seen) == restored.apply(more, 10, seen) == (6, 3)
    assert exact_view(restored) == exact_view(original)
    left, right = original.checkpoint(), restored.checkpoint()
    assert sorted(left.rollups) == sorted(right.rollups)
    assert sorted(left.distinct) == sorted(right.distinct)
    assert (
        [(o, r.record_id) for o, r, _ in left.limited]
        == [(o, r.record_id) for o, r, _ in right.limited]
        == [(10, "u7")]
    )


def test_a_restored_latest_rollup_keeps_its_time_and_id_to_decide_later_ties(stored):
    at = DAY.replace(hour=8, minute=30)
    original = PartitionRollups(WINDOW)
    original.apply([latest("m", at, "1")], 0, NOW)
    restored = PartitionRollups(WINDOW, stored=stored(_entries(original.checkpoint())))
    for state in (original, restored):
        state.apply(
            [latest("a", at, "2"), latest("n", at - timedelta(milliseconds=1), "3")], 1, NOW
        )  # lose on id, time
        assert {r.total() for r in rollups_of(state).values()} == {Decimal(1)}
        state.apply([latest("z", at, "4")], 2, NOW)  # wins the tie
        assert {(r.total(), r.latest_id, r.latest_ms) for r in rollups_of(state).values()} == {
            (Decimal(4), "z", ms(at))
        }


@pytest.mark.parametrize(
    ("first", "between"), [(LATEST, SUM), (UNIQUE, SUM), (LATEST, COUNT), (UNIQUE, LATEST), (SUM, LATEST)]
)
def test_a_period_whose_aggregation_type_changed_and_changed_back_restores_and_continues_alike(first, between, stored):
    """A definition change applies to the records processed after it; a restart in between must not change what the
    period's rollups become (exactly once across restores)."""

    def make(record_id: str, at: datetime, quantity: str, aggregation: AggregationType) -> CountedRecord:
        return counted(
            record_id, at, quantity, aggregation=aggregation, distinct=f"v{quantity}" if aggregation is UNIQUE else None
        )

    original = PartitionRollups(WINDOW)
    original.apply([make("a", NOW, "5", first)], 0, NOW)
    original.apply([make("b", NOW - timedelta(minutes=1), "1", between)], 1, NOW)
    restored = PartitionRollups(WINDOW, stored=stored(_entries(original.checkpoint())))
    assert totals(restored) == totals(original)
    for state in (original, restored):  # the definition changed back
        state.apply([make("c", NOW - timedelta(minutes=2), "7", first)], 2, NOW)
    assert totals(restored) == totals(original)
    assert {k: r.count for k, r in rollups_of(restored).items()} == {k: r.count for k, r in original.rollups.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["uniq", "last", "sum"]),
            MOMENTS,
            st.sampled_from(["r1", "r2", "r3", "r4", "r5", "r6"]),
            st.sampled_from(["u1", "u2", "u3"]),
            st.sampled_from([(), A, B, C]),
            st.decimals(-50, 50, places=2, allow_nan=False),
        ),
        min_size=1,
        max_size=40,
    ),
    st.lists(st.integers(0, 40), max_size=4),
    st.integers(0, 40),
)
def test_any_checkpointed_history_restores_to_the_same_state_and_continues_alike(tmp_path_factory, draws, cuts, split):
    def make(name, at, record_id, who, dims, q):
        if name == "uniq":
            return user(record_id, at, who, dims, quantity=str(q), metric=name)
        if name == "last":
            return latest(record_id, at, str(q), dims, metric=name)
        return counted(record_id, at, str(q), dimensions=dims, metric=name)

    records = [make(*draw) for draw in draws]
    head, tail = records[:split], records[split:]
    seen = datetime(2026, 12, 3, tzinfo=UTC)
    original = PartitionRollups(timedelta(days=10), LIMITS)
    entries: list = []
    bounds = sorted({0, *[c for c in cuts if c < len(head)], len(head)})
    # Consecutive pairs of bounds: bounds[1:] is one shorter, so the last bound only ends a pair.
    for offset, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        original.apply(head[start:end], offset, seen)
        entries += _entries(original.checkpoint())
    # A store per example (tmp_path is one per test, and hypothesis runs many examples in it).
    store = _store(tmp_path_factory.mktemp("history") / "p0", entries)
    try:
        restored = PartitionRollups(timedelta(days=10), LIMITS, stored=store)
        assert exact_view(restored) == exact_view(original)
        assert original.apply(tail, 100, seen) == restored.apply(tail, 100, seen)
        assert exact_view(restored) == exact_view(original)
        left, right = original.checkpoint(), restored.checkpoint()
        assert [r.record_id for _, r, _ in left.limited] == [r.record_id for _, r, _ in right.limited]
        assert sorted(left.distinct) == sorted(right.distinct)
    finally:
        store.close()


def test_evicted_entries_tombstone_a_rollup_and_each_of_its_distinct_values(stored):
    october = datetime(2026, 10, 10, 9, tzinfo=UTC)
    state = PartitionRollups(WINDOW)
    state.apply(
        [
            user("1", october, "u1", A, all_time=False),
            user("2", october, "u2", A, all_time=False),
            counted("3", october, "4", metric="plain", all_time=False),
            user("4", NOW, "u9", A, all_time=False),
        ],
        0,
        NOW,
    )
    entries = _entries(state.checkpoint())
    evicted = state.evict_before(NOVEMBER + timedelta(hours=1))
    assert len(evicted) == 3 * 2 + 3  # October's hour, day and month: uniq total and row A, plain total
    tombstones = []
    for evicted_key, rollup in evicted:
        keys = changelog.evicted_entries(evicted_key, rollup)
        assert keys[0] == changelog.rollup_tombstone(evicted_key)
        if evicted_key[0] == "m":
            assert sorted(keys[1:]) == sorted(changelog.distinct_entry(evicted_key, v) for v in ("u1", "u2"))
        else:
            assert keys[1:] == []
        tombstones += [(entry_key, None) for entry_key in keys]
    restored = rollups_of(PartitionRollups(WINDOW, stored=stored(entries + tombstones)))
    assert set(restored) == set(state.rollups)  # November's rollups stay, October's are gone
    assert restored[key(DAILY, DAY, A)].values == {"u9"}
    # Tombstoned distinct values are gone too: were the rollup written again, it would start without them.
    october_day = key(DAILY, datetime(2026, 10, 10, tzinfo=UTC), A)
    fresh = ValuesRollup(UNIQUE, 1, Decimal(1), Decimal(1), Decimal(1), 9, "m")
    again = rollups_of(
        PartitionRollups(
            WINDOW,
            stored=stored(entries + tombstones + [changelog.rollup_entry(RollupChange.of(october_day, fresh))]),
        )
    )
    assert again[october_day].values == set()
    without = rollups_of(
        PartitionRollups(WINDOW, stored=stored(entries + [changelog.rollup_entry(RollupChange.of(october_day, fresh))]))
    )
    assert without[october_day].values == {"u1", "u2"}  # (the control: without the tombstones they would be back)


def test_distinct_entries_are_written_once_per_new_value_of_each_rollup():
    state = PartitionRollups(WINDOW)
    state.apply([user("1", NOW, "u1", A), user("2", NOW, "u1", A), user("3", NOW, "u2", B)], 0, NOW)
    first = state.checkpoint().distinct
    periods = _periods(NOW, True)
    assert sorted(first) == sorted(
        [(key(p, s, A), "u1") for p, s in periods]
        + [(key(p, s), "u1") for p, s in periods]
        + [(key(p, s, B), "u2") for p, s in periods]
        + [(key(p, s), "u2") for p, s in periods]
    )
    state.apply([user("4", NOW, "u1", B)], 1, NOW)
    assert sorted(state.checkpoint().distinct) == sorted((key(p, s, B), "u1") for p, s in periods)  # the total knew u1


# --- RollupChange ----------------------------------------------------------------------------------------------------


def test_rollup_changes_of_latest_and_unique_count_write_their_totals():
    state = PartitionRollups(WINDOW)
    state.apply(
        [
            latest("a", NOW - timedelta(minutes=1), "7.50", metric="l"),
            latest("b", NOW, "2.0", metric="l"),
            user("c", NOW, "u1", quantity="3", metric="u"),
            user("d", NOW, "u2", quantity="4", metric="u"),
            user("e", NOW, "u1", quantity="5", metric="u"),
            counted("f", NOW, "1.5", metric="s"),
        ],
        0,
        NOW,
    )
    changes = {(c.key[0], c.key[3]): c for c in state.checkpoint().rollups}
    last = changes[("l", DAILY)]
    assert (last.aggregation, last.total_text, last.latest, last.count) == (LATEST, "2.0", ("2.0", ms(NOW), "b"), 2)
    assert (last.sum_text, last.min_text, last.max_text) == ("9.50", "2.0", "7.50")
    unique = changes[("u", DAILY)]
    assert (unique.aggregation, unique.total_text, unique.latest, unique.count, unique.sum_text) == (
        UNIQUE,
        "2",
        None,
        3,
        "12",
    )
    assert changes[("s", DAILY)].latest is None and changes[("s", DAILY)].total_text == "1.5"
    assert all(change.reported == (change.key[3] is not LIFETIME) for change in changes.values())


def test_a_rollup_change_is_frozen_at_its_checkpoint():
    state = PartitionRollups(WINDOW)
    state.apply([latest("a", NOW, "1"), user("b", NOW, "u1", metric="u")], 0, NOW)
    changes = state.checkpoint().rollups
    state.apply([latest("c", NOW + timedelta(seconds=1), "2"), user("d", NOW, "u2", metric="u")], 1, NOW)
    assert {(c.key[0], c.total_text, c.latest) for c in changes if c.key[3] is DAILY} == {
        ("m", "1", ("1", ms(NOW), "a")),
        ("u", "1", None),
    }


# --- thresholds on a dimension row -----------------------------------------------------------------------------------

GROUPED_TOKENS = MetricDefinition(
    id="tokens",
    key="tokens",
    name="t",
    aggregation_type=SUM,
    reset_period=ResetPeriod.MONTHLY,
    group_by={"model": "$.metadata.model"},
)
EIGHTY = Decimal("0.8")


def threshold(threshold_id: str, value: str, dimensions: dict[str, str] | None = None) -> UsageThreshold:
    return UsageThreshold(
        id=threshold_id,
        metric_key="tokens",
        subject_type="org",
        subject_id="o",
        threshold=Decimal(value),
        dimensions=dimensions or {},
    )


def tokens(record_id: str, quantity: str, model: str) -> CountedRecord:
    return counted(record_id, NOW, quantity, dimensions=(("model", model),), metric="tokens")


def grouped_partition(*thresholds: UsageThreshold) -> tuple[PartitionRollups, PartitionThresholds]:
    rollups, book = PartitionRollups(WINDOW), ThresholdBook()
    for t in thresholds:
        book.put(t)
    checks = PartitionThresholds(rollups, book, MetricCatalog({"tokens": GROUPED_TOKENS}), EIGHTY)
    checks.after_threshold_changes(NOW)
    return rollups, checks


def _apply(rollups: PartitionRollups, checks: PartitionThresholds, offset: int, *records: CountedRecord) -> list:
    touched: set = set()
    rollups.apply(list(records), offset, NOW, touched)
    return checks.after_records(touched, NOW)


def test_the_book_indexes_thresholds_by_the_row_they_watch():
    book = ThresholdBook()
    row, total, wide = (
        threshold("row", "1", {"model": "a"}),
        threshold("total", "1"),
        threshold("wide", "1", {"region": "eu", "model": "a"}),
    )
    for t in (row, total, wide):
        book.put(t)
    assert dimensions_of(wide) == (("model", "a"), ("region", "eu")) and dimensions_of(total) == ()
    assert [t.id for t in book.matching("tokens", "org", "o", (("model", "a"),))] == ["row"]
    assert [t.id for t in book.matching("tokens", "org", "o")] == ["total"]
    assert [t.id for t in book.matching("tokens", "org", "o", (("model", "a"), ("region", "eu")))] == ["wide"]
    assert book.matching("tokens", "org", "o", (("model", "b"),)) == []


def test_a_dimension_threshold_fires_only_when_its_row_crosses_and_a_plain_one_watches_the_total():
    rollups, checks = grouped_partition(threshold("row-a", "10", {"model": "a"}), threshold("total", "15"))
    alerts = _apply(rollups, checks, 0, tokens("1", "6", "a"), tokens("2", "5", "b"))
    assert alerts == []  # a: 6 (< 8), the total: 11 (< 12)
    alerts = _apply(rollups, checks, 1, tokens("3", "9", "b"))  # b's row: 14; a's row unchanged; the total 20
    assert [(a.threshold.id, a.type, a.value) for a in alerts] == [("total", APPROACHING, 20), ("total", EXCEEDED, 20)]
    alerts = _apply(rollups, checks, 2, tokens("4", "5", "a"))  # a's row: 11 > 10
    assert sorted((a.threshold.id, a.type, a.value) for a in alerts) == [
        ("row-a", APPROACHING, 11),
        ("row-a", EXCEEDED, 11),
    ]
    event = alerts[0].to_event().model_dump(mode="json", by_alias=True)
    assert (event["dimensions"], event["value"], event["threshold"], event["periodType"]) == (
        {"model": "a"},
        "11",
        "10",
        "MONTHLY",
    )
    assert _apply(rollups, checks, 3, tokens("5", "50", "a")) == []  # once per window


def test_alerts_on_a_dimension_row_carry_its_dimensions_and_plain_ones_none():
    rollups, checks = grouped_partition(threshold("row-b", "1", {"model": "b"}), threshold("total", "1"))
    alerts = _apply(rollups, checks, 0, tokens("1", "5", "b"))
    events = {(a.threshold.id, a.type): a.to_event().model_dump(mode="json", by_alias=True) for a in alerts}
    assert set(events) == {(t, kind) for t in ("row-b", "total") for kind in (APPROACHING, EXCEEDED)}
    assert all(e["dimensions"] == ({"model": "b"} if t == "row-b" else {}) for (t, _), e in events.items())


def test_dimension_alert_ids_are_deterministic_and_differ_from_the_totals():
    def run() -> list[str]:
        rollups, checks = grouped_partition(threshold("row-a", "10", {"model": "a"}), threshold("total", "10"))
        return [a.id for a in _apply(rollups, checks, 0, tokens("1", "11", "a"))]

    first = run()
    assert first == run() and len(first) == len(set(first)) == 4
    assert all(
        i.startswith(("row-a/org:o/MONTHLY/2026-11-01T00:00:00Z/", "total/org:o/MONTHLY/2026-11-01T00:00:00Z/"))
        for i in first
    )


def test_a_new_dimension_threshold_applies_to_its_rows_usage_already_recorded():
    rollups, checks = grouped_partition()
    rollups.apply([tokens("1", "9", "a"), tokens("2", "30", "b")], 0, NOW)
    checks.book.put(threshold("row-a", "10", {"model": "a"}))
    alerts = checks.after_threshold_changes(NOW)
    assert [(a.type, a.value, a.to_event().dimensions) for a in alerts] == [(APPROACHING, 9, {"model": "a"})]
