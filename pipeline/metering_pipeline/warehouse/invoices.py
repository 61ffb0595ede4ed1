"""Billing reads and writes in ClickHouse: the billed quantities of a subject over part of a period,
and FINAL invoices, stored so that a closed period reads the same forever after."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from clickhouse_connect.driver.client import Client

from metering_pipeline.usage.aggregation import Aggregate, plain
from metering_pipeline.warehouse.queries import naive_utc
from metering_schemas import AggregationType, Invoice

# The hourly rollups behind usage_summary; for a whole month they add up to its MONTHLY row exactly.
_QUANTITIES_SQL = """
SELECT metric_key, any(aggregation_type), sum(record_count), sum(sum_quantity), min(min_quantity), max(max_quantity)
FROM usage_rollups FINAL
WHERE subject_type = {subject_type:String} AND subject_id = {subject_id:String}
  AND period_type = 'HOURLY' AND period_start >= {start:DateTime} AND period_start < {end:DateTime}
  AND record_count > 0
GROUP BY metric_key
"""


def billed_quantities(client: Client, subject_type: str, subject_id: str, start: datetime,
                      end: datetime) -> dict[str, Decimal]:
    """Each metric's total (by its aggregation type) over the hours that start in [start, end)."""
    rows = client.query(_QUANTITIES_SQL, parameters={
        "subject_type": subject_type, "subject_id": subject_id, "start": naive_utc(start), "end": naive_utc(end),
    }).result_rows
    return {
        metric: plain(Aggregate(int(count), total, low, high).total(AggregationType(aggregation)))
        for metric, aggregation, count, total, low, high in rows
    }


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

