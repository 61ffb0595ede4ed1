"""Billing's reads and writes in ClickHouse: the merged rollups and the usage records behind a subject's bill over
part of a period, and FINAL invoices, stored so that a closed period reads the same forever after. Rows only: what
they bill is for the pure `billing` rules to say, so that this package never depends on them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from clickhouse_connect.driver.client import Client

from metering_pipeline.usage.periods import EPOCH
from metering_pipeline.warehouse.queries import naive_utc
from metering_schemas import AggregationType, Invoice

# The hourly rollups behind usage_summary, merged per metric and combination of dimensions ({}: the total row) over
# the segment's hours; for a whole month a metric's total row adds up to its MONTHLY row exactly (COUNT … AVG).
_ROLLUPS_SQL = """
SELECT metric_key, dimensions, argMax(aggregation_type, period_start), sum(record_count), sum(sum_quantity),
       min(min_quantity), max(max_quantity)
FROM usage_rollups FINAL
WHERE subject_type = {subject_type:String} AND subject_id = {subject_id:String}
  AND period_type = 'HOURLY' AND time_zone = {time_zone:String}
  AND period_start >= {start:DateTime} AND period_start < {end:DateTime}
  AND record_count > 0
  AND ({every_metric:UInt8} OR metric_key IN {metrics:Array(String)})
  AND (empty(dimensions) OR metric_key IN {grouped:Array(String)})
GROUP BY metric_key, dimensions
"""

# The same rows from the records themselves, for a segment whose bounds no hourly rollups align with (a billing cycle
# in a zone whose rollups the worker did not cut): per metric (the total row) and per grouped metric's combination.
_RECORD_ROWS_SQL = """
SELECT metric_key, if(total_row, map(), dimensions) AS row, count(), sum(toDecimal256(quantity, 18)), min(quantity),
       max(quantity)
FROM usage_records FINAL
ARRAY JOIN [1, 0] AS total_row
WHERE subject_type = {subject_type:String} AND subject_id = {subject_id:String}
  AND timestamp >= {start:DateTime64(3)} AND timestamp < {end:DateTime64(3)}
  AND ({every_metric:UInt8} OR metric_key IN {metrics:Array(String)})
  AND (total_row OR (NOT empty(dimensions) AND metric_key IN {grouped:Array(String)}))
GROUP BY metric_key, row
"""
# Each metric's aggregation type as the worker last counted it in the segment: its hourly rows, in whichever zone they
# were cut (an hour holding the segment's first record starts at most 90 minutes before it).
_AGGREGATIONS_SQL = """
SELECT metric_key, argMax(aggregation_type, period_start)
FROM usage_rollups FINAL
WHERE subject_type = {subject_type:String} AND subject_id = {subject_id:String}
  AND period_type = 'HOURLY' AND empty(dimensions)
  AND period_start >= {first_hour:DateTime} AND period_start < {end:DateTime}
GROUP BY metric_key
"""

# UNIQUE_COUNT and LATEST over a segment or a subset of dimensions: from the records the worker counted (their
# hour in the segment, like the rollups'), each once (FINAL), never from rows that cannot be added up.
_RECORDS_SQL = """
SELECT uniqExact(distinct_value), argMax(quantity, (timestamp, id)), count()
FROM usage_records FINAL
WHERE subject_type = {subject_type:String} AND subject_id = {subject_id:String} AND metric_key = {metric_key:String}
  AND timestamp >= {start:DateTime64(3)} AND timestamp < {end:DateTime64(3)}
  AND (empty({names:Array(String)}) OR (NOT empty(dimensions)
       AND arrayAll((name, value) -> dimensions[name] = value, {names:Array(String)}, {values:Array(String)})))
