"""Grouping and filtering usage by dimensions at query time (usage.getSummary, usage.export): the pure part.

usage_rollups holds, per (metric, subject, period), the total row (`dimensions = {}`) and, for a metric with
`groupBy`, one row per combination of all its dimension values. A query that groups by (or filters on) only some
of them merges those rows: exactly for COUNT/SUM/AVG/MIN/MAX (their state — count, sum, min, max — adds up), never
for UNIQUE_COUNT and LATEST (distinct values and the latest record cannot be added): a group of more than one row
of those is computed from usage_records instead (see warehouse/queries.py).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from urllib.parse import quote

from metering_pipeline.usage.aggregation import FROM_RECORDS, Aggregate, plain, total
from metering_schemas import AggregationType, MetricDefinition
from metering_schemas.metric import DIMENSION_NAME_PATTERN, MAX_DIMENSION_NAME, MAX_DIMENSION_VALUE, MAX_GROUP_BY

FILTER_PARAMETER = "filterGroupBy"  # OpenMeter's name: `filterGroupBy[model]=gpt-4`
_DEEP_KEY = re.compile(r"^filterGroupBy\[([^\[\]]*)\]$")
_NAME_CHARACTERS = re.compile(DIMENSION_NAME_PATTERN)


def _is_name(text: str) -> bool:
    """What a metric's groupBy names can be (metering_schemas' DimensionName)."""
    return len(text) <= MAX_DIMENSION_NAME and _NAME_CHARACTERS.match(text) is not None


class DimensionError(ValueError):
    """A dimension query the metric cannot answer (unknown name, malformed pair); `field` says where, `code` what
    (the API's error code: `unknown_dimension` or `validation_error`)."""

    def __init__(self, field: str, message: str, code: str = "validation_error") -> None:
        super().__init__(message)
        self.field = field
        self.code = code


@dataclass(frozen=True)
class DimensionQuery:
    """Which dimension rows a query reads: grouped by `group_by` (in that order), only those whose value of every
    `filters` name equals its value. Empty (the default): the total rows only, as before dimensions existed."""

    group_by: tuple[str, ...] = ()
    filters: tuple[tuple[str, str], ...] = ()  # (name, value), sorted by name

    @classmethod
    def of(cls, group_by: Iterable[str] = (), filters: Mapping[str, str] | None = None) -> DimensionQuery:
        names = tuple(dict.fromkeys(group_by))  # a name given twice groups once
        return cls(names, tuple(sorted((filters or {}).items())))

    @property
    def is_total(self) -> bool:
        return not self.group_by and not self.filters

    def names(self) -> list[str]:
        """Every dimension name the query mentions (groupBy first)."""
        return list(dict.fromkeys([*self.group_by, *(name for name, _ in self.filters)]))

    def filter_names(self) -> list[str]:
        return [name for name, _ in self.filters]

    def filter_values(self) -> list[str]:
        return [value for _, value in self.filters]

    def labels(self, values: Sequence[str]) -> dict[str, str]:
        """A result row's `dimensions`: the groupBy names with the row's values, and the filters' pairs (a row of
        `filterGroupBy[model]=gpt-4` is the gpt-4 row even without `groupBy=model`)."""
        # zip's usual truncation, as it always was (labels(()) names the filters alone).
        return {**dict(zip(self.group_by, values, strict=False)), **dict(self.filters)}

    def check(self, metric_group_by: Iterable[str], metric_key: str) -> None:
        """Every name must be one of the metric's groupBy dimensions (else DimensionError)."""
        known = set(metric_group_by)
        for name in self.group_by:
            if name not in known:
                raise DimensionError("groupBy", _unknown(name, metric_key, known), "unknown_dimension")
        for name, _ in self.filters:
            if name not in known:
                raise DimensionError(
                    f"{FILTER_PARAMETER}[{name}]", _unknown(name, metric_key, known), "unknown_dimension"
                )


def _unknown(name: str, metric_key: str, known: set[str]) -> str:
    have = ", ".join(sorted(known)) if known else "none: it has no groupBy"
    return f"{name!r} is not a dimension of metric {metric_key!r} (its groupBy dimensions: {have})"


def check_names(group_by: Iterable[str]) -> None:
    """Shape of groupBy names (what a metric's groupBy may hold), before any metric is looked up."""
    names = list(group_by)
    for name in names:
        if not _is_name(name):
            raise DimensionError("groupBy", f"{name!r} is not a dimension name (letters, digits, _ . : -; 1 to 64)")
    if len(set(names)) > MAX_GROUP_BY:
        raise DimensionError("groupBy", f"at most {MAX_GROUP_BY} dimensions")


def threshold_dimensions_problem(dimensions: Mapping[str, str], candidates: Sequence[MetricDefinition]) -> str | None:
    """Why a threshold's `dimensions` name no dimension row of its metric (None: they do). Empty names the total row;
    else they must name exactly every groupBy dimension of the definition that applies (`candidates`: that one, or
    every definition of the key when none applies to the threshold's org)."""
    if not dimensions or any(set(d.group_by) == set(dimensions) for d in candidates):
        return None
    expected = " or ".join(sorted({", ".join(sorted(d.group_by)) or "none (it has no groupBy)" for d in candidates}))
    key = candidates[0].key if candidates else "?"
    return (
        f"dimensions must name every groupBy dimension of metric {key!r} exactly "
        f"(expected: {expected}; got: {', '.join(sorted(dimensions))})"
    )


def filters_from_query(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """`filterGroupBy[<name>]=<value>` query parameters (OpenMeter's deep-object form) → {name: value}.

    A name given twice with different values, a malformed key (`filterGroupBy`, `filterGroupBy[]`) or a
    value over 1024 characters is a DimensionError naming the parameter.
    """
    found: dict[str, str] = {}
    for key, value in items:
        if not key.startswith(FILTER_PARAMETER):
            continue
        match = _DEEP_KEY.match(key)
        if match is None or not _is_name(match.group(1)):
            raise DimensionError(
                key, f"expected {FILTER_PARAMETER}[<dimension>]=<value>, e.g. {FILTER_PARAMETER}[model]=gpt-4"
            )
        name = match.group(1)
        if len(value) > MAX_DIMENSION_VALUE:
            raise DimensionError(key, f"a dimension value has at most {MAX_DIMENSION_VALUE} characters")
        if found.get(name, value) != value:
            raise DimensionError(key, f"one value per dimension ({name!r} is given twice)")
        found[name] = value
    return found


def pairs_from_options(items: Iterable[str], option: str) -> dict[str, str]:
    """CLI `NAME=VALUE` options (repeatable) → {name: value}; the value may be empty (the records without one)."""
    found: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _is_name(name):
            raise DimensionError(option, f"expected NAME=VALUE, e.g. model=gpt-4 (got {item!r})")
        if found.get(name, value) != value:
            raise DimensionError(option, f"one value per dimension ({name!r} is given twice)")
        found[name] = value
    return found


@dataclass(frozen=True)
class DimensionRow:
    """One dimension row of usage_rollups (FINAL): its value and the state it was computed from."""

    period_start: datetime
    period_end: datetime
    aggregation: AggregationType
    dimensions: Mapping[str, str]
    total_quantity: Decimal
    record_count: int
    sum_quantity: Decimal
    min_quantity: Decimal
    max_quantity: Decimal


@dataclass
class Group:
    """The dimension rows of one period that one result row stands for."""

    period_start: datetime
    period_end: datetime
    values: tuple[str, ...]  # in the query's groupBy order
    rows: list[DimensionRow] = field(default_factory=list)

    def aggregation(self, defined: AggregationType | None) -> AggregationType:
        """The rows' own type (what the worker computed them as); if they disagree (the definition changed within
        the period), the definition's."""
        kinds = {row.aggregation for row in self.rows}
        if len(kinds) == 1:
            return next(iter(kinds))
        return defined if defined is not None else self.rows[-1].aggregation

    def record_count(self) -> int:
        return sum(row.record_count for row in self.rows)

    def needs_records(self, defined: AggregationType | None) -> bool:
        """True when the value cannot come from the rows: several rows of a type that does not add up."""
        return len(self.rows) > 1 and self.aggregation(defined) in FROM_RECORDS

    def merged_total(self, defined: AggregationType | None) -> Decimal:
        """One row: its value as stored. Several: merged exactly (sum of sums and counts, min of mins, max of maxes;
        AVG = sum / count rounded once like the worker's). Not for UNIQUE_COUNT/LATEST groups of several rows."""
        if len(self.rows) == 1:
            return plain(self.rows[0].total_quantity)
        kind = self.aggregation(defined)
        if kind in FROM_RECORDS:
            raise ValueError(f"{kind.value} rows cannot be added up; compute the group from usage_records")
        state = Aggregate()
        for row in self.rows:
            state.merge(Aggregate(row.record_count, row.sum_quantity, row.min_quantity, row.max_quantity))
        return plain(total(kind, state.count, state.sum, state.min, state.max))


def group_rows(rows: Iterable[DimensionRow], query: DimensionQuery) -> list[Group]:
    """The rows that match the query's filters, grouped per period and groupBy values, in period then value order.

    A name missing from a row's map (a row written before the metric grouped by it) reads "" — as in ClickHouse.
    Rows whose map does not hold a filtered name do not match.
    """
    groups: dict[tuple[datetime, tuple[str, ...]], Group] = {}
    for row in rows:
        if not row.dimensions or any(row.dimensions.get(name) != value for name, value in query.filters):
            continue
        values = tuple(row.dimensions.get(name, "") for name in query.group_by)
        group = groups.get((row.period_start, values))
        if group is None:
            group = groups[(row.period_start, values)] = Group(row.period_start, row.period_end, values)
        group.rows.append(row)
    return [groups[key] for key in sorted(groups)]


def summary_id(
    metric_key: str,
    subject_type: str,
    subject_id: str,
    period_type: str,
    period_start: datetime,
    dimensions: Mapping[str, str],
) -> str:
    """A UsageSummary's id: the seed's for the total row; a dimension row's adds its sorted pairs (URL-encoded), or
    their SHA-256 when that would pass the 256 characters an id may have."""
    base = f"{metric_key}:{subject_type}:{subject_id}:{period_type}:{period_start.isoformat()}"
    if not dimensions:
        return base
    pairs = "&".join(f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in sorted(dimensions.items()))
    full = f"{base}:{pairs}"
    return full if len(full) <= 256 else f"{base}:sha256={hashlib.sha256(pairs.encode()).hexdigest()}"
