"""Pricing models at their boundaries, included units, minimum/maximum charges, currency rounding."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from metering_pipeline.billing.pricing import charge, round_money
from metering_schemas import Plan, Price, PricingModel

D = Decimal


def tiered(model: PricingModel, **extra) -> Price:
    return Price(
        metric_key="api_calls",
        model=model,
        tiers=[
            {"upTo": 1000, "unitPrice": "0.01"},
            {"upTo": 5000, "unitPrice": "0.008", "flatFee": "2"},
            {"upTo": None, "unitPrice": "0.005"},
        ],
        **extra,
    )


@pytest.mark.parametrize(
    ("quantity", "amount"),
    [
        ("0", "0.00"),
        ("1", "0.01"),
        ("999", "9.99"),
        ("1000", "10.00"),
        ("1001", "10.01"),
        ("2.5", "0.02"),
    ],
)
def test_per_unit_multiplies_then_rounds_once_half_even(quantity, amount):
    price = Price(metric_key="api_calls", model="PER_UNIT", unit_price="0.01")
    assert charge(price, D(quantity), "USD").amount == D(amount)


@pytest.mark.parametrize(
    ("quantity", "amount", "tier_units"),
    [
        ("0", "0.00", []),
        ("1000", "10.00", ["1000"]),  # exactly at the first boundary
        ("1001", "12.01", ["1000", "1"]),  # one past it: the second tier's flat fee applies
        ("5000", "44.00", ["1000", "4000"]),  # 10 + 2 + 4000 × 0.008
        ("5001", "44.00", ["1000", "4000", "1"]),  # 44 + 0.005 = 44.005, half-even → 44.00
    ],
)
def test_graduated_prices_each_tiers_units_at_its_own_price(quantity, amount, tier_units):
    result = charge(tiered(PricingModel.TIERED_GRADUATED), D(quantity), "USD")
    assert [str(t.units) for t in result.tiers] == tier_units
    assert result.amount == D(amount)


def test_graduated_rounds_the_line_not_each_tier():
    assert charge(tiered(PricingModel.TIERED_GRADUATED), D(5003), "USD").amount == D("44.02")  # 44.015 → 44.02


@pytest.mark.parametrize(
    ("quantity", "amount", "tier"),
    [
        ("0", "0.00", None),
        ("1000", "10.00", 1),  # at the boundary: still tier 1 (upTo is inclusive)
        ("1001", "10.01", 2),  # one past: every unit at 0.008, plus the tier's flat fee: 8.008 + 2
        ("5000", "42.00", 2),
        ("5001", "25.00", 3),  # 25.005 → half-even → 25.00
    ],
)
def test_volume_prices_all_units_at_the_tier_the_total_falls_in(quantity, amount, tier):
    result = charge(tiered(PricingModel.TIERED_VOLUME), D(quantity), "USD")
    assert [t.tier for t in result.tiers] == ([] if tier is None else [tier])
    assert result.amount == D(amount)


@pytest.mark.parametrize(
    ("quantity", "packages", "amount"),
    [
        ("0", 0, "0.00"),
        ("1", 1, "5.00"),
        ("100", 1, "5.00"),
        ("101", 2, "10.00"),
        ("100.5", 2, "10.00"),
    ],
)
def test_package_charges_every_started_block(quantity, packages, amount):
    price = Price(metric_key="storage_gb", model="PACKAGE", package_size="100", package_price="5")
    result = charge(price, D(quantity), "USD")
    assert (result.packages, result.amount) == (packages, D(amount))


@pytest.mark.parametrize(
    ("quantity", "billable", "amount"),
    [
        ("0", "0", "0.00"),
        ("500", "0", "0.00"),
        ("501", "1", "0.01"),
        ("1500", "1000", "10.00"),
    ],
)
def test_included_units_are_free_before_the_model_applies(quantity, billable, amount):
    price = Price(metric_key="api_calls", model="PER_UNIT", unit_price="0.01", included_units="500")
    result = charge(price, D(quantity), "USD")
    assert (result.billable_units, result.amount) == (D(billable), D(amount))


def test_included_units_shift_tiers():
    price = tiered(PricingModel.TIERED_GRADUATED, included_units="1000")
    assert charge(price, D(2000), "USD").amount == D("10.00")  # 1000 billable, all in tier 1


@pytest.mark.parametrize(
    ("quantity", "amount", "adjustment"),
    [
        ("0", "5.00", "minimum_charge"),  # a minimum applies even without usage
        ("499", "5.00", "minimum_charge"),
        ("500", "5.00", None),
        ("2000", "20.00", None),
        ("2001", "20.00", "maximum_charge"),
    ],
)
def test_minimum_and_maximum_charge_bound_the_line(quantity, amount, adjustment):
    price = Price(metric_key="api_calls", model="PER_UNIT", unit_price="0.01", minimum_charge="5", maximum_charge="20")
    result = charge(price, D(quantity), "USD")
    assert (result.amount, result.adjustment) == (D(amount), adjustment)


@pytest.mark.parametrize(
    ("currency", "amount"), [("JPY", "12"), ("USD", "12.35"), ("BHD", "12.346"), ("CLF", "12.3455")]
)
def test_lines_round_to_the_currencys_minor_unit(currency, amount):
    price = Price(metric_key="tokens", model="PER_UNIT", unit_price="0.000123455")
    assert charge(price, D(100_000), currency).amount == D(amount)  # 12.3455 exactly


def test_half_even_rounding_at_the_midpoint():
    assert round_money(D("0.125"), "USD") == D("0.12")
    assert round_money(D("0.135"), "USD") == D("0.14")
    assert round_money(D("2.5"), "JPY") == D("2")
    assert round_money(D("0.0005"), "BHD") == D("0.000")


def test_large_quantities_stay_exact():
    price = Price(metric_key="tokens", model="PER_UNIT", unit_price="0.000000000000000001")
    quantity = D("12345678901234567890.123456789012345678")
    assert charge(price, quantity, "BHD").amount == D("12.346")


@pytest.mark.parametrize(
    "fields",
    [
        {"model": "PER_UNIT"},
        {"model": "PACKAGE", "packageSize": "10"},
        {"model": "TIERED_VOLUME", "tiers": []},
        {"model": "TIERED_VOLUME", "tiers": [{"upTo": 10, "unitPrice": 1}]},  # last tier bounded
        {"model": "TIERED_GRADUATED", "tiers": [{"upTo": 10}, {"upTo": 5}, {"upTo": None}]},  # not ascending
        {"model": "TIERED_GRADUATED", "tiers": [{"upTo": None}, {"upTo": None}]},  # open tier not last
        {"model": "PER_UNIT", "unitPrice": "-1"},
        {"model": "PER_UNIT", "unitPrice": "1", "minimumCharge": "5", "maximumCharge": "1"},
    ],
)
def test_incomplete_or_inconsistent_prices_are_refused(fields):
    with pytest.raises(ValidationError):
        Price(metric_key="m", **fields)


def test_plans_take_iso_4217_codes_in_any_case_and_one_price_per_metric():
    assert Plan(key="p", name="P", currency="usd").currency == "USD"
    with pytest.raises(ValidationError, match="ISO 4217"):
        Plan(key="p", name="P", currency="XYZ")
    with pytest.raises(ValidationError, match="one price per metric"):
        Plan(
            key="p",
            name="P",
            currency="EUR",
            prices=[
                {"metricKey": "m", "model": "PER_UNIT", "unitPrice": 1},
                {"metricKey": "m", "model": "PER_UNIT", "unitPrice": 2},
            ],
        )


def test_the_largest_prices_and_quantities_round_without_overflow():
    price = Price(metric_key="tokens", model="PER_UNIT", unit_price="99999999999999999999.99")
    # (10^20 - 1) × (10^20 - 0.01), every digit kept
    assert charge(price, D("99999999999999999999"), "USD").amount == D("9999999999999999999899000000000000000000.01")


# Issue 13: eleven 38-digit records of a SUM metric add up to 40 digits, which usage_summary's Decimal(76, 18) holds.
OVER_38 = D("1012345000000000000000.000000000000000003")
LARGEST_AGGREGATE = D("9" * 58 + "." + "9" * 18)  # Decimal(76, 18) at its limit
LARGEST_PRICE = "99999999999999999999.999999999999999999"  # Money, Decimal(38, 18), at its limit


def test_an_aggregate_over_38_digits_is_priced_exactly_before_the_one_rounding():
    price = Price(metric_key="tokens", model="PER_UNIT", unit_price="1e-18", included_units="2e-18")
    result = charge(price, OVER_38, "USD")
    assert result.billable_units == D("1012345000000000000000.000000000000000001")
    # Exactly 1012.345000000000000000000000000000000001: just above the midpoint, so half-even gives .35
    # (a product cut to 38 digits would be 1012.345, and half-even would give .34).
    assert result.amount == D("1012.35")


# A = 10^58 - 10^-18 and P = 10^20 - 10^-18, so A × P = 10^78 - 10^40 - 10^2 + 10^-36: the expected amounts, rounded
# to CLF's 4 places, are written out in integers so that no decimal context is involved in the expectation.
@pytest.mark.parametrize(
    ("price", "amount"),
    [
        (Price(metric_key="m", model="PER_UNIT", unit_price=LARGEST_PRICE), D(10**78 - 10**40 - 100)),
        (
            Price(
                metric_key="m", model="PACKAGE", package_size="1e-18", package_price=LARGEST_PRICE
            ),  # (10^76 - 1) packages × P
            D(10**96 - 10**58 - 10**20),
        ),
        (
            Price(
                metric_key="m",
                model="TIERED_GRADUATED",
                tiers=[  # 1 × 0.5 + P, then (A - 1) × P + P
                    {"upTo": "1", "unitPrice": "0.5", "flatFee": LARGEST_PRICE},
                    {"upTo": None, "unitPrice": LARGEST_PRICE, "flatFee": LARGEST_PRICE},
                ],
            ),
            D(f"{10**78 - 10**40 + 10**20 - 100}.5"),
        ),
        (
            Price(
                metric_key="m",
                model="TIERED_VOLUME",
                tiers=[  # A × P + P
                    {"upTo": "1", "unitPrice": "0.5"},
                    {"upTo": None, "unitPrice": LARGEST_PRICE, "flatFee": LARGEST_PRICE},
                ],
            ),
            D(10**78 - 10**40 + 10**20 - 100),
        ),
    ],
    ids=["per_unit", "package", "graduated", "volume"],
)
def test_the_largest_aggregate_at_the_largest_prices_is_exact_in_every_model(price, amount):
    result = charge(price, LARGEST_AGGREGATE, "CLF")  # 4 places: the finest minor unit
    assert result.billable_units == LARGEST_AGGREGATE
    assert result.amount == amount and result.amount.as_tuple().exponent == -4
