"""What one metric's usage costs under a price: the four pricing models, included units, minimum and
maximum charges, and the one rounding per line. Pure: no I/O."""

from __future__ import annotations

import decimal
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import cast

from metering_schemas import Price, PriceTier, PricingModel, TierLine
from metering_schemas.currency import minor_unit

# Prices × quantities stay exact; rounding happens only in `round_money`, once per line. An aggregate has up to
# 58 + 18 digits and a price 20 + 18, so a tier's units × unitPrice + flatFee has at most 78 + 36, a PACKAGE line's
# packages (up to 10^76 blocks of 1e-18) × packagePrice at most 96 + 18, and 100 tiers add 2 more: 120 digits are
# enough for every line, and the traps make any rounding here an error instead of a wrong amount.
MONEY = decimal.Context(prec=120, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow])
_ROUNDING = decimal.Context(
    prec=MONEY.prec, rounding=decimal.ROUND_HALF_EVEN, traps=[decimal.InvalidOperation, decimal.Overflow]
)
_ZERO = Decimal(0)


def round_money(amount: Decimal, currency: str) -> Decimal:
    """Half-even to the currency's minor unit (ISO 4217): 2 places for USD, 0 for JPY, 3 for BHD."""
    return amount.quantize(minor_unit(currency), context=_ROUNDING)


@dataclass(frozen=True)
class Charge:
    billable_units: Decimal
    tiers: tuple[TierLine, ...]
    packages: int | None
    adjustment: str | None
    amount: Decimal  # rounded


def charge(price: Price, quantity: Decimal, currency: str) -> Charge:
    """The line for `quantity` units of the price's metric in one billing period (or part of one)."""
    billable = max(MONEY.subtract(quantity, price.included_units), _ZERO)
    tiers: tuple[TierLine, ...] = ()
    packages = None
    # Price's validator requires unitPrice of PER_UNIT, packageSize and packagePrice of PACKAGE.
    if price.model is PricingModel.PER_UNIT:
        raw = MONEY.multiply(billable, cast(Decimal, price.unit_price))
    elif price.model is PricingModel.PACKAGE:
        whole, rest = MONEY.divmod(billable, cast(Decimal, price.package_size))
        packages = int(whole) + (1 if rest else 0)
        raw = MONEY.multiply(Decimal(packages), cast(Decimal, price.package_price))
    elif price.model is PricingModel.TIERED_GRADUATED:
        tiers = graduated(price.tiers, billable)
        raw = _sum(tier.amount for tier in tiers)
    else:
        tiers = volume(price.tiers, billable)
        raw = _sum(tier.amount for tier in tiers)
    adjusted, adjustment = _bounded(raw, price)
    return Charge(billable, tiers, packages, adjustment, round_money(adjusted, currency))


def graduated(tiers: list[PriceTier], units: Decimal) -> tuple[TierLine, ...]:
    """Each tier prices the units inside it; a tier's flat fee applies once any unit reaches it."""
    lines = []
    lower = _ZERO
    for number, tier in enumerate(tiers, start=1):
        if units <= lower:
            break
        upper = units if tier.up_to is None else min(units, tier.up_to)
        inside = MONEY.subtract(upper, lower)
        lines.append(_tier_line(number, lower, tier, inside))
        if tier.up_to is None:
            break
        lower = tier.up_to
    return tuple(lines)


def volume(tiers: list[PriceTier], units: Decimal) -> tuple[TierLine, ...]:
    """The tier the total falls in (upTo inclusive) prices every unit; nothing is charged for zero units."""
    if units <= 0:
        return ()
    lower = _ZERO
    for number, tier in enumerate(tiers, start=1):
        if tier.up_to is None or units <= tier.up_to:
            return (_tier_line(number, lower, tier, units),)
        lower = tier.up_to
    raise AssertionError("the last tier is open-ended")  # guaranteed by Price's validation


def _tier_line(number: int, lower: Decimal, tier: PriceTier, units: Decimal) -> TierLine:
    amount = MONEY.add(MONEY.multiply(units, tier.unit_price), tier.flat_fee)
    return TierLine(
        tier=number,
        from_units=lower,
        up_to=tier.up_to,
        units=units,
        unit_price=tier.unit_price,
        flat_fee=tier.flat_fee,
        amount=amount,
    )


def _bounded(raw: Decimal, price: Price) -> tuple[Decimal, str | None]:
    if price.minimum_charge is not None and raw < price.minimum_charge:
        return price.minimum_charge, "minimum_charge"
    if price.maximum_charge is not None and raw > price.maximum_charge:
        return price.maximum_charge, "maximum_charge"
    return raw, None


def _sum(amounts: Iterable[Decimal]) -> Decimal:
    total = _ZERO
    for amount in amounts:
        total = MONEY.add(total, amount)
    return total
