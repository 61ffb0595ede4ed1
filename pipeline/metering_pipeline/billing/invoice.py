"""An invoice for one subject and one billing period, from its subscriptions, their plans and the
billed quantities. Pure: the caller supplies the usage and the clock."""

from __future__ import annotations

import decimal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from metering_pipeline.billing.cycles import CALENDAR_ANCHOR, local_days, named_cycle, subscription_anchor
from metering_pipeline.billing.pricing import MONEY, charge, round_money
from metering_pipeline.billing.selection import Selection
from metering_pipeline.usage.periods import time_zone
from metering_schemas import Invoice, InvoiceLine, InvoiceStatus, LineType, Plan, PlanUse, Subscription
from metering_schemas.billing import AMOUNT_WHOLE_DIGITS

# Proration is a ratio of local days (a 23- or 25-hour day counts one); it is rounded once, with its line, to the
# currency's minor unit.
_PRORATION = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN)
_AMOUNT_LIMIT = Decimal(10) ** AMOUNT_WHOLE_DIGITS


class BillingError(ValueError):
    """The subject's subscriptions cannot be billed as configured (e.g. two currencies in one period)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Segment:
    """A part of the billing period that one subscription bills on its plan, [start, end)."""

    subscription: Subscription
    plan: Plan
    start: datetime
    end: datetime


@dataclass(frozen=True)
class Cycle:
    """The billing period an invoice covers, [start, end) as UTC instants, and the zone it was cut in."""

    start: datetime
    end: datetime
    zone: str = "UTC"


def billing_period(period: str, zone_name: str = "UTC", anchor_day: int = CALENDAR_ANCHOR) -> tuple[datetime, datetime]:
    """`2026-11` → the cycle that starts in that month of the zone's calendar: the month itself (anchor 1), or from
    the anchor day, clamped, to the next month's; [start, end) as UTC instants."""
    try:
        month = datetime.strptime(period, "%Y-%m")
    except ValueError:
        raise BillingError("invalid_period", f"period {period!r} is not YYYY-MM") from None
    if not 1970 <= month.year <= 2105:  # what ClickHouse's DateTime holds
        raise BillingError("invalid_period", f"period {period!r} is outside 1970-01 … 2105-12")
    return named_cycle(month.year, month.month, anchor_day, time_zone(zone_name))


def cycle_of(period: str, subscriptions: Sequence[Subscription]) -> Cycle:
    """The cycle `period` names for a subject: by the zone and anchor of its governing subscription (the latest to
    start before that month is over in UTC, else its first), else the UTC calendar month."""
    start, end = billing_period(period)
    if not subscriptions:
        return Cycle(start, end)
    by_start = sorted(subscriptions, key=lambda s: (s.start_at, s.id))
    governing = next((s for s in reversed(by_start) if s.start_at < end), by_start[0])
    return Cycle(*billing_period(period, governing.time_zone, subscription_anchor(governing)), governing.time_zone)


def segments(
    start: datetime, end: datetime, subscriptions: Iterable[Subscription], plans: Mapping[str, Plan]
) -> list[Segment]:
    """The subscriptions active in [start, end), each clipped to it: a plan change mid-period gives two segments."""
    found = []
    for subscription in subscriptions:
        begins = max(start, subscription.start_at)
        ends = min(end, subscription.end_at or end)
        if begins >= ends:
            continue
        plan = plans.get(subscription.plan_key)
        if plan is None:
            raise BillingError(
                "unknown_plan",
                f"subscription {subscription.id!r} names plan {subscription.plan_key!r}, which does not exist",
            )
        found.append(Segment(subscription, plan, begins, ends))
    currencies = {segment.plan.currency for segment in found}
    if len(currencies) > 1:
        raise BillingError(
            "mixed_currencies",
            f"the period's plans bill in {', '.join(sorted(currencies))}; one invoice has one currency",
        )
    return sorted(found, key=lambda s: (s.start, s.subscription.id))


