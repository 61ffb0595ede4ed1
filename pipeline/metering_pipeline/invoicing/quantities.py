"""The usage each price bills, measured from ClickHouse: `billing.selection` says which rows hold it and how each
aggregation type adds up, `warehouse.invoices` reads them. Run in a worker thread with a ClickHouse client."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
from metering_pipeline.warehouse.invoices import distinct_and_latest, merged_rollups, record_rows
from metering_schemas import AggregationType


@dataclass(frozen=True)
class Source:
    """Where a segment's usage is read: the subject's hourly rollups cut in `zone`, where they hold every record of
    the segment, else (`rollups` False) the records themselves."""

    zone: str = "UTC"
    rollups: bool = True

    def bounds(self, start: datetime, end: datetime) -> tuple[datetime, datetime]:
        """The records a segment bills, from either source: those of the zone's hours that start in it (rollups bill
        an hour in the segment its start falls in)."""
        return hour_ceiling(start, self.zone), hour_ceiling(end, self.zone)


def priced_quantities(
    client: Client,
    subject_type: str,
    subject_id: str,
    start: datetime,
    end: datetime,
    selections: Sequence[Selection],
    source: Source = Source(),
) -> dict[Selection, Decimal]:
    """Each selection's quantity (by its metric's aggregation type) over the segment [start, end)."""
    if not selections:
        return {}
    grouped = sorted({s.metric_key for s in selections if s.dimensions})
    metrics = sorted({s.metric_key for s in selections})
    rows = _rows(client, subject_type, subject_id, start, end, metrics, grouped, source)
    return {
        selection: _quantity(client, rows, selection, subject_type, subject_id, source.bounds(start, end))
        for selection in dict.fromkeys(selections)
    }


def billed_quantities(
    client: Client, subject_type: str, subject_id: str, start: datetime, end: datetime, source: Source = Source()
) -> dict[str, Decimal]:
    """Each metric's total (by its aggregation type) over the hours that start in [start, end)."""
    rows = _rows(client, subject_type, subject_id, start, end, None, [], source)
    bounds = source.bounds(start, end)
    return {
        row.metric_key: _quantity(client, rows, Selection.total(row.metric_key), subject_type, subject_id, bounds)
        for row in rows
    }


def _rows(
    client: Client,
    subject_type: str,
    subject_id: str,
    start: datetime,
    end: datetime,
    metrics: list[str] | None,
    grouped: list[str],
    source: Source,
) -> list[RollupRow]:
    """The metrics' total rows (`metrics` None: every metric's), and the `grouped` metrics' dimension rows too."""
    if source.rollups:
        found = merged_rollups(client, subject_type, subject_id, start, end, metrics, grouped, source.zone)
    else:
        found = record_rows(client, subject_type, subject_id, *source.bounds(start, end), metrics, grouped)
    return [RollupRow(*row) for row in found]


def _quantity(
    client: Client,
    rows: list[RollupRow],
    selection: Selection,
    subject_type: str,
    subject_id: str,
    bounds: tuple[datetime, datetime],
) -> Decimal:
    aggregation = aggregation_of(rows, selection.metric_key)
    if aggregation not in FROM_RECORDS:
        return quantity(rows, selection)
    distinct, latest, count = distinct_and_latest(
        client, subject_type, subject_id, selection.metric_key, *bounds, selection.dimensions
    )
    if aggregation is AggregationType.UNIQUE_COUNT:
        return Decimal(distinct)
    return plain(latest) if count else Decimal(0)
