"""Billing reads and writes in ClickHouse: the billed quantities of a subject over part of a period,
and FINAL invoices, stored so that a closed period reads the same forever after."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from clickhouse_connect.driver.client import Client

from metering_pipeline.billing.selection import FROM_RECORDS, RollupRow, Selection, aggregation_of, hour_ceiling, quantity
from metering_pipeline.usage.aggregation import plain
from metering_pipeline.warehouse.queries import naive_utc
from metering_schemas import AggregationType, Invoice

# The hourly rollups behind usage_summary, merged per metric and combination of dimensions ({}: the total row) over
# the segment's hours; for a whole month a metric's total row adds up to its MONTHLY row exactly (COUNT … AVG).
_ROLLUPS_SQL = """
SELECT metric_key, dimensions, argMax(aggregation_type, period_start), sum(record_count), sum(sum_quantity),
       min(min_quantity), max(max_quantity)
FROM usage_rollups FINAL
WHERE subject_type = {subject_type:String} AND subject_id = {subject_id:String}
  AND period_type = 'HOURLY' AND period_start >= {start:DateTime} AND period_start < {end:DateTime}
  AND record_count > 0
  AND ({every_metric:UInt8} OR metric_key IN {metrics:Array(String)})
  AND (empty(dimensions) OR metric_key IN {grouped:Array(String)})
GROUP BY metric_key, dimensions
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


def priced_quantities(client: Client, subject_type: str, subject_id: str, start: datetime, end: datetime,
                      selections: Sequence[Selection]) -> dict[Selection, Decimal]:
    """Each selection's quantity (by its metric's aggregation type) over the hours that start in [start, end)."""
    if not selections:
        return {}
    grouped = sorted({s.metric_key for s in selections if s.dimensions})
    rows = _rollup_rows(client, subject_type, subject_id, start, end, sorted({s.metric_key for s in selections}), grouped)
    return {selection: _quantity(client, rows, selection, subject_type, subject_id, start, end)
            for selection in dict.fromkeys(selections)}


def billed_quantities(client: Client, subject_type: str, subject_id: str, start: datetime,
                      end: datetime) -> dict[str, Decimal]:
    """Each metric's total (by its aggregation type) over the hours that start in [start, end)."""
    rows = _rollup_rows(client, subject_type, subject_id, start, end, None, [])
    return {row.metric_key: _quantity(client, rows, Selection.total(row.metric_key), subject_type, subject_id, start, end)
            for row in rows}


def _rollup_rows(client: Client, subject_type: str, subject_id: str, start: datetime, end: datetime,
                 metrics: list[str] | None, grouped: list[str]) -> list[RollupRow]:
    """The metrics' total rows (`metrics` None: every metric's), and the `grouped` metrics' dimension rows too."""
    result = client.query(_ROLLUPS_SQL, parameters={
        "subject_type": subject_type, "subject_id": subject_id, "start": naive_utc(start), "end": naive_utc(end),
        "every_metric": int(metrics is None), "metrics": metrics or [], "grouped": grouped,
    }).result_rows
    return [RollupRow(metric, dict(dimensions), AggregationType(aggregation), int(count), total, low, high)
            for metric, dimensions, aggregation, count, total, low, high in result]


def _quantity(client: Client, rows: list[RollupRow], selection: Selection, subject_type: str, subject_id: str,
              start: datetime, end: datetime) -> Decimal:
    aggregation = aggregation_of(rows, selection.metric_key)
    if aggregation not in FROM_RECORDS:
        return quantity(rows, selection)
    names, values = [n for n, _ in selection.dimensions], [v for _, v in selection.dimensions]
    distinct, latest, count = client.query(_RECORDS_SQL, parameters={
        "subject_type": subject_type, "subject_id": subject_id, "metric_key": selection.metric_key,
        "start": naive_utc(hour_ceiling(start)), "end": naive_utc(hour_ceiling(end)), "names": names, "values": values,
    }).result_rows[0]
    if aggregation is AggregationType.UNIQUE_COUNT:
        return Decimal(int(distinct))
    return plain(latest) if count else Decimal(0)


def stored_invoice(client: Client, subject_type: str, subject_id: str, period: str) -> Invoice | None:
    """The first FINAL invoice stored for the period, if any (concurrent API replicas may each store one)."""
    rows = client.query(
        "SELECT argMin(body, computed_at) FROM invoices WHERE subject_type = {subject_type:String} "
        "AND subject_id = {subject_id:String} AND period = {period:String} HAVING count() > 0",
        parameters={"subject_type": subject_type, "subject_id": subject_id, "period": period},
    ).result_rows
    return Invoice.model_validate_json(rows[0][0]) if rows else None


def store_invoice(client: Client, invoice: Invoice) -> None:
    client.insert("invoices", [[invoice.subject_type, invoice.subject_id, invoice.period, invoice.currency,
                                invoice.subtotal, invoice.to_json().decode(), naive_utc(invoice.computed_at)]],
                  column_names=["subject_type", "subject_id", "period", "currency", "subtotal", "body", "computed_at"])

