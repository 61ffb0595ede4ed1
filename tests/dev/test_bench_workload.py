"""The bench's dimensions workload and its expected rows, without I/O: what `metering bench` checks ClickHouse
against."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest

from metering_dev.bench.hot_path import render_state_costs, state_costs
from metering_dev.bench.phases import STEADY_PHASE, THRESHOLD_METRIC, WARM_UP_SECONDS, Result, SteadyLoad
from metering_dev.bench.runner import DIMENSIONS_BASELINE, DIMENSIONS_PHASE, render, report
from metering_dev.bench.workload import (
    DIMENSION_METRICS,
    MODELS,
    REGIONS,
    DimensionExpected,
    DimensionWorkload,
    Workload,
)
from metering_pipeline.usage.meter import MeterReader
from metering_schemas import MetricDefinition

AT = datetime(2026, 11, 30, 10, 30, tzinfo=UTC)
TOKENS, USERS = DIMENSION_METRICS[0]["key"], DIMENSION_METRICS[1]["key"]


def meta(model: str, region: str, user: str, tokens: int) -> dict:
    return {"model": model, "region": region, "user": user, "tokens": tokens}


def test_expected_rows_by_hand() -> None:
    expected = DimensionExpected()
    expected.add(TOKENS, "s0", AT, meta("m1", "r1", "u1", 10))
    expected.add(TOKENS, "s0", AT, meta("m1", "r1", "u2", 5))
    expected.add(TOKENS, "s0", AT + timedelta(hours=1), meta("m2", "r1", "u1", 7))
    expected.add(TOKENS, "s1", AT, meta("m1", "r1", "u1", 1))
    expected.add(USERS, "s0", AT, meta("m1", "r1", "u1", 3))
    expected.add(USERS, "s0", AT, meta("m1", "r1", "u1", 3))  # same user, same hour
    expected.add(USERS, "s0", AT + timedelta(hours=1), meta("m1", "r1", "u1", 3))  # same user, next hour
    expected.add(USERS, "s0", AT + timedelta(hours=1), meta("m1", "r1", "u2", 3))
    expected.add(USERS, "s0", AT + timedelta(days=1), meta("m1", "r1", "u3", 3))  # next day
    expected.finish()

    m1r1, m2r1 = (("model", "m1"), ("region", "r1")), (("model", "m2"), ("region", "r1"))
    assert expected.monthly == {
        (TOKENS, "s0", ()): (Decimal(22), 3),
        (TOKENS, "s0", m1r1): (Decimal(15), 2),
        (TOKENS, "s0", m2r1): (Decimal(7), 1),
        (TOKENS, "s1", ()): (Decimal(1), 1),
        (TOKENS, "s1", m1r1): (Decimal(1), 1),
        (USERS, "s0", ()): (Decimal(3), 5),  # u1, u2, u3 over five records
    }
    hour = int(datetime(2026, 11, 30, 10, tzinfo=UTC).timestamp())
    day = int(datetime(2026, 11, 30, tzinfo=UTC).timestamp())
    assert expected.periods == {
        (USERS, "s0", "HOURLY", hour): (Decimal(1), 2),
        (USERS, "s0", "HOURLY", hour + 3600): (Decimal(2), 2),
        (USERS, "s0", "HOURLY", hour + 86400): (Decimal(1), 1),
        (USERS, "s0", "DAILY", day): (Decimal(2), 4),  # not 1 + 2: u1 is counted once over the day
        (USERS, "s0", "DAILY", day + 86400): (Decimal(1), 1),
    }
    assert expected.records() == 9


def workload(records: int = 4_000, subjects: int = 20, users: int = 300) -> DimensionWorkload:
    return DimensionWorkload(records, subjects, users, datetime(2026, 11, 30, 3, 15, tzinfo=UTC))


def recomputed(records: list[dict]) -> tuple[dict, dict]:
    """The expected rows again, the plain way, from the published records themselves."""
    sums: dict[tuple, Decimal] = defaultdict(Decimal)
    counts: dict[tuple, int] = defaultdict(int)
    users: dict[tuple, set[str]] = defaultdict(set)
    for record in records:
        metric, subject, metadata = record["metricKey"], record["subjectId"], record["metadata"]
        at = datetime.fromisoformat(record["timestamp"])
        if metric == TOKENS:
            for key in (
                (metric, subject, ()),
                (metric, subject, (("model", metadata["model"]), ("region", metadata["region"]))),
            ):
                sums[key] += Decimal(metadata["tokens"])
                counts[key] += 1
        else:
            for key in (
                (metric, subject, ()),
                (metric, subject, "HOURLY", at.strftime("%Y-%m-%dT%H")),
                (metric, subject, "DAILY", at.strftime("%Y-%m-%d")),
            ):
                users[key].add(metadata["user"])
                counts[key] += 1
    monthly = {key: (sums[key], counts[key]) for key in sums}
    monthly |= {key: (Decimal(len(values)), counts[key]) for key, values in users.items() if len(key) == 3}
    periods = {key: (Decimal(len(values)), counts[key]) for key, values in users.items() if len(key) == 4}
    return monthly, periods


def test_expected_rows_match_the_published_records() -> None:
    expected = DimensionExpected()
    records = [orjson.loads(value) for _, value in workload().messages(1, expected)]
    monthly, periods = recomputed(records)
    assert expected.monthly == monthly
    assert {
        (
            m,
            s,
            p,
            datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%dT%H" if p == "HOURLY" else "%Y-%m-%d"),
        ): v
        for (m, s, p, start), v in expected.periods.items()
    } == periods
    assert expected.records() == len(records) == 4_000
    # every total row is the sum of its dimension rows (the check compares both)
    for (metric, subject, dims), (total, count) in expected.monthly.items():
        if metric == TOKENS and dims == ():
            rows = [v for (m, s, d), v in expected.monthly.items() if (m, s) == (metric, subject) and d]
            assert total == sum(v[0] for v in rows) and count == sum(v[1] for v in rows)


def test_the_workload_spreads_over_every_combination_and_many_users() -> None:
    expected = DimensionExpected()
    records = [orjson.loads(value) for _, value in workload(20_000, 10, 1_000).messages(1, expected)]
    assert {r["metricKey"] for r in records} == {TOKENS, USERS}
    assert {r["metadata"]["model"] for r in records} == set(MODELS)
    assert {r["metadata"]["region"] for r in records} == set(REGIONS)
    for subject in range(10):
        combinations = [d for (m, s, d) in expected.monthly if m == TOKENS and s == f"s{subject}" and d]
        assert len(combinations) == 100
        distinct, count = expected.monthly[(USERS, f"s{subject}", ())]
        assert count == 1_000 and 600 <= distinct <= 1_000  # not a handful of users repeated
    assert max(int(r["metadata"]["user"][1:]) for r in records) < 1_000


def test_batches_carry_the_same_records() -> None:
    single = [orjson.loads(value) for _, value in workload(1_234).messages(1)]
    batched = [record for _, value in workload(1_234).messages(500) for record in orjson.loads(value)["records"]]
    assert batched == single


def test_the_definitions_are_valid_and_the_pipeline_reads_what_the_expectation_assumes() -> None:
    readers = {d["key"]: MeterReader(MetricDefinition.model_validate(d)) for d in DimensionWorkload.definitions()}
    for _, value in workload(200).messages(1):
        record = orjson.loads(value)
        reading = readers[record["metricKey"]].read(record["quantity"], record["metadata"])
        assert reading is not None
        if record["metricKey"] == TOKENS:
            assert Decimal(reading.quantity) == record["metadata"]["tokens"]  # valueProperty, not the quantity of 1
            assert reading.dimensions == (
                ("model", record["metadata"]["model"]),
                ("region", record["metadata"]["region"]),
            )
            assert reading.distinct is None
        else:
            assert reading.distinct == record["metadata"]["user"] and reading.dimensions == ()


def test_the_plain_workload_publishes_its_five_metrics() -> None:
    definitions = Workload.definitions()
    assert [MetricDefinition.model_validate(d).aggregation_type.value for d in definitions] == [
        "COUNT",
        "SUM",
        "AVG",
        "MAX",
        "MIN",
    ]


def test_the_report_compares_the_dimensions_phase_with_its_own_baseline() -> None:
    results = [Result(DIMENSIONS_BASELINE, 1000, 0.01), Result(DIMENSIONS_PHASE, 1000, 0.1, 0.2, 200.0)]
    costs = {
        "distinct_value@20000": {"bytes": 470.0, "values": 20_000},
        "dimension_combination": {"bytes": 700.0, "per_row": 233.3, "combinations": 19_800},
    }
    text = render(report(results, {DIMENSIONS_PHASE: 0}, {"dimensions": 100_000.0}, costs))
    line = next(line for line in text.splitlines() if DIMENSIONS_PHASE in line)
    assert "10,000" in line and "0.10" in line and "exact" in line
    assert "470 bytes per distinct value" in text and "700 bytes per dimension combination" in text


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_state_costs_are_positive_at_a_small_size() -> None:
    costs = state_costs((2_000,), 20)
    assert 50 < costs["distinct_value@2000"]["bytes"] < 5_000  # a set's table grows in steps: small sizes vary
    assert 100 < costs["dimension_combination"]["bytes"] < 5_000
    assert "bytes per distinct value" in render_state_costs(costs)


def test_the_steady_thresholds_trip_about_halfway_through_the_phase() -> None:
    load = SteadyLoad(rate=1_000.0, seconds=90.0, subjects=100, alerting=10)
    workload = Workload.recent(0, load.subjects)
    records = int(load.rate * (load.seconds + WARM_UP_SECONDS))
    totals: dict[str, Decimal] = defaultdict(Decimal)
    crossed_at: dict[str, int] = {}
    alerting = {threshold["subjectId"] for threshold in load.thresholds()}
    for n in range(records):
        metric, subject, quantity, _record = workload.record(n)
        if metric == THRESHOLD_METRIC and subject in alerting:
            totals[subject] += quantity
            if totals[subject] > load.limit():
                crossed_at.setdefault(subject, n)
    assert len(load.thresholds()) == 10 and alerting == {f"s{n}" for n in range(10)}
    assert set(crossed_at) == alerting  # every threshold trips, with time left for its alert
    assert all(records * 0.25 < n < records * 0.8 for n in crossed_at.values())


def test_the_report_states_the_steady_cost_against_the_backlog_cost() -> None:
    steady = Result(
        STEADY_PHASE,
        100_000,
        60.0,
        4.0,
        extra={
            "rate": 1_666.0,
            "cpu_us_per_record": 40.0,
            "backlog_cpu_us_per_record": 25.0,
            "cpu_vs_backlog": 1.6,
            "alerts_expected": 10,
            "alerts_received": 10,
            "latency_p50_s": 0.2,
            "latency_p99_s": 0.5,
            "freshness_p50_s": 1.0,
            "freshness_p99_s": 1.5,
        },
    )
    text = render(report([steady], {}, {}))
    assert "40.0 µs of worker CPU per record, 1.60× its 25.0 µs on the backlog" in text
    assert "p99 500 ms (10 of 10 alerts)" in text
    assert STEADY_PHASE not in text  # not a throughput row: its records/s is the rate it was fed
