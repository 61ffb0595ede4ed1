"""Invoice assembly: periods, plan changes mid-period, flat-fee proration, statuses, subtotals."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from zoneinfo import ZoneInfo

import jsonschema
import pytest

from metering_pipeline.billing.cycles import local_days
from metering_pipeline.billing.invoice import BillingError, billing_period, cycle_of, price, segments, status
from metering_pipeline.billing.selection import Selection
from metering_pipeline.cli.billing import render_invoice
from metering_schemas import Invoice, InvoiceStatus, LineType, Plan, Subscription
from metering_schemas.json_schema import SCHEMA_DIR

D = Decimal
UTC = UTC
NOV = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
NOW = datetime(2026, 11, 20, tzinfo=UTC)
NEW_YORK = ZoneInfo("America/New_York")


def plan(key: str, currency: str = "USD", flat_fee: str | None = "30", unit_price: str = "0.01") -> Plan:
    return Plan(
        key=key,
        name=key.title(),
        currency=currency,
        flat_fee=flat_fee,
        prices=[{"metricKey": "api_calls", "model": "PER_UNIT", "unitPrice": unit_price}],
    )


def totals(**quantities: Decimal) -> dict[Selection, Decimal]:
    """A segment's usage: each metric's total."""
    return {Selection.total(key): quantity for key, quantity in quantities.items()}


def sub(sid: str, plan_key: str, start: datetime, end: datetime | None = None) -> Subscription:
    return Subscription(id=sid, subject_type="org", subject_id="acme", plan_key=plan_key, start_at=start, end_at=end)


def test_billing_period_is_the_utc_calendar_month():
    assert billing_period("2026-11") == NOV
    assert billing_period("2026-12") == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    for bad in ("2026-13", "26-11", "1969-12", "9999-12"):
        with pytest.raises(BillingError):
            billing_period(bad)


def test_subscriptions_are_clipped_to_the_period_and_others_ignored():
    plans = {"basic": plan("basic")}
    found = segments(
        *NOV,
        [
            sub("s1", "basic", datetime(2026, 10, 15, tzinfo=UTC)),
            sub("old", "basic", datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)),
        ],
        plans,
    )
    assert [(s.subscription.id, s.start, s.end) for s in found] == [("s1", *NOV)]


def test_a_plan_change_mid_period_bills_each_part_on_its_plan_with_prorated_flat_fees():
    switch = datetime(2026, 11, 16, tzinfo=UTC)  # 15 of 30 days on each plan
    plans = {
        "basic": plan("basic", flat_fee="30", unit_price="0.01"),
        "pro": plan("pro", flat_fee="90", unit_price="0.005"),
    }
    parts = segments(
        *NOV, [sub("s2", "pro", switch), sub("s1", "basic", datetime(2026, 10, 1, tzinfo=UTC), switch)], plans
    )
    assert [(p.plan.key, p.start, p.end) for p in parts] == [("basic", NOV[0], switch), ("pro", switch, NOV[1])]
    invoice = price(
        "org",
        "acme",
        "2026-11",
        parts,
        [totals(api_calls=D(1000)), totals(api_calls=D(3001))],
        NOW,
        InvoiceStatus.OPEN,
        timedelta(days=1),
    )
    amounts = [(line.plan_key, line.type, line.amount) for line in invoice.lines]
    assert amounts == [
        ("basic", LineType.FLAT_FEE, D("15.00")),
        ("basic", LineType.USAGE, D("10.00")),
        ("pro", LineType.FLAT_FEE, D("45.00")),
        ("pro", LineType.USAGE, D("15.00")),  # 15.005 → half-even 15.00
    ]
    assert invoice.subtotal == D("85.00")
    assert [(p.plan_key, p.starts_at, p.ends_at) for p in invoice.plans] == [
        ("basic", NOV[0], switch),
        ("pro", switch, NOV[1]),
    ]


def test_proration_rounds_once_per_line():
    third = NOV[0] + timedelta(days=10)  # 10 of 30 days
    parts = segments(*NOV, [sub("s1", "basic", NOV[0], third)], {"basic": plan("basic", flat_fee="100")})
    invoice = price("org", "acme", "2026-11", parts, [{}], NOW, InvoiceStatus.OPEN, timedelta(0))
    assert invoice.lines[0].amount == D("33.33")


@pytest.mark.parametrize(("currency", "subtotal"), [("JPY", D("1235")), ("USD", D("1234.57")), ("BHD", D("1234.568"))])
def test_the_subtotal_is_the_sum_of_lines_rounded_to_the_currency(currency, subtotal):
    parts = segments(
        *NOV, [sub("s1", "p", NOV[0])], {"p": plan("p", currency=currency, flat_fee=None, unit_price="1.2345678")}
    )
    invoice = price("org", "acme", "2026-11", parts, [totals(api_calls=D(1000))], NOW, InvoiceStatus.OPEN, timedelta(0))
    assert (invoice.currency, invoice.subtotal) == (currency, subtotal)


def test_metrics_without_usage_still_get_a_line_and_unpriced_metrics_none():
    parts = segments(*NOV, [sub("s1", "p", NOV[0])], {"p": plan("p", flat_fee=None)})
    invoice = price("org", "acme", "2026-11", parts, [totals(storage_gb=D(5))], NOW, InvoiceStatus.OPEN, timedelta(0))
    assert [(line.metric_key, line.quantity, line.amount) for line in invoice.lines] == [("api_calls", D(0), D("0.00"))]


def test_no_subscription_gives_an_empty_invoice():
    invoice = price("org", "acme", "2026-11", [], [], NOW, InvoiceStatus.OPEN, timedelta(0))
    assert (invoice.lines, invoice.subtotal, invoice.currency) == ([], D(0), None)


def test_one_invoice_has_one_currency_and_plans_must_exist():
    plans = {"usd": plan("usd"), "eur": plan("eur", currency="EUR")}
    with pytest.raises(BillingError, match="one currency"):
        segments(
            *NOV,
            [sub("a", "usd", NOV[0], NOV[0] + timedelta(days=3)), sub("b", "eur", NOV[0] + timedelta(days=3))],
            plans,
        )
    with pytest.raises(BillingError, match="does not exist"):
        segments(*NOV, [sub("a", "gone", NOV[0])], plans)


def test_status_is_open_then_settling_then_final():
    end, lateness = NOV[1], timedelta(days=2)
    assert status(end - timedelta(seconds=1), end, lateness, settled=True) is InvoiceStatus.OPEN
    assert status(end, end, lateness, settled=True) is InvoiceStatus.SETTLING
    assert status(end + lateness - timedelta(seconds=1), end, lateness, settled=True) is InvoiceStatus.SETTLING
    assert status(end + lateness, end, lateness, settled=False) is InvoiceStatus.SETTLING  # records still in flight
    assert status(end + lateness, end, lateness, settled=True) is InvoiceStatus.FINAL


# Issue 13: a month of usage over 38 digits (eleven records at the contract's limit, summed in Decimal(76, 18)).
OVER_38 = D("1012345000000000000000.000000000000000003")


def tokens_plan(unit_price: str, **price: str) -> dict[str, Plan]:
    return {
        "p": Plan(
            key="p",
            name="P",
            currency="USD",
            prices=[{"metricKey": "tokens", "model": "PER_UNIT", "unitPrice": unit_price, **price}],
        )
    }


def test_usage_over_38_digits_is_invoiced_exactly_and_reads_back_as_stored():
    parts = segments(*NOV, [sub("s1", "p", NOV[0])], tokens_plan("1e-18", includedUnits="2e-18"))
    invoice = price("org", "acme", "2026-11", parts, [totals(tokens=OVER_38)], NOW, InvoiceStatus.FINAL, timedelta(0))
    [line] = invoice.lines
    assert (line.quantity, line.included_units, line.billable_units) == (
        OVER_38,
        D("2e-18"),
        D("1012345000000000000000.000000000000000001"),
    )
    assert (line.amount, invoice.subtotal) == (D("1012.35"), D("1012.35"))  # 1012.345…0001, half-even
    written = json.loads(invoice.to_json())
    assert (written["lines"][0]["quantity"], written["subtotal"]) == (str(OVER_38), "1012.35")
    assert Invoice.model_validate_json(invoice.to_json()) == invoice  # how a stored FINAL invoice is read back
    jsonschema.Draft202012Validator(json.loads((SCHEMA_DIR / "invoice.schema.json").read_text())).validate(written)


def test_amounts_up_to_58_digits_are_invoiced_and_larger_ones_refused_with_a_code():
    parts = segments(*NOV, [sub("s1", "p", NOV[0])], tokens_plan("1"))
    invoice = price(
        "org", "acme", "2026-11", parts, [totals(tokens=D(10) ** 40)], NOW, InvoiceStatus.FINAL, timedelta(0)
    )
    assert str(invoice.subtotal) == "1" + "0" * 40 + ".00"  # what the invoices table's Decimal(76, 18) stores exactly
    largest = D("9" * 58 + ".99")
    assert (
        price(
            "org", "acme", "2026-11", parts, [totals(tokens=largest)], NOW, InvoiceStatus.FINAL, timedelta(0)
        ).subtotal
        == largest
    )

    with pytest.raises(BillingError, match="tokens line comes to 1" + "0" * 58 + r"\.00") as refused:
        price("org", "acme", "2026-11", parts, [totals(tokens=D(10**58))], NOW, InvoiceStatus.FINAL, timedelta(0))
    assert refused.value.code == "amount_too_large"
    # Each line fits, their sum does not.
    two = {
        "p": Plan(
            key="p",
            name="P",
            currency="USD",
            prices=[{"metricKey": key, "model": "PER_UNIT", "unitPrice": "90000000000000000000"} for key in ("a", "b")],
        )
    }
    parts = segments(*NOV, [sub("s1", "p", NOV[0])], two)
    with pytest.raises(BillingError, match="subtotal") as refused:
        price(
            "org", "acme", "2026-11", parts, [totals(a=D("6e37"), b=D("6e37"))], NOW, InvoiceStatus.FINAL, timedelta(0)
        )
    assert refused.value.code == "amount_too_large"
    # A maximum charge bounds a line whatever the usage.
    capped = segments(*NOV, [sub("s1", "p", NOV[0])], tokens_plan("1", maximumCharge="1000"))
    assert price(
        "org", "acme", "2026-11", capped, [totals(tokens=D(10) ** 57)], NOW, InvoiceStatus.FINAL, timedelta(0)
    ).subtotal == D("1000.00")


# Issue 15: prices per dimension value.
def tokens_by_model() -> dict[str, Plan]:
    return {
        "p": Plan(
            key="p",
            name="P",
            currency="USD",
            prices=[
                {"metricKey": "tokens", "model": "PER_UNIT", "unitPrice": "0.001"},  # every token, whatever the model
                {"metricKey": "tokens", "model": "PER_UNIT", "unitPrice": "0.03", "dimensions": {"model": "gpt-4"}},
                {
                    "metricKey": "tokens",
                    "model": "PER_UNIT",
                    "unitPrice": "0.002",
                    "includedUnits": "100",
                    "dimensions": {"model": "gpt-3.5", "region": "eu"},
                },
                {"metricKey": "tokens", "model": "PER_UNIT", "unitPrice": "1", "dimensions": {"model": "unused"}},
            ],
        )
    }


def test_each_price_is_its_own_line_over_the_usage_it_selects_named_by_its_dimensions():
    parts = segments(*NOV, [sub("s1", "p", NOV[0])], tokens_by_model())
    usage = {
        Selection("tokens"): D(1500),
        Selection("tokens", (("model", "gpt-4"),)): D(1000),
        Selection("tokens", (("model", "gpt-3.5"), ("region", "eu"))): D(500),
    }
    invoice = price("org", "acme", "2026-11", parts, [usage], NOW, InvoiceStatus.OPEN, timedelta(0))
    assert [
        (line.metric_key, line.dimensions, line.quantity, line.billable_units, line.amount) for line in invoice.lines
    ] == [
        ("tokens", {}, D(1500), D(1500), D("1.50")),  # the total: priced too, beside the per-model lines
        ("tokens", {"model": "gpt-4"}, D(1000), D(1000), D("30.00")),
        ("tokens", {"model": "gpt-3.5", "region": "eu"}, D(500), D(400), D("0.80")),  # its own included units
        ("tokens", {"model": "unused"}, D(0), D(0), D("0.00")),  # no usage with that value: a zero line
    ]
    assert invoice.subtotal == D("32.30")
    written = json.loads(invoice.to_json())
    assert [line["dimensions"] for line in written["lines"]] == [
        {},
        {"model": "gpt-4"},
        {"model": "gpt-3.5", "region": "eu"},
        {"model": "unused"},
    ]
    assert Invoice.model_validate_json(invoice.to_json()) == invoice
    jsonschema.Draft202012Validator(json.loads((SCHEMA_DIR / "invoice.schema.json").read_text())).validate(written)


def test_the_cli_names_a_priced_dimension_line_by_its_dimensions():
    parts = segments(*NOV, [sub("s1", "p", NOV[0])], tokens_by_model())
    invoice = price(
        "org",
        "acme",
        "2026-11",
        parts,
        [{Selection("tokens", (("model", "gpt-4"),)): D(1000)}],
        NOW,
        InvoiceStatus.OPEN,
        timedelta(0),
    )
    table = render_invoice(invoice)
    assert "tokens (model=gpt-4)" in table and "tokens (model=gpt-3.5, region=eu)" in table
    assert "30.00" in table


def test_a_dimension_line_too_large_is_refused_naming_its_dimensions():
    parts = segments(*NOV, [sub("s1", "p", NOV[0])], tokens_by_model())
    with pytest.raises(BillingError, match=r"plan p's tokens \(model=unused\) line comes to") as refused:
        price(
            "org",
            "acme",
            "2026-11",
            parts,
            [{Selection("tokens", (("model", "unused"),)): D(10) ** 58}],
            NOW,
            InvoiceStatus.OPEN,
            timedelta(0),
        )
    assert refused.value.code == "amount_too_large"


def zoned_sub(
    sid: str, start: datetime, zone: str, billing_time: str = "calendar", anchor: int | None = None
) -> Subscription:
    return Subscription(
        id=sid,
        subject_type="org",
        subject_id="acme",
        plan_key="basic",
        start_at=start,
        time_zone=zone,
        billing_time=billing_time,
        billing_anchor=anchor,
    )


def test_an_invoice_period_is_the_cycle_that_starts_in_that_month_of_the_subscriptions_zone():
    kolkata = zoned_sub("k", datetime(2026, 1, 10, tzinfo=UTC), "Asia/Kolkata")
    cycle = cycle_of("2026-02", [kolkata])
    assert (cycle.start, cycle.end, cycle.zone) == (
        datetime(2026, 1, 31, 18, 30, tzinfo=UTC),  # 1 February, 00:00 in Kolkata
        datetime(2026, 2, 28, 18, 30, tzinfo=UTC),
        "Asia/Kolkata",
    )
    # Anniversary on the 31st: February's cycle starts on the 28th, March's on the 31st.
    on_31st = zoned_sub("a", datetime(2026, 1, 31, tzinfo=UTC), "UTC", "anniversary", 31)
    assert (cycle_of("2026-02", [on_31st]).start, cycle_of("2026-02", [on_31st]).end) == (
        datetime(2026, 2, 28, tzinfo=UTC),
        datetime(2026, 3, 31, tzinfo=UTC),
    )
    # Without an anchor, the start's local day: 20:00 UTC on 30 January is already the 31st in Kolkata.
    started = zoned_sub("s", datetime(2026, 1, 30, 20, tzinfo=UTC), "Asia/Kolkata", "anniversary")
    assert cycle_of("2026-04", [started]).start == datetime(2026, 4, 29, 18, 30, tzinfo=UTC)  # 30 April local
    assert cycle_of("2026-04", []).start == NOV[0].replace(month=4)  # no subscription: the UTC month
    # The latest subscription to start by the month's end governs: a move to New York in March.
    moved = zoned_sub("n", datetime(2026, 3, 1, tzinfo=UTC), "America/New_York")
    assert cycle_of("2026-02", [kolkata, moved]).zone == "Asia/Kolkata"
    assert cycle_of("2026-03", [kolkata, moved]).start == datetime(2026, 3, 1, 5, tzinfo=UTC)


def test_an_anchor_is_for_anniversary_billing_only():
    with pytest.raises(ValueError, match="billingAnchor applies to anniversary billing"):
        zoned_sub("x", NOV[0], "UTC", "calendar", 15)


def test_proration_counts_local_days_whatever_their_length():
    """New York's March 2026 has 31 days, one of 23 hours (8 March): a subscription from 16 March local midnight
    covers 16 of them, whatever the seconds say."""
    new_york = zoned_sub("n", datetime(2026, 3, 16, 4, tzinfo=UTC), "America/New_York")  # 00:00 EDT
    cycle = cycle_of("2026-03", [new_york])
    parts = segments(cycle.start, cycle.end, [new_york], {"basic": plan("basic", flat_fee="31")})
    invoice = price("org", "acme", "2026-03", parts, [{}], NOW, InvoiceStatus.OPEN, timedelta(0), cycle)
    assert invoice.lines[0].amount == D("16.00")
    assert (invoice.time_zone, invoice.local_period_start, invoice.local_period_end) == (
        "America/New_York",
        "2026-03-01T00:00:00-05:00",
        "2026-04-01T00:00:00-04:00",
    )
    assert local_days(cycle.start, cycle.end, NEW_YORK) == 31
    # 00:00 EST to 12:00 EDT on 8 March: 11 of that day's 23 hours.
    morning = local_days(datetime(2026, 3, 8, 5, tzinfo=UTC), datetime(2026, 3, 8, 16, tzinfo=UTC), NEW_YORK)
    assert abs(morning - Context(prec=60).divide(D(11), D(23))) < D("1e-50")
