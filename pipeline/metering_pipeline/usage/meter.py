"""What a metric reads from a record's payload: the quantity (valueProperty), the dimension values (groupBy),
whether the record counts at all (filter), and for UNIQUE_COUNT the value whose distinct strings are counted.

The router reads these once per record with the definition in force when it routes the record; the rollup stage only
folds what travels with it. Paths are `$.quantity` or `$.metadata.<name>[.<name>...]`; a value's string form (what
dimensions, filters and distinct counts compare) is a string as it is, `true`/`false`, a number as its JSON text in
plain decimal notation (`1.50` stays `1.50`, `0.0000001` stays so; only an exponent is written out: `1e3` → `1000`),
and "" for missing or null. The record's own quantity has the same form whichever way intake read it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, NamedTuple

from pydantic import TypeAdapter, ValidationError

from metering_schemas import AggregationType, MetricDefinition
from metering_schemas._base import Quantity
from metering_schemas.metric import QUANTITY_PATH

Dimensions = tuple[tuple[str, str], ...]  # (name, value) pairs sorted by name; () is the total row
TOTAL: Dimensions = ()
_QUANTITY = TypeAdapter(Quantity)  # the record model's own rules for a quantity
_MISSING = object()


class UnreadableRecord(ValueError):
    """The record lacks what its metric reads, or holds something it cannot read (an `invalid_record`)."""


class Reading(NamedTuple):
    quantity: str  # exact decimal text
    dimensions: Dimensions
    distinct: str | None  # UNIQUE_COUNT: the value's string form


def steps_of(path: str) -> tuple[str, ...]:
    """`$.metadata.a.b` → ("a", "b"); `$.quantity` → ()."""
    return () if path == QUANTITY_PATH else tuple(path.split(".")[2:])


def value_at(steps: tuple[str, ...], quantity: str, metadata: dict[str, Any]) -> Any:
    """The value at a path (the record's quantity as a number for `$.quantity`), or `_MISSING`."""
    if not steps:
        return Decimal(quantity)  # the fast path's text and the model's `str(Decimal)` can differ in notation only
    value: Any = metadata
    for step in steps:
        if not isinstance(value, dict):
            return _MISSING
        value = value.get(step, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def string_form(value: Any, path: str) -> str:
    """What dimensions, filters and distinct counts compare; objects and arrays have none."""
    if value is _MISSING or value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    raise UnreadableRecord(f"{path} holds a JSON {'object' if isinstance(value, dict) else 'array'}, not a scalar")


def quantity_at(steps: tuple[str, ...], path: str, quantity: str, metadata: dict[str, Any]) -> str:
    """The exact decimal text of a number or numeric string at `path`, under the record model's quantity rules."""
    if not steps:
        return quantity
    value = value_at(steps, quantity, metadata)
    if value is _MISSING or value is None:
        raise UnreadableRecord(f"{path} (valueProperty) is missing")
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        raise UnreadableRecord(f"{path} (valueProperty) is not a number")
    try:
        return str(_QUANTITY.validate_python(value))
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]["msg"]
        raise UnreadableRecord(f"{path} (valueProperty) is not a valid quantity: {problem}") from None


class MeterReader:
    """One definition's paths, split once; `read` runs once per routed record of the metric."""

    def __init__(self, definition: MetricDefinition) -> None:
        aggregation = definition.aggregation_type
        path = definition.value_property or QUANTITY_PATH
        self.unique = aggregation is AggregationType.UNIQUE_COUNT
        # COUNT ignores valueProperty; UNIQUE_COUNT counts distinct strings there and keeps the record's own quantity.
        self.value_path = path
        self.value_steps = steps_of(path)
        self.reads_quantity = aggregation is not AggregationType.COUNT and not self.unique and bool(self.value_steps)
        self.group_by = tuple(sorted((name, steps_of(p), p) for name, p in definition.group_by.items()))
        self.filter = tuple((steps_of(p), p, frozenset(values)) for p, values in definition.filter.items())

    def read(self, quantity: str, metadata: dict[str, Any]) -> Reading | None:
        """What the record contributes, or None when the filter leaves it out (neither counted nor dead-lettered)."""
        for steps, path, accepted in self.filter:
            if string_form(value_at(steps, quantity, metadata), path) not in accepted:
                return None
        dimensions = tuple(
            (name, string_form(value_at(steps, quantity, metadata), path)) for name, steps, path in self.group_by
        )
        distinct = None
        if self.unique:
            value = value_at(self.value_steps, quantity, metadata)
            if value is _MISSING or value is None:
                raise UnreadableRecord(f"{self.value_path} (valueProperty) is missing")
            distinct = string_form(value, self.value_path)
        if self.reads_quantity:
            quantity = quantity_at(self.value_steps, self.value_path, quantity, metadata)
        return Reading(quantity, dimensions, distinct)


def reads_payload(definition: MetricDefinition) -> bool:
    """Whether records of the metric need a MeterReader (most metrics read only `quantity`)."""
    path = definition.value_property
    return bool(
        definition.group_by
        or definition.filter
        or definition.aggregation_type is AggregationType.UNIQUE_COUNT
        or (path is not None and path != QUANTITY_PATH and definition.aggregation_type is not AggregationType.COUNT)
    )
