"""Exact aggregates of usage quantities: COUNT, SUM, AVG, MAX, MIN from one running state.

One state (count, sum, min, max) serves every aggregation type, so a metric's type can be
read at query time and late records fold in the same way as on-time ones. Arithmetic runs in
a decimal context that traps any rounding: a sum is exact or it fails loudly.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import Decimal

from metering_schemas import AggregationType

# Up to 76 significant digits (ClickHouse Decimal256 with 18 fractional digits); rounding is an error.
EXACT = decimal.Context(prec=76, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow])
# AVG is the one value that is not exact by nature: it is rounded once, half-even, to 18 places.
AVG_PLACES = Decimal("1e-18")
_AVG = decimal.Context(prec=100, rounding=decimal.ROUND_HALF_EVEN)
# The types computed from (count, sum, min, max): rows of them merge exactly (hours into a month, dimension rows into
# a total). UNIQUE_COUNT and LATEST need their records' values (distinct strings; the latest time and id).
MERGEABLE = (AggregationType.COUNT, AggregationType.SUM, AggregationType.AVG, AggregationType.MAX, AggregationType.MIN)
FROM_RECORDS = frozenset({AggregationType.UNIQUE_COUNT, AggregationType.LATEST})  # over several rows: from the records


@dataclass(slots=True)
class Aggregate:
    count: int = 0
    sum: Decimal = Decimal(0)
    min: Decimal | None = None
    max: Decimal | None = None

    def add(self, quantity: Decimal) -> None:
        self.count += 1
        self.sum = EXACT.add(self.sum, quantity)
        if self.min is None or quantity < self.min:
            self.min = quantity
        if self.max is None or quantity > self.max:
            self.max = quantity

    def merge(self, other: Aggregate) -> None:
        if not other.count:
            return
        self.count += other.count
        self.sum = EXACT.add(self.sum, other.sum)
        self.min = other.min if self.min is None or (other.min is not None and other.min < self.min) else self.min
        self.max = other.max if self.max is None or (other.max is not None and other.max > self.max) else self.max

    def total(self, aggregation: AggregationType) -> Decimal:
        """The UsageSummary's totalQuantity for a metric of this aggregation type."""
        return total(aggregation, self.count, self.sum, self.min, self.max)


def total(
    aggregation: AggregationType, count: int, sum_: Decimal, low: Decimal | None, high: Decimal | None
) -> Decimal:
    """totalQuantity from the running state (count, sum, min, max) a metric of any aggregation type keeps."""
    if aggregation is AggregationType.COUNT:
        return Decimal(count)
    if aggregation is AggregationType.SUM:
        return sum_
    if not count:
        return Decimal(0)
    if aggregation is AggregationType.AVG:
        return _AVG.divide(sum_, Decimal(count)).quantize(AVG_PLACES, context=_AVG)
    if aggregation is AggregationType.MAX:
        return high  # type: ignore[return-value]  # not None once count > 0
    if aggregation is AggregationType.MIN:
        return low  # type: ignore[return-value]  # likewise
    raise ValueError(f"{aggregation.value} is not computed from count, sum, min and max: it needs its records' values")


def plain(value: Decimal) -> Decimal:
    """Without trailing zeros or an exponent: ClickHouse's Decimal(76, 18) 1850.500000000000000000 → 1850.5,
    1000.000… → 1000."""
    return value.quantize(Decimal(1), context=EXACT) if value == value.to_integral_value() else value.normalize(EXACT)