def status(now: datetime, end: datetime, allowed_lateness: timedelta, settled: bool) -> InvoiceStatus:
    """OPEN while the period runs; SETTLING until late records can no longer land in it and the pipeline
    has processed every record that could; FINAL after that."""
    if now < end:
        return InvoiceStatus.OPEN
    if now < end + allowed_lateness or not settled:
        return InvoiceStatus.SETTLING
    return InvoiceStatus.FINAL


def price(
    subject_type: str,
    subject_id: str,
    period: str,
    parts: Sequence[Segment],
    usage: Sequence[Mapping[Selection, Decimal]],
    now: datetime,
    invoice_status: InvoiceStatus,
    allowed_lateness: timedelta,
    cycle: Cycle | None = None,
) -> Invoice:
    """The invoice: per segment a prorated flat-fee line and one line per price, in the plan's order (usage[i] holds
    segment i's quantity per `Selection.of(price)`: the metric's total, or the usage with the price's dimension
    values). Each price is its own line over the usage it selects, so a metric priced with and without dimensions
    is billed on both lines. Each line rounded once; subtotal = sum of rounded lines."""
    cycle = cycle or Cycle(*billing_period(period))
    start, end, zone = cycle.start, cycle.end, time_zone(cycle.zone)
    currency = parts[0].plan.currency if parts else None
    lines: list[InvoiceLine] = []
    for part, quantities in zip(parts, usage, strict=True):
        plan = part.plan
        if plan.flat_fee:
            share = _PRORATION.divide(local_days(part.start, part.end, zone), local_days(start, end, zone))
            lines.append(
                InvoiceLine(
                    type=LineType.FLAT_FEE,
                    plan_key=plan.key,
                    starts_at=part.start,
                    ends_at=part.end,
                    amount=round_money(_PRORATION.multiply(plan.flat_fee, share), plan.currency),
                )
            )
        for metric_price in plan.prices:
            selection = Selection.of(metric_price)
            quantity = quantities.get(selection, Decimal(0))
            charged = charge(metric_price, quantity, plan.currency)
            amount = _storable(charged.amount, f"plan {plan.key}'s {selection.label()} line")
            lines.append(
                InvoiceLine(
                    type=LineType.USAGE,
                    plan_key=plan.key,
                    metric_key=metric_price.metric_key,
                    dimensions=dict(metric_price.dimensions),
                    model=metric_price.model,
                    starts_at=part.start,
                    ends_at=part.end,
                    quantity=quantity,
                    included_units=metric_price.included_units,
                    billable_units=charged.billable_units,
                    tiers=list(charged.tiers),
                    packages=charged.packages,
                    adjustment=charged.adjustment,
                    amount=amount,
                )
            )
    subtotal = Decimal(0) if currency is None else round_money(Decimal(0), currency)
    for line in lines:
        subtotal = MONEY.add(subtotal, line.amount)
    _storable(subtotal, "the subtotal")
    return Invoice(
        subject_type=subject_type,
        subject_id=subject_id,
        period=period,
        period_start=start,
        period_end=end,
        time_zone=cycle.zone,
        local_period_start=start.astimezone(zone).isoformat(),
        local_period_end=end.astimezone(zone).isoformat(),
        status=invoice_status,
        closes_at=end + allowed_lateness,
        currency=currency,
        plans=[
            PlanUse(
                subscription_id=p.subscription.id,
                plan_key=p.plan.key,
                plan_name=p.plan.name,
                starts_at=p.start,
                ends_at=p.end,
            )
            for p in parts
        ],
        lines=lines,
        subtotal=subtotal,
        computed_at=now,
    )


def _storable(amount: Decimal, what: str) -> Decimal:
    """An amount the Invoice model and the invoices table hold exactly; a larger one is a clear refusal (the API's
    409 `amount_too_large`), not a validation error deep in the model (a 500) or a failed insert."""
    if amount.copy_abs() >= _AMOUNT_LIMIT:  # copy_abs: abs() would round to the context's 28 digits
        raise BillingError(
            "amount_too_large",
            f"{what} comes to {amount}, over the {AMOUNT_WHOLE_DIGITS} digits before "
            "the point an invoice amount can have; bound it with the price's "
            "maximumCharge",
        )
    return amount
