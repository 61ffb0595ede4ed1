"""`invoice` for the API and the CLI: a stored FINAL invoice, or one computed now from the rollups."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from metering_pipeline.billing.invoice import Cycle, cycle_of, price, segments, status
from metering_pipeline.billing.selection import Selection
from metering_pipeline.invoicing.quantities import Source, priced_quantities
from metering_pipeline.invoicing.settlement import processed_through
from metering_pipeline.settings import Settings
from metering_pipeline.usage.subject_zones import zone_rollups_from
from metering_pipeline.warehouse.invoices import store_invoice, stored_invoice
from metering_schemas import Invoice, InvoiceStatus, Plan, SubjectSettings, Subscription

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
    subjects: Mapping[str, SubjectSettings] | None = None,
) -> Invoice:
    """`subjects` (metering.subjects) tell whether the subject's rollups in the cycle's zone hold its usage (without
    them: only in METERING_DEFAULT_TIME_ZONE); where they do not, it is read from the records."""
    own = [s for s in subscriptions if (s.subject_type, s.subject_id) == (subject_type, subject_id)]
    cycle = cycle_of(period, own)
    start, end = cycle.start, cycle.end
    stored: Invoice | None = await query(stored_invoice, subject_type, subject_id, period)
    if stored is not None:
        return stored
    now = now or datetime.now(UTC)
    close = end + settings.allowed_lateness
    # Settlement is checked before usage is read, so a FINAL invoice cannot miss a record still in flight.
    settled = now >= close and await processed_through(settings, close)
    invoice_status = status(now, end, settings.allowed_lateness, settled)
    parts = segments(start, end, own, plans)
    source = _source(cycle, subjects or {}, subject_type, subject_id, settings.default_time_zone)
    usage = [
        await query(
            priced_quantities,
            subject_type,
            subject_id,
            part.start,
            part.end,
            [Selection.of(p) for p in part.plan.prices],
            source,
        )
        for part in parts
    ]
    invoice = price(
        subject_type, subject_id, period, parts, usage, now, invoice_status, settings.allowed_lateness, cycle
    )
    if invoice_status is InvoiceStatus.FINAL and parts:  # nothing to bill is not worth keeping
        await query(store_invoice, invoice)
        return await query(stored_invoice, subject_type, subject_id, period) or invoice  # the first stored wins
    return invoice


def _source(
    cycle: Cycle, subjects: Mapping[str, SubjectSettings], subject_type: str, subject_id: str, default: str
) -> Source:
    """A cycle from the subject's hourly rollups cut in its zone when they hold every record since before the cycle
    began, else from the records."""
    since = zone_rollups_from(subjects, subject_type, subject_id, cycle.zone, default)
    return Source(cycle.zone, rollups=since is not None and since <= cycle.start)
