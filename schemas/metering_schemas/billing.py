"""Plans, prices and subscriptions: how usage turns into money (values of `metering.plans` and
`metering.subscriptions`)."""

from __future__ import annotations

from decimal import Decimal
from itertools import pairwise
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from metering_schemas._base import (
    AggregateQuantity,
    CaseInsensitiveEnum,
    Description,
    Identifier,
    JsonNumberText,
    Name,
    Quantity,
    UtcDatetime,
    WireModel,
)
from metering_schemas.currency import EXPONENTS
from metering_schemas.metric import DimensionValues
from metering_schemas.subject import TimeZoneName

# Prices may be finer than the currency's minor unit (0.0001 USD per call); amounts are rounded once, per line.
Money = Annotated[Decimal, Field(ge=0, allow_inf_nan=False, max_digits=38, decimal_places=18), JsonNumberText()]

# What an invoice can state and store: amounts rounded to the currency's minor unit (at most 4 places, CLF), with at
# most 58 digits before the point, as the invoices table's `subtotal` Decimal(76, 18) holds them. Units can reach
# 58 digits and prices 20, so a product can be larger: billing refuses such an invoice (`amount_too_large`)
# rather than store it inexactly.
AMOUNT_WHOLE_DIGITS = 58
AMOUNT_PLACES = max(EXPONENTS.values())
Amount = Annotated[
    Decimal,
    Field(allow_inf_nan=False, max_digits=AMOUNT_WHOLE_DIGITS + AMOUNT_PLACES, decimal_places=AMOUNT_PLACES),
    JsonNumberText(),
]


MAX_PRICES = 200  # per plan
MAX_TIERS = 100  # per price


class PricingModel(CaseInsensitiveEnum):
    PER_UNIT = "PER_UNIT"
    TIERED_GRADUATED = "TIERED_GRADUATED"
    TIERED_VOLUME = "TIERED_VOLUME"
    PACKAGE = "PACKAGE"


class BillingPeriod(CaseInsensitiveEnum):
    MONTHLY = "MONTHLY"


class PriceTier(WireModel):
    """Units up to and including `upTo` (null: no upper bound, only on the last tier)."""

    up_to: Quantity | None = None
    unit_price: Money = Decimal(0)
    flat_fee: Money = Field(default=Decimal(0), description="Charged once when any unit falls in the tier")


class Price(WireModel):
    """How one metric's usage in a billing period is charged."""

    metric_key: Identifier
    model: PricingModel
    unit_price: Money | None = Field(default=None, description="PER_UNIT")
    tiers: list[PriceTier] = Field(
        default_factory=list,
        max_length=MAX_TIERS,
        description="TIERED_GRADUATED / TIERED_VOLUME, ascending by upTo, the last open-ended",
    )
    package_size: Quantity | None = Field(default=None, gt=0, description="PACKAGE: units per block")
    package_price: Money | None = Field(default=None, description="PACKAGE: price per started block")
    included_units: Quantity = Field(default=Decimal(0), ge=0, description="Free units before the model applies")
    minimum_charge: Money | None = None
    maximum_charge: Money | None = None
    dimensions: DimensionValues = Field(
        default_factory=dict,
        description="Prices only the usage whose dimension values are these (some or all of the "
        "metric's groupBy dimensions); empty: all of the metric's usage",
    )

    @model_validator(mode="after")
    def _complete_for_its_model(self) -> Price:
        if self.model is PricingModel.PER_UNIT and self.unit_price is None:
            raise ValueError("PER_UNIT needs unitPrice")
        if self.model is PricingModel.PACKAGE and (self.package_size is None or self.package_price is None):
            raise ValueError("PACKAGE needs packageSize and packagePrice")
        if self.model in (PricingModel.TIERED_GRADUATED, PricingModel.TIERED_VOLUME):
            if not self.tiers:
                raise ValueError(f"{self.model.value} needs tiers")
            bounds = [tier.up_to for tier in self.tiers]
            if bounds[-1] is not None or any(bound is None for bound in bounds[:-1]):
                raise ValueError("only the last tier is open-ended (upTo null), and it must be")
            closed = [bound for bound in bounds[:-1] if bound is not None]  # all but the last, as just checked
            if any(b <= a for a, b in pairwise(closed)) or (closed and closed[0] <= 0):
                raise ValueError("tiers' upTo must be positive and strictly ascending")
        if (
            self.minimum_charge is not None
            and self.maximum_charge is not None
            and self.minimum_charge > self.maximum_charge
        ):
            raise ValueError("minimumCharge is above maximumCharge")
        return self


class Plan(WireModel):
    """Value of the compacted `metering.plans` topic, keyed by `key`."""

    key: Identifier = Field(pattern=r"^[A-Za-z0-9_.:-]+$")
    name: Name
    description: Description = ""
    currency: str = Field(max_length=3, description="ISO 4217 code, e.g. USD")
    billing_period: BillingPeriod = BillingPeriod.MONTHLY
    flat_fee: Money | None = Field(
        default=None, description="Recurring fee per billing period, prorated on plan changes"
    )
    prices: list[Price] = Field(default_factory=list, max_length=MAX_PRICES)
    org_id: Identifier | None = Field(default=None, description="Organization that owns it; null = global")

    @field_validator("currency")
    @classmethod
    def _iso_4217(cls, value: str) -> str:
        code = value.upper()
        if code not in EXPONENTS:
            raise ValueError(f"{value!r} is not an ISO 4217 currency code")
        return code

    @model_validator(mode="after")
    def _one_price_per_metric(self) -> Plan:
        keys = [(price.metric_key, tuple(sorted(price.dimensions.items()))) for price in self.prices]
        if len(keys) != len(set(keys)):
            raise ValueError("a plan has at most one price per metric key and dimensions")
        return self


