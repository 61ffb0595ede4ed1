"""The usage each price bills, measured from ClickHouse: `billing.selection` says which rows hold it and how each
aggregation type adds up, `warehouse.invoices` reads them. Run in a worker thread with a ClickHouse client."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

from clickhouse_connect.driver.client import Client

from metering_pipeline.billing.selection import (
    RollupRow,
    Selection,
    aggregation_of,
    hour_ceiling,
    quantity,
)
from metering_pipeline.usage.aggregation import FROM_RECORDS, plain
from metering_pipeline.warehouse.invoices import distinct_and_latest, merged_rollups
from metering_schemas import AggregationType


def priced_quantities(
    client: Client, subject_type: str, subject_id: str, start: datetime, end: datetime, selections: Sequence[Selection]
) -> dict[Selection, Decimal]:
    """Each selection's quantity (by its metric's aggregation type) over the hours that start in [start, end)."""
    if not selections:
        return {}
    grouped = sorted({s.metric_key for s in selections if s.dimensions})
    rows = _rollup_rows(
        client, subject_type, subject_id, start, end, sorted({s.metric_key for s in selections}), grouped
    )
    return {
        selection: _quantity(client, rows, selection, subject_type, subject_id, start, end)
        for selection in dict.fromkeys(selections)
    }


def billed_quantities(
    client: Client, subject_type: str, subject_id: str, start: datetime, end: datetime
) -> dict[str, Decimal]:
    """Each metric's total (by its aggregation type) over the hours that start in [start, end)."""
    rows = _rollup_rows(client, subject_type, subject_id, start, end, None, [])
    return {
        row.metric_key: _quantity(client, rows, Selection.total(row.metric_key), subject_type, subject_id, start, end)
        for row in rows
    }


def _rollup_rows(
    client: Client,
    subject_type: str,
    subject_id: str,
    start: datetime,
    end: datetime,
    metrics: list[str] | None,
    grouped: list[str],
) -> list[RollupRow]:
    """The metrics' total rows (`metrics` None: every metric's), and the `grouped` metrics' dimension rows too."""
    return [RollupRow(*row) for row in merged_rollups(client, subject_type, subject_id, start, end, metrics, grouped)]


def _quantity(
    client: Client,
    rows: list[RollupRow],
    selection: Selection,
    subject_type: str,
    subject_id: str,
    start: datetime,
    end: datetime,
) -> Decimal:
    aggregation = aggregation_of(rows, selection.metric_key)
    if aggregation not in FROM_RECORDS:
        return quantity(rows, selection)
    distinct, latest, count = distinct_and_latest(
        client,
        subject_type,
        subject_id,
        selection.metric_key,
        hour_ceiling(start),
        hour_ceiling(end),
        selection.dimensions,
    )
    if aggregation is AggregationType.UNIQUE_COUNT:
        return Decimal(distinct)
    return plain(latest) if count else Decimal(0)
