"""The pure part of dimension queries: parsing groupBy/filterGroupBy, merging dimension rows exactly, and which
groups must be computed from the records (UNIQUE_COUNT, LATEST)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import click
import pytest

from metering_pipeline.cli.metric import _filter, _group_by
from metering_pipeline.usage.aggregation import total
from metering_pipeline.warehouse.grouping import (
    DimensionError,
    DimensionQuery,
    DimensionRow,
    check_names,
    filters_from_query,
    group_rows,
    pairs_from_options,
    summary_id,
    threshold_dimensions_problem,
)
from metering_schemas import AggregationType, MetricDefinition

UTC = UTC
H10, H11, H12 = (datetime(2026, 11, 24, h, tzinfo=UTC) for h in (10, 11, 12))


def row(
    dims: dict[str, str],
    count: int,
    sum_: str,
    low: str,
    high: str,
    total: str | None = None,
    kind: AggregationType = AggregationType.SUM,
    start: datetime = H10,
) -> DimensionRow:
    end = H11 if start == H10 else H12
    return DimensionRow(
        start,
        end,
        kind,
        dims,
        Decimal(total if total is not None else sum_),
        count,
        Decimal(sum_),
        Decimal(low),
        Decimal(high),
    )


# model × region rows of one hour: gpt-4/eu (2 records: 1, 4), gpt-4/us (1 record: 10), mini/eu (3 records: 2, 2, 3)
ROWS = [
    ({"model": "gpt-4", "region": "eu"}, 2, "5", "1", "4"),
    ({"model": "gpt-4", "region": "us"}, 1, "10", "10", "10"),
    ({"model": "mini", "region": "eu"}, 3, "7", "2", "3"),
]


def rows_of(kind: AggregationType, totals: dict[str, str] | None = None) -> list[DimensionRow]:
    """The rows as the worker writes them: total_quantity is the row's own value of `kind` (or `totals`')."""
    return [
        row(
            dims,
            count,
            sum_,
            low,
            high,
            (totals or {}).get(dims["model"] + "/" + dims["region"])
            or str(total(kind, count, Decimal(sum_), Decimal(low), Decimal(high))),
            kind,
        )
        for dims, count, sum_, low, high in ROWS
    ]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (AggregationType.COUNT, {("gpt-4",): Decimal(3), ("mini",): Decimal(3)}),
        (AggregationType.SUM, {("gpt-4",): Decimal(15), ("mini",): Decimal(7)}),
        (AggregationType.MIN, {("gpt-4",): Decimal(1), ("mini",): Decimal(2)}),
        (AggregationType.MAX, {("gpt-4",): Decimal(10), ("mini",): Decimal(3)}),
        # 15 / 3 = 5; 7 / 3 rounded half-even to 18 places, like the worker's AVG
        (AggregationType.AVG, {("gpt-4",): Decimal(5), ("mini",): Decimal("2.333333333333333333")}),
    ],
)
def test_grouping_by_a_subset_of_dimensions_merges_rows_exactly_for_addable_types(kind, expected):
    groups = group_rows(rows_of(kind), DimensionQuery.of(["model"]))
    assert {g.values: g.merged_total(kind) for g in groups} == expected
    assert {g.values: g.record_count() for g in groups} == {("gpt-4",): 3, ("mini",): 3}
    assert not any(g.needs_records(kind) for g in groups)


def test_a_single_row_group_is_the_stored_value_as_is_even_for_unique_count_and_latest():
    totals = {"gpt-4/eu": "2", "gpt-4/us": "1", "mini/eu": "2"}
    for kind in (AggregationType.UNIQUE_COUNT, AggregationType.LATEST):
        groups = group_rows(rows_of(kind, totals), DimensionQuery.of(["model", "region"]))
        assert [(g.values, g.merged_total(kind)) for g in groups] == [
            (("gpt-4", "eu"), Decimal(2)),
            (("gpt-4", "us"), Decimal(1)),
            (("mini", "eu"), Decimal(2)),
        ]
        assert not any(g.needs_records(kind) for g in groups)


@pytest.mark.parametrize("kind", [AggregationType.UNIQUE_COUNT, AggregationType.LATEST])
def test_several_rows_of_unique_count_or_latest_are_never_added(kind):
    groups = group_rows(rows_of(kind, {"gpt-4/eu": "2", "gpt-4/us": "1", "mini/eu": "2"}), DimensionQuery.of(["model"]))
    by_value = {g.values: g for g in groups}
    assert by_value[("gpt-4",)].needs_records(kind)  # two rows: distinct values may overlap; the latest is unknown
    assert not by_value[("mini",)].needs_records(kind)
    with pytest.raises(ValueError, match="cannot be added up"):
        by_value[("gpt-4",)].merged_total(kind)


def test_filters_keep_only_rows_holding_the_value_and_group_per_period():
    rows = [
        *rows_of(AggregationType.SUM),
        row({"model": "gpt-4", "region": "eu"}, 1, "100", "100", "100", start=H11),
        row({"model": "gpt-4"}, 1, "1000", "1000", "1000"),
    ]  # written before `region` was a dimension
    query = DimensionQuery.of([], {"region": "eu"})
    groups = group_rows(rows, query)
    assert [(g.period_start, g.values, g.merged_total(AggregationType.SUM)) for g in groups] == [
        (H10, (), Decimal(12)),
        (H11, (), Decimal(100)),
    ]
    assert query.labels(()) == {"region": "eu"}
    # Grouped by region, the old row's missing name reads "" (as ClickHouse's map access does).
    by_region = group_rows(rows, DimensionQuery.of(["region"]))
    assert [(g.period_start, g.values) for g in by_region] == [
        (H10, ("",)),
        (H10, ("eu",)),
        (H10, ("us",)),
        (H11, ("eu",)),
    ]


def test_rows_of_a_period_that_straddles_a_change_of_type_use_the_definitions_type():
    rows = [
        row({"model": "a"}, 2, "6", "1", "5", kind=AggregationType.SUM),
        row({"model": "a", "region": "x"}, 1, "3", "3", "3", kind=AggregationType.MAX),
    ]
    [group] = group_rows(rows, DimensionQuery.of(["model"]))
    assert group.aggregation(AggregationType.MAX) is AggregationType.MAX
    assert group.merged_total(AggregationType.MAX) == Decimal(5)
    assert group.needs_records(AggregationType.UNIQUE_COUNT)


def test_filter_group_by_is_read_from_the_deep_object_query_form():
    items = [
        ("metricKey", "tokens"),
        ("filterGroupBy[model]", "gpt-4"),
        ("filterGroupBy[region]", ""),
        ("filterGroupBy[model]", "gpt-4"),
    ]
    assert filters_from_query(items) == {"model": "gpt-4", "region": ""}
    for bad in (
        [("filterGroupBy", "model:gpt-4")],
        [("filterGroupBy[]", "x")],
        [("filterGroupBy[a b]", "x")],
        [("filterGroupBy[model]", "a"), ("filterGroupBy[model]", "b")],
        [("filterGroupBy[model]", "x" * 1025)],
    ):
        with pytest.raises(DimensionError) as raised:
            filters_from_query(bad)
        assert raised.value.field.startswith("filterGroupBy") and raised.value.code == "validation_error"


def test_unknown_dimension_names_are_refused_naming_the_metrics_dimensions():
    query = DimensionQuery.of(["model", "model"], {"tier": "pro"})
    assert query.group_by == ("model",) and query.names() == ["model", "tier"]
    with pytest.raises(DimensionError) as raised:
        query.check({"model": "$.metadata.model", "region": "$.metadata.region"}, "tokens")
    assert (raised.value.field, raised.value.code) == ("filterGroupBy[tier]", "unknown_dimension")
    assert "model, region" in str(raised.value)
    with pytest.raises(DimensionError, match="it has no groupBy"):
        DimensionQuery.of(["model"]).check({}, "calls")
    DimensionQuery.of(["region"], {"model": "a"}).check({"model": "p", "region": "p"}, "tokens")
    with pytest.raises(DimensionError):
        check_names(["model", "has space"])
    with pytest.raises(DimensionError):
        check_names([f"d{n}" for n in range(11)])


def test_cli_pairs_and_metric_options_parse_or_say_what_is_expected():
    assert pairs_from_options(["model=gpt-4", "region=", "url=a=b"], "--dimension") == {
        "model": "gpt-4",
        "region": "",
        "url": "a=b",
    }
    for bad in (["model"], ["=x"], ["model=a", "model=b"]):
        with pytest.raises(DimensionError):
            pairs_from_options(bad, "--dimension")
    assert _group_by(("model=$.metadata.model", "tier=$.metadata.plan.tier")) == {
        "model": "$.metadata.model",
        "tier": "$.metadata.plan.tier",
    }
    assert _filter(("$.metadata.region=eu,us", "$.metadata.region=us,ap", "$.metadata.ok=true")) == {
        "$.metadata.region": ["eu", "us", "ap"],
        "$.metadata.ok": ["true"],
    }
    for parse, bad in (
        (_group_by, ("model",)),
        (_group_by, ("a=$.metadata.a", "a=$.metadata.b")),
        (_filter, ("$.metadata.x",)),
    ):
        with pytest.raises(click.BadParameter):
            parse(bad)


def test_summary_ids_are_the_seeds_for_total_rows_and_distinct_and_bounded_for_dimension_rows():
    base = "tokens:org:o:HOURLY:2026-11-24T10:00:00+00:00"
    assert summary_id("tokens", "org", "o", "HOURLY", H10, {}) == base
    assert (
        summary_id("tokens", "org", "o", "HOURLY", H10, {"region": "eu", "model": "gpt 4"})
        == f"{base}:model=gpt%204&region=eu"
    )
    assert summary_id("tokens", "org", "o", "HOURLY", H10, {"m": "a&b=c"}) != summary_id(
        "tokens", "org", "o", "HOURLY", H10, {"m": "a", "b": "c"}
    )
    long = summary_id("tokens", "org", "o", "HOURLY", H10, {"model": "x" * 1024})
    assert len(long) <= 256 and long.startswith(f"{base}:sha256=")


def test_threshold_dimensions_must_name_every_groupby_dimension_of_the_metric():
    grouped = MetricDefinition(
        id="t",
        key="tokens",
        name="t",
        aggregation_type="SUM",
        group_by={"model": "$.metadata.model", "region": "$.metadata.region"},
    )
    plain = MetricDefinition(id="c", key="calls", name="c", aggregation_type="COUNT")
    assert threshold_dimensions_problem({}, [grouped]) is None  # the total row
    assert threshold_dimensions_problem({"model": "a", "region": "eu"}, [grouped]) is None
    assert "expected: model, region; got: model" in threshold_dimensions_problem({"model": "a"}, [grouped])
    assert threshold_dimensions_problem({"model": "a", "region": "eu", "x": "1"}, [grouped]) is not None
    assert "no groupBy" in threshold_dimensions_problem({"model": "a"}, [plain])
