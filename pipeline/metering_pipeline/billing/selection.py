"""The usage one price bills: its metric, optionally narrowed to dimension values, and how that usage is measured
exactly for each aggregation type. Pure: `invoicing.quantities` has the queries run, this decides what they mean."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from metering_pipeline.usage.aggregation import FROM_RECORDS, Aggregate, plain
from metering_pipeline.usage.periods import period_end, period_in, period_start
from metering_schemas import AggregationType, PeriodType, Price

_HOUR = timedelta(hours=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Selection:
    """What a price bills: the metric's total usage (no dimensions), or only the usage whose dimension values are the
    given ones (some or all of the metric's groupBy dimensions, each with one value). Hashable: the invoice looks a
    price's quantity up by it."""

    metric_key: str
    dimensions: tuple[tuple[str, str], ...] = ()  # sorted by name

    @classmethod
    def of(cls, price: Price) -> Selection:
        return cls(price.metric_key, tuple(sorted(price.dimensions.items())))

    @classmethod
    def total(cls, metric_key: str) -> Selection:
        return cls(metric_key)

    def matches(self, row_dimensions: Mapping[str, str]) -> bool:
        """Whether a rollup row belongs to this selection. Every record of a grouped metric is in its period's total
        row ({}) and in exactly one dimension row (all groupBy names as keys, "" where the record had none), so a
        selection without dimensions reads only the total row and one with dimensions only the dimension rows whose
        named keys have its values (a missing key reads as "", as in ClickHouse's `dimensions[k]`): neither counts a
        record twice."""
        if not self.dimensions:
            return not row_dimensions
        return bool(row_dimensions) and all(row_dimensions.get(name, "") == value for name, value in self.dimensions)

    def label(self) -> str:
        """How the invoice names the line: `tokens`, or `tokens (model=gpt-4, region=eu)`."""
        return line_label(self.metric_key, dict(self.dimensions))


def line_label(metric_key: str, dimensions: Mapping[str, str]) -> str:
    """A usage line's name: the metric key, with the price's dimensions (sorted by name) when it has any."""
    if not dimensions:
        return metric_key
    return f"{metric_key} ({', '.join(f'{name}={value}' for name, value in sorted(dimensions.items()))})"


@dataclass(frozen=True)
class RollupRow:
    """A metric's hourly rollups for one combination of dimensions ({} = its total row), merged over a segment's
    hours: record count, sum, min and max add up exactly across hours; the aggregation type is the latest hour's."""

    metric_key: str
    dimensions: Mapping[str, str]
    aggregation: AggregationType
    count: int
    sum: Decimal
    min: Decimal | None
    max: Decimal | None


def aggregation_of(rows: Iterable[RollupRow], metric_key: str) -> AggregationType | None:
    """The metric's aggregation type as its total row says (None: no usage in the segment)."""
    for row in rows:
        if row.metric_key == metric_key and not row.dimensions:
            return row.aggregation
    return None


def merged(rows: Iterable[RollupRow], selection: Selection) -> Aggregate:
    """The (count, sum, min, max) of the records the selection bills, from the rows that hold exactly them."""
    found = Aggregate()
    for row in rows:
        if row.metric_key == selection.metric_key and row.count and selection.matches(row.dimensions):
            found.merge(Aggregate(row.count, row.sum, row.min, row.max))
    return found


def quantity(rows: Iterable[RollupRow], selection: Selection) -> Decimal:
    """The selection's quantity for an aggregation that merges: COUNT, SUM, AVG, MIN, MAX."""
    rows = list(rows)
    aggregation = aggregation_of(rows, selection.metric_key)
    if aggregation is None:
        return Decimal(0)
    if aggregation in FROM_RECORDS:
        raise ValueError(f"{aggregation.value} is not a merge of rollup rows; count it over the usage records")
    return plain(merged(rows, selection).total(aggregation))


def hour_ceiling(at: datetime, zone_name: str = "UTC") -> datetime:
    """The first hour boundary (of the zone's hours) at or after `at`. Rollups bill an hour in the segment its start
    falls in, so the usage records of a segment [start, end) are those with timestamp in [hour_ceiling(start),
    hour_ceiling(end)): the same records, whichever source a price's quantity comes from."""
    if zone_name != "UTC":
        hour = period_in(PeriodType.HOURLY, zone_name)
        start = period_start(hour, at)
        return at if start == at else period_end(hour, start)
    behind = (at - _EPOCH) % _HOUR
    return at if not behind else at - behind + _HOUR
