"""Which usage a price bills (issue 15): the rollup rows a price's dimensions select, how they merge for each
aggregation type, the segment bounds the usage records are read over, and how lines are named."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from metering_pipeline.billing.selection import (
    FROM_RECORDS,
    RollupRow,
    Selection,
    aggregation_of,
    hour_ceiling,
    line_label,
    merged,
    quantity,
)
from metering_schemas import AggregationType, Price

D = Decimal
UTC = UTC


def rows(aggregation: AggregationType = AggregationType.SUM) -> list[RollupRow]:
    """tokens grouped by model and region over a segment: the total row and one row per combination seen."""

    def row(
        dimensions: dict[str, str], count: int, total: str, low: str, high: str, metric: str = "tokens"
    ) -> RollupRow:
        return RollupRow(metric, dimensions, aggregation, count, D(total), D(low), D(high))

    return [
        row({}, 8, "76.5", "1", "30"),
        row({"model": "gpt-4", "region": "eu"}, 2, "20", "5", "15"),
        row({"model": "gpt-4", "region": "us"}, 1, "0.5", "0.5", "0.5"),
        row({"model": "gpt-3.5", "region": "eu"}, 4, "40", "1", "30"),
        row({"model": "", "region": "eu"}, 1, "16", "16", "16"),  # records without a model
        row({"model": "gpt-4", "region": "ap"}, 0, "0", "0", "0"),  # an empty row never counts (its min would)
        row({}, 3, "1000", "1", "999", metric="other"),
    ]


def test_a_price_without_dimensions_bills_the_total_row_only():
    assert quantity(rows(), Selection("tokens")) == D("76.5")  # not 76.5 + the dimension rows' 76.5
    assert Selection.of(Price(metric_key="tokens", model="PER_UNIT", unit_price="1")) == Selection("tokens")


@pytest.mark.parametrize(
    ("dimensions", "count", "total", "low", "high"),
    [
        ({"model": "gpt-4"}, 3, "20.5", "0.5", "15"),  # a subset of the groupBy: both regions' rows
        ({"model": "gpt-4", "region": "eu"}, 2, "20", "5", "15"),  # every groupBy dimension: one row
        ({"region": "eu"}, 7, "76", "1", "30"),
        ({"model": ""}, 1, "16", "16", "16"),  # "" is the value of a record without one
        ({"model": "gpt-5"}, 0, "0", None, None),
    ],
)
def test_a_price_with_dimensions_merges_exactly_the_dimension_rows_with_its_values(dimensions, count, total, low, high):
    selection = Selection.of(Price(metric_key="tokens", model="PER_UNIT", unit_price="1", dimensions=dimensions))
    found = merged(rows(), selection)
    assert (found.count, found.sum, found.min, found.max) == (
        count,
        D(total),
        None if low is None else D(low),
        None if high is None else D(high),
    )


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        (AggregationType.COUNT, "3"),
        (AggregationType.SUM, "20.5"),
        (AggregationType.MIN, "0.5"),
        (AggregationType.MAX, "15"),
        (AggregationType.AVG, "6.833333333333333333"),  # 20.5 / 3, from the merged sum and count, rounded once
    ],
)
def test_each_mergeable_aggregation_of_a_dimension_subset_is_exact(aggregation, expected):
    assert quantity(rows(aggregation), Selection("tokens", (("model", "gpt-4"),))) == D(expected)


def test_rows_of_a_metric_without_usage_bill_zero():
    assert quantity(rows(), Selection("absent")) == D(0)
    assert quantity(rows(), Selection("absent", (("model", "x"),))) == D(0)
    assert aggregation_of(rows(AggregationType.MAX), "tokens") is AggregationType.MAX
    assert aggregation_of(rows(), "absent") is None


@pytest.mark.parametrize("aggregation", sorted(FROM_RECORDS, key=lambda a: a.value))
def test_unique_count_and_latest_are_never_merged_from_rows(aggregation):
    assert FROM_RECORDS == {AggregationType.UNIQUE_COUNT, AggregationType.LATEST}
    with pytest.raises(ValueError, match="usage records"):
        quantity(rows(aggregation), Selection("tokens"))


def test_selections_are_equal_whatever_the_order_of_the_price_dimensions():
    a = Price(metric_key="t", model="PER_UNIT", unit_price="1", dimensions={"model": "m", "region": "eu"})
    b = Price(metric_key="t", model="PER_UNIT", unit_price="1", dimensions={"region": "eu", "model": "m"})
    assert Selection.of(a) == Selection.of(b) and hash(Selection.of(a)) == hash(Selection.of(b))
    assert Selection.of(a) != Selection("t")


def test_lines_are_named_by_their_metric_and_dimensions():
    assert line_label("tokens", {}) == "tokens"
    assert line_label("tokens", {"region": "eu", "model": "gpt-4"}) == "tokens (model=gpt-4, region=eu)"
    assert Selection("tokens", (("model", ""),)).label() == "tokens (model=)"


@pytest.mark.parametrize(
    ("at", "ceiling"),
    [
        (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)),  # on the hour
        (datetime(2026, 11, 15, 10, 30, tzinfo=UTC), datetime(2026, 11, 15, 11, tzinfo=UTC)),  # mid-hour
        (datetime(2026, 11, 15, 10, 0, 0, 1, tzinfo=UTC), datetime(2026, 11, 15, 11, tzinfo=UTC)),
        (datetime(2026, 11, 30, 23, 59, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
    ],
)
def test_records_are_read_over_the_hours_whose_start_is_in_the_segment(at, ceiling):
    """An hour belongs to the segment its start falls in (as for the rollups), so a segment starting at 10:30 reads
    records from 11:00."""
    assert hour_ceiling(at) == ceiling
