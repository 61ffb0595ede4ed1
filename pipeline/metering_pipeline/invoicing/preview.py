"""`invoice` for the API and the CLI: a stored FINAL invoice, or one computed now from the rollups."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from metering_pipeline.billing.invoice import billing_period, price, segments, status
from metering_pipeline.billing.selection import Selection
from metering_pipeline.invoicing.quantities import priced_quantities
from metering_pipeline.invoicing.settlement import processed_through
from metering_pipeline.settings import Settings
from metering_pipeline.warehouse.invoices import store_invoice, stored_invoice
from metering_schemas import Invoice, InvoiceStatus, Plan, Subscription

Query = Callable[..., Awaitable[Any]]  # runs fn(clickhouse_client, *args) without blocking the event loop


async def invoice_for(
    settings: Settings,
    query: Query,
    plans: Mapping[str, Plan],
    subscriptions: Iterable[Subscription],
    subject_type: str,
    subject_id: str,
    period: str,
    now: datetime | None = None,
) -> Invoice:
    start, end = billing_period(period)
    stored: Invoice | None = await query(stored_invoice, subject_type, subject_id, period)
    if stored is not None:
        return stored
    now = now or datetime.now(UTC)
    close = end + settings.allowed_lateness
    # Settlement is checked before usage is read, so a FINAL invoice cannot miss a record still in flight.
    settled = now >= close and await processed_through(settings, close)
    invoice_status = status(now, end, settings.allowed_lateness, settled)
    parts = segments(
        start, end, (s for s in subscriptions if (s.subject_type, s.subject_id) == (subject_type, subject_id)), plans
    )
    usage = [
        await query(
            priced_quantities,
            subject_type,
            subject_id,
            part.start,
            part.end,
            [Selection.of(p) for p in part.plan.prices],
        )
        for part in parts
    ]
    invoice = price(subject_type, subject_id, period, parts, usage, now, invoice_status, settings.allowed_lateness)
    if invoice_status is InvoiceStatus.FINAL and parts:  # nothing to bill is not worth keeping
        await query(store_invoice, invoice)
        return await query(stored_invoice, subject_type, subject_id, period) or invoice  # the first stored wins
    return invoice