"""

_LONGEST_HOUR = timedelta(minutes=90)

# metric key, dimensions ({}: the total row), the latest hour's aggregation type, record count, sum, min, max
MergedRollup = tuple[str, dict[str, str], AggregationType, int, Decimal, Decimal | None, Decimal | None]


def merged_rollups(
    client: Client,
    subject_type: str,
    subject_id: str,
    start: datetime,
    end: datetime,
    metrics: list[str] | None,
    grouped: list[str],
    zone_name: str = "UTC",
) -> list[MergedRollup]:
    """The metrics' total rows (`metrics` None: every metric's), and the `grouped` metrics' dimension rows too, each
    merged over the hours (cut in `zone_name`) that start in [start, end)."""
    result = client.query(
        _ROLLUPS_SQL,
        parameters=_rows_parameters(subject_type, subject_id, start, end, metrics, grouped) | {"time_zone": zone_name},
    ).result_rows
    return [
        (metric, dict(dimensions), AggregationType(aggregation), int(count), total, low, high)
        for metric, dimensions, aggregation, count, total, low, high in result
    ]


def record_rows(
    client: Client,
    subject_type: str,
    subject_id: str,
    start: datetime,
    end: datetime,
    metrics: list[str] | None,
    grouped: list[str],
) -> list[MergedRollup]:
    """`merged_rollups`' rows over the records with timestamp in [start, end), exactly, from the records."""
    parameters = _rows_parameters(subject_type, subject_id, start, end, metrics, grouped)
    rows = client.query(_RECORD_ROWS_SQL, parameters=parameters).result_rows
    first_hour = max(start, EPOCH + _LONGEST_HOUR) - _LONGEST_HOUR
    found = client.query(_AGGREGATIONS_SQL, parameters=parameters | {"first_hour": naive_utc(first_hour)})
    kinds = {str(metric): str(kind) for metric, kind in found.result_rows}
    return [
        (metric, dict(dimensions), AggregationType(kinds[metric]), int(count), total, low, high)
        for metric, dimensions, count, total, low, high in rows
        if metric in kinds  # counted by the worker (a record it refused never reached usage_records)
    ]


def _rows_parameters(
    subject_type: str, subject_id: str, start: datetime, end: datetime, metrics: list[str] | None, grouped: list[str]
) -> dict[str, object]:
    return {
        "subject_type": subject_type,
        "subject_id": subject_id,
        "start": naive_utc(start),
        "end": naive_utc(end),
        "every_metric": int(metrics is None),
        "metrics": metrics or [],
        "grouped": grouped,
    }


def distinct_and_latest(
    client: Client,
    subject_type: str,
    subject_id: str,
    metric_key: str,
    start: datetime,
    end: datetime,
    dimensions: Sequence[tuple[str, str]],
) -> tuple[int, Decimal, int]:
    """Over the metric's usage records with timestamp in [start, end) and these dimension values (none: all of
    them): the number of distinct values, the latest quantity (meaningless without records) and the record count."""
    names, values = [n for n, _ in dimensions], [v for _, v in dimensions]
    distinct, latest, count = client.query(
        _RECORDS_SQL,
        parameters={
            "subject_type": subject_type,
            "subject_id": subject_id,
            "metric_key": metric_key,
            "start": naive_utc(start),
            "end": naive_utc(end),
            "names": names,
            "values": values,
        },
    ).result_rows[0]
    return int(distinct), latest, int(count)


def stored_invoice(client: Client, subject_type: str, subject_id: str, period: str) -> Invoice | None:
    """The first FINAL invoice stored for the period, if any (concurrent API replicas may each store one)."""
    rows = client.query(
        "SELECT argMin(body, computed_at) FROM invoices WHERE subject_type = {subject_type:String} "
        "AND subject_id = {subject_id:String} AND period = {period:String} HAVING count() > 0",
        parameters={"subject_type": subject_type, "subject_id": subject_id, "period": period},
    ).result_rows
    return Invoice.model_validate_json(rows[0][0]) if rows else None


def store_invoice(client: Client, invoice: Invoice) -> None:
    client.insert(
        "invoices",
        [
            [
                invoice.subject_type,
                invoice.subject_id,
                invoice.period,
                invoice.currency,
                invoice.subtotal,
                invoice.to_json().decode(),
                naive_utc(invoice.computed_at),
            ]
        ],
        column_names=["subject_type", "subject_id", "period", "currency", "subtotal", "body", "computed_at"],
    )