class Subscription(WireModel):
    """Value of the compacted `metering.subscriptions` topic, keyed by `id`: a subject on a plan from `startAt`
    (inclusive) until `endAt` (exclusive; null = open-ended)."""

    id: Identifier
    subject_type: Identifier
    subject_id: Identifier
    plan_key: Identifier
    start_at: UtcDatetime
    end_at: UtcDatetime | None = None
    org_id: Identifier | None = None
    time_zone: TimeZoneName = Field(
        default="UTC",
        description="The IANA zone its billing cycles are cut in: the subject's when it was created, unless given; a "
        "change applies to invoices computed after it (a FINAL invoice stays as stored)",
    )
    billing_time: Literal["calendar", "anniversary"] = Field(
        default="calendar",
        description="calendar: cycles are the zone's calendar months; anniversary: they start at local midnight on "
        "billingAnchor's day of every month",
    )
    billing_anchor: int | None = Field(
        default=None,
        ge=1,
        le=31,
        description="anniversary billing: the day of the month cycles start on, clamped to the month's length (an "
        "anchor on the 31st bills from Feb 28/29, Apr 30, then the 31st again); default: startAt's local day",
    )

    @model_validator(mode="after")
    def _ends_after_start(self) -> Subscription:
        if self.end_at is not None and self.end_at <= self.start_at:
            raise ValueError("endAt must be after startAt")
        if self.billing_anchor is not None and self.billing_time != "anniversary":
            raise ValueError("billingAnchor applies to anniversary billing (billingTime: anniversary)")
        return self


class InvoiceStatus(CaseInsensitiveEnum):
    OPEN = "OPEN"  # the period is running
    SETTLING = "SETTLING"  # ended, but late records (within the allowed lateness) may still change it
    FINAL = "FINAL"  # closed and stored: the same request gives the same invoice from now on


class LineType(CaseInsensitiveEnum):
    USAGE = "USAGE"
    FLAT_FEE = "FLAT_FEE"


class TierLine(WireModel):
    tier: int = Field(ge=1)
    from_units: Quantity = Field(description="Exclusive lower bound")
    up_to: Quantity | None
    units: AggregateQuantity
    unit_price: Money
    flat_fee: Money
    amount: Decimal = Field(description="Unrounded: exactly units x unitPrice + flatFee")


class InvoiceLine(WireModel):
    type: LineType
    plan_key: Identifier
    metric_key: Identifier | None = None
    dimensions: dict[str, str] = Field(default_factory=dict, description="The price's dimensions: the usage it priced")
    model: PricingModel | None = None
    starts_at: UtcDatetime
    ends_at: UtcDatetime
    quantity: AggregateQuantity = Field(
        default=Decimal(0),
        description="The metric's aggregate over the segment (up to 76 digits with 18 after the point)",
    )
    included_units: AggregateQuantity = Decimal(0)
    billable_units: AggregateQuantity = Decimal(0)
    tiers: list[TierLine] = Field(default_factory=list)
    packages: int | None = None
    adjustment: str | None = Field(default=None, description='"minimum_charge" or "maximum_charge" when one applied')
    amount: Amount = Field(
        description="Rounded once, half-even, to the currency's minor unit; "
        f"at most {AMOUNT_WHOLE_DIGITS} digits before the point"
    )


class PlanUse(WireModel):
    subscription_id: Identifier
    plan_key: Identifier
    plan_name: str
    starts_at: UtcDatetime
    ends_at: UtcDatetime


class Invoice(WireModel):
    """A subject's charges for one billing period (an invoice preview until it is FINAL)."""

    subject_type: Identifier
    subject_id: Identifier
    period: str = Field(
        pattern=r"^\d{4}-\d{2}$", description="The billing cycle that starts in this month of timeZone's calendar"
    )
    period_start: UtcDatetime
    period_end: UtcDatetime
    time_zone: str = Field(default="UTC", description="The zone the billing cycle was cut in (the subscription's)")
    local_period_start: str | None = Field(
        default=None, description="periodStart on timeZone's wall clock, with its offset (`2026-12-31T00:00:00+05:30`)"
    )
    local_period_end: str | None = Field(default=None, description="periodEnd on timeZone's wall clock")
    status: InvoiceStatus
    closes_at: UtcDatetime = Field(
        description="When late records can no longer change it: periodEnd + allowed lateness"
    )
    currency: str | None
    plans: list[PlanUse]
    lines: list[InvoiceLine]
    subtotal: Amount = Field(
        description=f"The sum of the rounded lines; at most {AMOUNT_WHOLE_DIGITS} digits before the point"
    )
    computed_at: UtcDatetime
