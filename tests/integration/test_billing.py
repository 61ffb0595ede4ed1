"""Billing end to end through the real broker, a worker and the ClickHouse endpoint: plans and
subscriptions over the API, records published with their Kafka times, the invoice preview (API and
CLI) for a closed period with a plan change, its reproducibility, prices per dimension value, UNIQUE_COUNT and
LATEST over parts of a month, and the dashboard in headless Chromium."""

from __future__ import annotations

import asyncio
import csv
import decimal
import io
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from metering_pipeline.topics import Topics
from metering_pipeline.warehouse.client import connect
from support import define, eventually, headless_chromium, running_api, settings_env

pytestmark = pytest.mark.integration

UTC = UTC
# Billing closes a period an hour after it ends; the workers keep their default 35 days, so the
# test can publish records of the closed month today (its last days are always within 35 days).
BILLING_ENV = {"METERING_ALLOWED_LATENESS": "PT1H"}


def month_start(at: datetime) -> datetime:
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


# The closed month billed here: the previous one (or the one before, in a month's first two hours).
PERIOD_END = month_start(datetime.now(UTC) - timedelta(hours=2))
PERIOD_START = month_start(PERIOD_END - timedelta(days=1))
PERIOD = PERIOD_START.strftime("%Y-%m")
SWITCH = PERIOD_END - timedelta(days=2)  # the subject moves from the basic plan to pro


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def prorated(fee: str, start: datetime, end: datetime) -> Decimal:
    share = Decimal((end - start).total_seconds()) / Decimal((PERIOD_END - PERIOD_START).total_seconds())
    return (Decimal(fee) * share).quantize(Decimal("0.01"), ROUND_HALF_EVEN)


async def publish_at(settings, records: list[tuple[dict, datetime]]) -> None:
    """Each record with its own Kafka message time (what the allowed lateness is measured against)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for record, message_time in records:
            await producer.send_and_wait(
                Topics.of(settings).usage_recorded,
                orjson.dumps(record),
                key=f"{record['subjectType']}:{record['subjectId']}".encode(),
                timestamp_ms=int(message_time.timestamp() * 1000),
            )
    finally:
        await producer.stop()


def usage(record_id: str, metric: str, quantity: str, timestamp: datetime) -> dict:
    return {
        "id": record_id,
        "metricKey": metric,
        "subjectType": "org",
        "subjectId": "acme",
        "quantity": quantity,
        "timestamp": iso(timestamp),
    }


def monthly(client, metric: str, start: datetime = PERIOD_START) -> dict:
    params = {
        "metricKey": metric,
        "subjectType": "org",
        "subjectId": "acme",
        "periodType": "MONTHLY",
        "periodStart": iso(start),
    }
    [summary] = client.get("/v1/usage/summary", params=params).json()["summaries"]
    return summary


BASIC = {
    "key": "basic",
    "name": "Basic",
    "currency": "usd",
    "flatFee": "10",
    "prices": [{"metricKey": "api_calls", "model": "PER_UNIT", "unitPrice": "0.02"}],
}
PRO = {
    "key": "pro",
    "name": "Pro",
    "currency": "USD",
    "flatFee": "49",
    "prices": [
        {
            "metricKey": "api_calls",
            "model": "TIERED_GRADUATED",
            "includedUnits": "100",
            "tiers": [{"upTo": "1000", "unitPrice": "0.01"}, {"upTo": None, "unitPrice": "0.005", "flatFee": "1"}],
        },
        {
            "metricKey": "storage_gb",
            "model": "PACKAGE",
            "packageSize": "10",
            "packagePrice": "2.5",
            "minimumCharge": "5",
        },
    ],
}


async def keep_producer_times(settings) -> None:
    """These tests replay a closed month, each record with the message time it would have had then: that needs
    usage.recorded to keep the producers' times (CreateTime, as an operator may set it; the product creates the
    topic with the broker's, LogAppendTime)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        topic = Topics.of(settings).usage_recorded
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {"message.timestamp.type": "CreateTime"})]
        )
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def billing(module_pipeline, tmp_path_factory):
    settings, new_worker = module_pipeline
    asyncio.run(keep_producer_times(settings))
    worker = new_worker().start()
    worker.wait_healthy()
    with running_api(settings, tmp_path_factory.mktemp("billing-api"), BILLING_ENV) as api:
        admin = api.client()
        for key, aggregation in (("api_calls", "SUM"), ("storage_gb", "MAX"), ("tokens", "SUM")):
            assert (
                admin.post(
                    "/v1/metrics",
                    json={"key": key, "name": key, "aggregationType": aggregation, "resetPeriod": "MONTHLY"},
                ).status_code
                == 201
            )
        yield api


def test_plan_and_subscription_commands_validate_and_scope(billing):
    admin, org1 = billing.client(), billing.client("org1")
    assert admin.post("/v1/plans", json=BASIC).json()["currency"] == "USD"
    assert admin.post("/v1/plans", json=PRO).status_code == 201
    assert admin.post("/v1/plans", json=BASIC).status_code == 409
    bad = admin.post("/v1/plans", json={**BASIC, "key": "bad", "currency": "EURO"})
    assert (bad.status_code, bad.json()["errors"][0]["field"]) == (422, "body.currency")
    tiers = admin.post(
        "/v1/plans",
        json={
            **PRO,
            "key": "bad2",
            "prices": [{"metricKey": "x", "model": "TIERED_VOLUME", "tiers": [{"upTo": "5", "unitPrice": "1"}]}],
        },
    )
    assert tiers.status_code == 422 and "open-ended" in tiers.json()["message"]
    typo = admin.post(
        "/v1/plans",
        json={**BASIC, "key": "bad3", "prices": [{"metricKey": "api_cals", "model": "PER_UNIT", "unitPrice": "1"}]},
    )
    assert (typo.status_code, typo.json()["error"], typo.json()["errors"][0]["field"]) == (
        422,
        "unknown_metric",
        "body.prices.0.metricKey",
    )
    assert [p["key"] for p in admin.get("/v1/plans").json()["plans"]] == ["basic", "pro"]
    assert org1.post("/v1/plans", json={**BASIC, "key": "org1-plan"}).json()["orgId"] == "org-1"
    assert (
        org1.put("/v1/plans/basic", json={k: v for k, v in BASIC.items() if k != "key"}).json()["error"]
        == "forbidden_org"
    )

    created = admin.post(
        "/v1/subscriptions",
        json={
            "id": "s-basic",
            "subjectType": "org",
            "subjectId": "acme",
            "planKey": "basic",
            "startAt": PERIOD_START.strftime("%Y-%m-%d"),
            "endAt": iso(SWITCH),
        },
    )
    assert created.status_code == 201 and created.json()["startAt"] == iso(PERIOD_START)
    assert (
        admin.post(
            "/v1/subscriptions",
            json={"id": "s-pro", "subjectType": "org", "subjectId": "acme", "planKey": "pro", "startAt": iso(SWITCH)},
        ).status_code
        == 201
    )
    backwards = admin.put("/v1/subscriptions/s-basic", json={"endAt": iso(PERIOD_START - timedelta(days=30))})
    assert backwards.status_code == 422
    assert (
        admin.post(
            "/v1/subscriptions",
            json={"subjectType": "org", "subjectId": "acme", "planKey": "nope", "startAt": "2026-10-01"},
        ).status_code
        == 404
    )
    assert (
        org1.post(
            "/v1/subscriptions",
            json={"subjectType": "org", "subjectId": "acme", "planKey": "basic", "startAt": "2026-10-01"},
        ).json()["error"]
        == "forbidden_org"
    )
    listed = admin.get("/v1/subscriptions", params={"subjectType": "org", "subjectId": "acme"}).json()["subscriptions"]
    assert [s["id"] for s in listed] == ["s-basic", "s-pro"]
    assert admin.delete("/v1/plans/pro").json()["error"] == "plan_in_use"
    assert org1.delete("/v1/plans/org1-plan").status_code == 204


def test_invoice_of_a_closed_period_with_a_plan_change_is_exact_final_and_reproducible(billing, tmp_path):
    admin = billing.client()
    settings = billing.settings
    on_time = [
        (usage("c1", "api_calls", "300", SWITCH - timedelta(hours=14)), SWITCH - timedelta(hours=14)),
        (usage("c2", "api_calls", "0.5", SWITCH - timedelta(minutes=30)), SWITCH - timedelta(minutes=30)),
        (usage("c3", "api_calls", "800", SWITCH + timedelta(hours=12)), SWITCH + timedelta(hours=12)),
        (
            usage("c3", "api_calls", "800", SWITCH + timedelta(hours=12)),
            SWITCH + timedelta(hours=12, seconds=5),
        ),  # a retry
        (usage("c4", "api_calls", "700", SWITCH + timedelta(hours=13)), SWITCH + timedelta(hours=13)),
        (
            usage("s1", "storage_gb", "40", SWITCH - timedelta(days=1)),
            SWITCH - timedelta(days=1),
        ),  # basic prices no storage
        (usage("s2", "storage_gb", "25", SWITCH + timedelta(hours=1)), SWITCH + timedelta(hours=1)),
        (usage("s3", "storage_gb", "12", SWITCH + timedelta(days=1)), SWITCH + timedelta(days=1)),
        # Late, but within billing's allowed lateness (sent 30 minutes after the month ended): it belongs to the month.
        (usage("c5", "api_calls", "50", PERIOD_END - timedelta(minutes=30)), PERIOD_END + timedelta(minutes=30)),
    ]
    asyncio.run(publish_at(settings, on_time))
    eventually(
        lambda: monthly(admin, "api_calls")["recordCount"] == 5,
        60,
        interval=0.5,
        message=lambda: str(monthly(admin, "api_calls")),
    )
    assert Decimal(monthly(admin, "api_calls")["totalQuantity"]) == Decimal("1850.5")

    response = admin.get("/v1/subjects/org/acme/invoice", params={"period": PERIOD})
    assert response.status_code == 200, response.text
    invoice = response.json()
    assert (invoice["status"], invoice["currency"], invoice["closesAt"]) == (
        "FINAL",
        "USD",
        iso(PERIOD_END + timedelta(hours=1)),
    )
    assert [(p["planKey"], p["startsAt"], p["endsAt"]) for p in invoice["plans"]] == [
        ("basic", iso(PERIOD_START), iso(SWITCH)),
        ("pro", iso(SWITCH), iso(PERIOD_END)),
    ]
    basic_fee, pro_fee = prorated("10", PERIOD_START, SWITCH), prorated("49", SWITCH, PERIOD_END)
    lines = [
        (line["planKey"], line["metricKey"], line["quantity"], Decimal(line["amount"])) for line in invoice["lines"]
    ]
    assert lines == [
        ("basic", None, "0", basic_fee),  # 10 × the basic part of the month
        ("basic", "api_calls", "300.5", Decimal("6.01")),  # 300.5 × 0.02
        ("pro", None, "0", pro_fee),  # 49 × 2 days of the month
        ("pro", "api_calls", "1550", Decimal("13.25")),  # 1450 billable: 1000 × 0.01 + 450 × 0.005 + 1
        ("pro", "storage_gb", "25", Decimal("7.50")),  # MAX 25 → 3 packages × 2.5
    ]
    assert [(t["tier"], t["units"]) for t in invoice["lines"][3]["tiers"]] == [(1, "1000"), (2, "450")]
    assert Decimal(invoice["subtotal"]) == basic_fee + pro_fee + Decimal("26.76")
    # The usage lines add up to what reporting shows for the month.
    assert Decimal("300.5") + Decimal("1550") == Decimal(monthly(admin, "api_calls")["totalQuantity"])

    # The CLI computes the same invoice (it reads the stored FINAL one).
    env = {**os.environ, **settings_env(settings), **BILLING_ENV}
    cli = subprocess.run(
        [sys.executable, "-m", "metering_pipeline.cli", "invoice", "org:acme", "--period", PERIOD, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == invoice
    table = subprocess.run(
        [sys.executable, "-m", "metering_pipeline.cli", "invoice", "org:acme", "--period", PERIOD],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "FINAL" in table and invoice["subtotal"] in table and "t1: 1000 × 0.01; t2: 450 × 0.005 + 1" in table

    # Later changes (a record the workers still fold into the month, a new price) leave the FINAL invoice as it was.
    asyncio.run(
        publish_at(settings, [(usage("c6", "api_calls", "1000", SWITCH + timedelta(days=1)), datetime.now(UTC))])
    )
    eventually(lambda: monthly(admin, "api_calls")["recordCount"] == 6, 60, interval=0.5)
    assert (
        admin.put("/v1/plans/pro", json={**{k: v for k, v in PRO.items() if k != "key"}, "flatFee": "59"}).status_code
        == 200
    )
    assert admin.get("/v1/subjects/org/acme/invoice", params={"period": PERIOD}).json() == invoice

    # The running month is OPEN and priced with the current plan: flat fee 59 plus storage's minimum charge.
    current = admin.get("/v1/subjects/org/acme/invoice", params={"period": datetime.now(UTC).strftime("%Y-%m")}).json()
    assert (current["status"], current["subtotal"]) == ("OPEN", "64.00")
    assert billing.client("org1").get("/v1/subjects/org/acme/invoice", params={"period": PERIOD}).status_code == 403
    assert admin.get("/v1/subjects/org/acme/invoice", params={"period": "2026-13"}).status_code == 422


# Issue 13: eleven records within the contract (38 digits, 18 after the point) whose month sums to 40 digits.
ELEVEN = ["99999999999999999999.999999999999999999"] * 10 + ["12345000000000000000.000000000000000013"]
OVER_38 = "1012345000000000000000.000000000000000003"
BIG_PLANS = {  # one subject each, all billing the same eleven records
    "bigco": {
        "key": "big-tokens",
        "name": "Tokens",
        "currency": "USD",
        "prices": [{"metricKey": "tokens", "model": "PER_UNIT", "unitPrice": "1e-18", "includedUnits": "2e-18"}],
    },
    "hugeco": {
        "key": "huge-tokens",
        "name": "Dear tokens",
        "currency": "USD",
        "prices": [{"metricKey": "tokens", "model": "PER_UNIT", "unitPrice": "99999999999999999999"}],
    },
    "overco": {
        "key": "over-tokens",
        "name": "Atomic packages",
        "currency": "USD",
        "prices": [  # 10^18 packages a unit
            {"metricKey": "tokens", "model": "PACKAGE", "packageSize": "1e-18", "packagePrice": "99999999999999999999"}
        ],
    },
}


async def aggregated_until(settings, subject_id: str, done, timeout: float = 60) -> list[dict]:
    """The subject's usage.aggregated events (from the topic's start, as committed) until `done(events)`."""
    consumer = AIOKafkaConsumer(
        Topics.of(settings).usage_aggregated,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    found: list[dict] = []
    try:
        async with asyncio.timeout(timeout):
            while not done(found):
                for messages in (await consumer.getmany(timeout_ms=500)).values():
                    found.extend(e for m in messages if (e := json.loads(m.value))["subjectId"] == subject_id)
    finally:
        await consumer.stop()
    return found


def test_a_month_of_usage_over_38_digits_is_summarized_exported_emitted_and_invoiced_exactly(billing):
    admin, settings = billing.client(), billing.settings
    for subject_id, plan in BIG_PLANS.items():
        assert admin.post("/v1/plans", json=plan).status_code == 201
        assert (
            admin.post(
                "/v1/subscriptions",
                json={
                    "id": f"s-{subject_id}",
                    "subjectType": "org",
                    "subjectId": subject_id,
                    "planKey": plan["key"],
                    "startAt": iso(PERIOD_START),
                },
            ).status_code
            == 201
        )
    first = PERIOD_END - timedelta(hours=20)
    records = [
        (
            {**usage(f"t{i}", "tokens", quantity, first + timedelta(minutes=i)), "subjectId": subject_id},
            first + timedelta(minutes=i),
        )
        for subject_id in BIG_PLANS
        for i, quantity in enumerate(ELEVEN)
    ]
    asyncio.run(publish_at(settings, records))
    exact = decimal.Context(prec=100, traps=[decimal.Inexact])
    assert exact.add(exact.multiply(Decimal(ELEVEN[0]), 10), Decimal(ELEVEN[-1])) == Decimal(OVER_38)

    def summary(subject_id: str) -> dict:
        found = admin.get(
            "/v1/usage/summary",
            params={
                "metricKey": "tokens",
                "subjectType": "org",
                "subjectId": subject_id,
                "periodType": "MONTHLY",
                "periodStart": iso(PERIOD_START),
            },
        )
        assert found.status_code == 200, found.text
        return found.json()["summaries"][0]

    for subject_id in BIG_PLANS:
        eventually(
            lambda subject_id=subject_id: summary(subject_id)["recordCount"] == 11,
            60,
            interval=0.5,
            message=lambda subject_id=subject_id: str(summary(subject_id)),
        )
        assert summary(subject_id)["totalQuantity"] == OVER_38

    # The usage.aggregated event of the month carries the total digit for digit.
    events = asyncio.run(
        aggregated_until(
            settings, "bigco", lambda found: any(e["periodType"] == "MONTHLY" and e["recordCount"] == 11 for e in found)
        )
    )
    [monthly_event] = [e for e in events if e["periodType"] == "MONTHLY" and e["recordCount"] == 11][-1:]
    assert (monthly_event["metricKey"], monthly_event["totalQuantity"]) == ("tokens", OVER_38)

    # The export has each record exactly; they add up to the summary's total.
    window = {
        "subjectType": "org",
        "subjectId": "bigco",
        "metricKey": "tokens",
        "from": iso(PERIOD_START),
        "to": iso(PERIOD_END),
    }
    lines = admin.get("/v1/usage/export", params={**window, "format": "jsonl"})
    assert lines.status_code == 200, lines.text
    exported = [json.loads(line) for line in lines.text.splitlines()]
    rows = list(csv.DictReader(io.StringIO(admin.get("/v1/usage/export", params={**window, "format": "csv"}).text)))
    for found in (exported, rows):
        assert sorted(Decimal(r["quantity"]) for r in found) == sorted(Decimal(q) for q in ELEVEN)
        total = Decimal(0)
        for r in found:
            total = exact.add(total, Decimal(r["quantity"]))
        assert total == Decimal(OVER_38)

    # The invoice: 1012345000000000000000.000000000000000001 billable × 1e-18 = 1012.345…0001 → 1012.35.
    response = admin.get("/v1/subjects/org/bigco/invoice", params={"period": PERIOD})
    assert response.status_code == 200, response.text
    invoice = response.json()
    [line] = invoice["lines"]
    assert (
        invoice["status"],
        line["quantity"],
        line["includedUnits"],
        line["billableUnits"],
        line["amount"],
        invoice["subtotal"],
    ) == ("FINAL", OVER_38, "2E-18", "1012345000000000000000.000000000000000001", "1012.35", "1012.35")
    # 1012345000000000000000.000000000000000003 × 99999999999999999999 = …000299.999999999999999997 → …000300.00:
    # 42 digits before the point, stored exactly.
    huge = admin.get("/v1/subjects/org/hugeco/invoice", params={"period": PERIOD}).json()
    assert (huge["status"], huge["subtotal"]) == ("FINAL", "101234499999999999998987655000000000000300.00")
    # 10^39 packages × 10^20 is past the 58 digits an invoice amount has: refused with a code, nothing stored.
    over = admin.get("/v1/subjects/org/overco/invoice", params={"period": PERIOD})
    assert (over.status_code, over.json()["error"]) == (409, "amount_too_large"), over.text
    assert "58 digits" in over.json()["message"]
    with connect(settings) as client:
        stored = client.query(
            "SELECT subject_id, subtotal, body FROM invoices WHERE subject_type = 'org' AND "
            "period = {period:String} AND subject_id IN {ids:Array(String)} ORDER BY subject_id",
            parameters={"period": PERIOD, "ids": list(BIG_PLANS)},
        ).result_rows
    assert [(subject_id, subtotal) for subject_id, subtotal, _ in stored] == [
        ("bigco", Decimal("1012.35")),
        ("hugeco", Decimal("101234499999999999998987655000000000000300")),
    ]
    assert json.loads(stored[0][2]) == invoice  # the stored body is what the API served (and serves from now on)
    assert admin.get("/v1/subjects/org/bigco/invoice", params={"period": PERIOD}).json() == invoice

    # The CLI's --json outputs carry the same digits.
    env = {**os.environ, **settings_env(settings), **BILLING_ENV}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "metering_pipeline.cli", *args], env=env, capture_output=True, text=True, timeout=120
        )

    shown = cli("invoice", "org:bigco", "--period", PERIOD, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == invoice
    refused = cli("invoice", "org:overco", "--period", PERIOD, "--json")
    assert refused.returncode == 2 and "amount_too_large" in refused.stderr, refused.stderr
    summed = cli(
        "summary",
        "--metric",
        "tokens",
        "--subject",
        "org:bigco",
        "--period",
        "MONTHLY",
        "--from",
        PERIOD_START.strftime("%Y-%m-%d"),
        "--to",
        PERIOD_END.strftime("%Y-%m-%d"),
        "--json",
    )
    assert summed.returncode == 0, summed.stderr
    assert [(s["totalQuantity"], s["recordCount"]) for s in map(json.loads, summed.stdout.splitlines())] == [
        (OVER_38, 11)
    ]


# Issue 15: prices per dimension value, and UNIQUE_COUNT / LATEST billed over part of a month.
def defined(billing, *definitions: dict) -> None:
    """Metric definitions published on the metrics topic (as `metering metric define` does), once the API serves
    them and a worker has mirrored them (its catalog routes with them then)."""
    asyncio.run(
        define(
            billing.settings, *({"id": d["key"], "name": d["key"], "resetPeriod": "MONTHLY", **d} for d in definitions)
        )
    )
    admin = billing.client()
    with connect(billing.settings) as client:
        for d in definitions:
            eventually(
                lambda d=d: admin.get(f"/v1/metrics/{d['key']}").status_code == 200, 60, interval=0.5, message=d["key"]
            )
            eventually(
                lambda d=d: (
                    client.query(
                        "SELECT count() FROM metric_definitions FINAL WHERE id = {id:String}",
                        parameters={"id": d["key"]},
                    ).result_rows[0][0]
                    > 0
                ),
                60,
                interval=0.5,
                message=d["key"],
            )
    time.sleep(1)  # every worker's catalog has them


def monthly_rows(settings, metric: str, subject_id: str) -> dict[tuple[tuple[str, str], ...], tuple[Decimal, int]]:
    """usage_summary's MONTHLY rows of the billed month: dimensions (sorted pairs; () is the total row) → (total,
    records)."""
    with connect(settings) as client:
        rows = client.query(
            "SELECT dimensions, total_quantity, record_count FROM usage_summary WHERE metric_key = {metric:String} "
            "AND subject_type = 'org' AND subject_id = {subject_id:String} AND period_type = 'MONTHLY' "
            "AND period_start = {start:DateTime}",
            parameters={"metric": metric, "subject_id": subject_id, "start": PERIOD_START.replace(tzinfo=None)},
        ).result_rows
    return {tuple(sorted(dimensions.items())): (total, count) for dimensions, total, count in rows}


def hourly_totals_added(settings, metric: str, subject_id: str, start: datetime, end: datetime) -> Decimal:
    """What adding up the total rows of the hours in [start, end) gives (what billing must not do for UNIQUE_COUNT)."""
    with connect(settings) as client:
        return client.query(
            "SELECT sum(total_quantity) FROM usage_summary WHERE metric_key = {metric:String} AND subject_type = 'org' "
            "AND subject_id = {subject_id:String} AND period_type = 'HOURLY' AND empty(dimensions) "
            "AND period_start >= {start:DateTime} AND period_start < {end:DateTime}",
            parameters={
                "metric": metric,
                "subject_id": subject_id,
                "start": start.replace(tzinfo=None),
                "end": end.replace(tzinfo=None),
            },
        ).result_rows[0][0]


def event(record_id: str, metric: str, subject_id: str, at: datetime, **metadata: object) -> tuple[dict, datetime]:
    """A record with metadata, sent at its own time."""
    return {**usage(record_id, metric, "1", at), "subjectId": subject_id, "metadata": metadata}, at


def usage_lines(invoice: dict) -> list[tuple]:
    return [
        (
            line["planKey"],
            line["metricKey"],
            line["dimensions"],
            line["quantity"],
            line["billableUnits"],
            line["amount"],
        )
        for line in invoice["lines"]
        if line["type"] == "USAGE"
    ]


PER_MODEL = {
    "key": "per-model",
    "name": "Tokens per model",
    "currency": "USD",
    "prices": [
        {
            "metricKey": "llm_tokens",
            "model": "PER_UNIT",
            "unitPrice": "0.001",
        },  # every token, beside the per-model lines
        {"metricKey": "llm_tokens", "model": "PER_UNIT", "unitPrice": "0.03", "dimensions": {"model": "gpt-4"}},
        {
            "metricKey": "llm_tokens",
            "model": "PER_UNIT",
            "unitPrice": "0.002",
            "includedUnits": "100",
            "dimensions": {"model": "gpt-3.5"},
        },
    ],
}


def test_an_invoice_priced_per_dimension_has_a_line_per_model_with_its_units_and_amount(billing):
    admin, settings = billing.client(), billing.settings
    defined(
        billing,
        {
            "key": "llm_tokens",
            "aggregationType": "SUM",
            "valueProperty": "$.metadata.tokens",
            "groupBy": {"model": "$.metadata.model", "region": "$.metadata.region"},
        },
    )
    # A price can only name the metric's groupBy dimensions: another name would bill nothing, silently.
    typo = admin.post(
        "/v1/plans",
        json={
            **PER_MODEL,
            "key": "per-modle",
            "prices": [
                {"metricKey": "llm_tokens", "model": "PER_UNIT", "unitPrice": "1", "dimensions": {"modle": "gpt-4"}}
            ],
        },
    )
    assert (typo.status_code, typo.json()["error"], typo.json()["errors"][0]["field"]) == (
        422,
        "unknown_dimension",
        "body.prices.0.dimensions.modle",
    ), typo.text
    created = admin.post("/v1/plans", json=PER_MODEL)
    assert created.status_code == 201, created.text
    assert [p["dimensions"] for p in created.json()["prices"]] == [{}, {"model": "gpt-4"}, {"model": "gpt-3.5"}]
    assert (
        admin.post(
            "/v1/subscriptions",
            json={
                "id": "s-llmco",
                "subjectType": "org",
                "subjectId": "llmco",
                "planKey": "per-model",
                "startAt": iso(PERIOD_START),
            },
        ).status_code
        == 201
    )

    at = PERIOD_END - timedelta(days=2)
    records = [  # the filter on model alone takes both regions' rows (and the row without a region)
        event("m1", "llm_tokens", "llmco", at, model="gpt-4", region="eu", tokens=1000),
        event("m2", "llm_tokens", "llmco", at + timedelta(hours=3), model="gpt-4", region="us", tokens="500.5"),
        event(
            "m3", "llm_tokens", "llmco", at + timedelta(hours=3, minutes=5), model="gpt-3.5", region="eu", tokens=300
        ),
        event("m4", "llm_tokens", "llmco", at + timedelta(days=1), model="gpt-3.5", tokens=200),
    ]
    asyncio.run(publish_at(settings, records + records[:1]))  # and a retry of the first
    eventually(
        lambda: monthly_rows(settings, "llm_tokens", "llmco").get(()) == (Decimal("2000.5"), 4),
        60,
        interval=0.5,
        message=lambda: str(monthly_rows(settings, "llm_tokens", "llmco")),
    )
    # The worker wrote the total row and a row per (model, region): billing must read each record once.
    eventually(lambda: len(monthly_rows(settings, "llm_tokens", "llmco")) == 5, 60, interval=0.5)
    assert monthly_rows(settings, "llm_tokens", "llmco") == {
        (): (Decimal("2000.5"), 4),
        (("model", "gpt-4"), ("region", "eu")): (Decimal(1000), 1),
        (("model", "gpt-4"), ("region", "us")): (Decimal("500.5"), 1),
        (("model", "gpt-3.5"), ("region", "eu")): (Decimal(300), 1),
        (("model", "gpt-3.5"), ("region", "")): (Decimal(200), 1),
    }

    response = admin.get("/v1/subjects/org/llmco/invoice", params={"period": PERIOD})
    assert response.status_code == 200, response.text
    invoice = response.json()
    assert invoice["status"] == "FINAL"
    assert usage_lines(invoice) == [
        ("per-model", "llm_tokens", {}, "2000.5", "2000.5", "2.00"),  # 2.0005 → half-even 2.00
        ("per-model", "llm_tokens", {"model": "gpt-4"}, "1500.5", "1500.5", "45.02"),  # 45.015 → 45.02
        ("per-model", "llm_tokens", {"model": "gpt-3.5"}, "500", "400", "0.80"),  # 100 included
    ]
    assert invoice["subtotal"] == "47.82"

    env = {**os.environ, **settings_env(settings), **BILLING_ENV}
    shown = subprocess.run(
        [sys.executable, "-m", "metering_pipeline.cli", "invoice", "org:llmco", "--period", PERIOD],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "llm_tokens (model=gpt-4)" in shown.stdout and "llm_tokens (model=gpt-3.5)" in shown.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "metering_pipeline.cli", "invoice", "org:llmco", "--period", PERIOD, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(as_json.stdout) == invoice  # the stored FINAL invoice, dimensions included


SEATS_BASIC = {
    "key": "seats-basic",
    "name": "Seats basic",
    "currency": "USD",
    "prices": [
        {"metricKey": "active_users", "model": "PER_UNIT", "unitPrice": "5"},
        {"metricKey": "seats", "model": "PER_UNIT", "unitPrice": "1"},
    ],
}
SEATS_PRO = {
    "key": "seats-pro",
    "name": "Seats pro",
    "currency": "USD",
    "prices": [
        {"metricKey": "active_users", "model": "PER_UNIT", "unitPrice": "4"},
        {"metricKey": "active_users", "model": "PER_UNIT", "unitPrice": "10", "dimensions": {"tier": "pro"}},
        {"metricKey": "seats", "model": "PER_UNIT", "unitPrice": "2"},
    ],
}


def test_unique_count_and_latest_are_billed_exactly_over_each_part_of_a_month(billing):
    admin, settings = billing.client(), billing.settings
    defined(
        billing,
        {
            "key": "active_users",
            "aggregationType": "UNIQUE_COUNT",
            "valueProperty": "$.metadata.user",
            "groupBy": {"tier": "$.metadata.tier"},
        },
        {"key": "seats", "aggregationType": "LATEST", "valueProperty": "$.metadata.seats"},
    )
    switch = PERIOD_END - timedelta(days=3)  # the subject moves from seats-basic to seats-pro
    for plan in (SEATS_BASIC, SEATS_PRO):
        assert admin.post("/v1/plans", json=plan).status_code == 201
    assert (
        admin.post(
            "/v1/subscriptions",
            json={
                "id": "s-mau-1",
                "subjectType": "org",
                "subjectId": "mauco",
                "planKey": "seats-basic",
                "startAt": iso(PERIOD_START),
                "endAt": iso(switch),
            },
        ).status_code
        == 201
    )
    assert (
        admin.post(
            "/v1/subscriptions",
            json={
                "id": "s-mau-2",
                "subjectType": "org",
                "subjectId": "mauco",
                "planKey": "seats-pro",
                "startAt": iso(switch),
            },
        ).status_code
        == 201
    )
    hour = timedelta(hours=1)
    records = [
        # Before the switch: alice (in two hours) and bob; seats set to 40, then 50.
        event("u1", "active_users", "mauco", switch - 20 * hour, user="alice", tier="pro"),
        event("u2", "active_users", "mauco", switch - 5 * hour, user="bob", tier="free"),
        event("u3", "active_users", "mauco", switch - 1 * hour, user="alice", tier="pro"),
        event("g1", "seats", "mauco", switch - 10 * hour, seats=40),
        event("g2", "seats", "mauco", switch - 2 * hour, seats=50),
        # After: alice again in two hours of two days, carol (free) and dave (pro); seats 10, then 12 and 7 at the
        # same instant: the greatest id (g5) is the latest.
        event("u4", "active_users", "mauco", switch + 2 * hour, user="alice", tier="pro"),
        event("u5", "active_users", "mauco", switch + 26 * hour, user="alice", tier="pro"),
        event("u6", "active_users", "mauco", switch + 5 * hour, user="carol", tier="free"),
        event("u7", "active_users", "mauco", switch + 30 * hour, user="dave", tier="pro"),
        event("g3", "seats", "mauco", switch + 3 * hour, seats=10),
        event("g5", "seats", "mauco", switch + 40 * hour, seats=7),
        event("g4", "seats", "mauco", switch + 40 * hour, seats=12),
    ]
    asyncio.run(publish_at(settings, records))
    eventually(
        lambda: monthly_rows(settings, "active_users", "mauco").get(()) == (Decimal(4), 7),
        60,
        interval=0.5,
        message=lambda: str(monthly_rows(settings, "active_users", "mauco")),
    )
    eventually(
        lambda: monthly_rows(settings, "seats", "mauco").get(()) == (Decimal(7), 5),
        60,
        interval=0.5,
        message=lambda: str(monthly_rows(settings, "seats", "mauco")),
    )
    # What the rows alone would bill after the switch: the hours' distinct counts added up (alice twice).
    assert hourly_totals_added(settings, "active_users", "mauco", switch, PERIOD_END) == Decimal(4)

    response = admin.get("/v1/subjects/org/mauco/invoice", params={"period": PERIOD})
    assert response.status_code == 200, response.text
    invoice = response.json()
    assert invoice["status"] == "FINAL"
    assert usage_lines(invoice) == [
        ("seats-basic", "active_users", {}, "2", "2", "10.00"),  # alice, bob
        ("seats-basic", "seats", {}, "50", "50", "50.00"),  # the latest before the switch, not the month's 7
        ("seats-pro", "active_users", {}, "3", "3", "12.00"),  # alice, carol, dave: not the hours' 4
        ("seats-pro", "active_users", {"tier": "pro"}, "2", "2", "20.00"),  # alice, dave
        ("seats-pro", "seats", {}, "7", "7", "14.00"),  # 12 and 7 at one instant: id g5 > g4
    ]
    assert invoice["subtotal"] == "106.00"


def test_dashboard_shows_usage_thresholds_alerts_and_invoice_in_a_real_browser(billing, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    assert Path("/usr/bin/chromium").exists() and Path("/usr/bin/chromedriver").exists(), (
        "Debian's chromium and chromium-driver are needed: deploy/bootstrap.sh installs them"
    )
    admin = billing.client()
    assert (
        admin.post(
            "/v1/thresholds",
            json={
                "id": "acme-calls",
                "metricKey": "api_calls",
                "subjectType": "org",
                "subjectId": "acme",
                "threshold": "100",
                "action": "BLOCK",
            },
        ).status_code
        == 201
    )
    now = datetime.now(UTC)
    asyncio.run(
        publish_at(
            billing.settings,
            [
                (usage("n1", "api_calls", "60", now), now),
                (usage("n2", "api_calls", "60", now), now),
            ],
        )
    )
    # Alerts (behind "blocked") reach ClickHouse before the rollups (behind "value"), which follow the checkpoint.
    status = eventually(
        lambda: (
            (s := admin.get("/v1/subjects/org/acme/status").json()["metrics"])
            and s[0]["blocked"]
            and s[0]["value"] == "120"
            and s
        ),
        60,
        interval=0.5,
    )
    assert status[0]["value"] == "120" and status[0]["thresholds"][0]["status"] == "exceeded"

    def both_alerts() -> list[dict]:
        alerts = admin.get("/v1/subjects/org/acme/alerts").json()["alerts"]
        assert len(alerts) == 2, alerts
        return alerts

    # The alerts the dashboard lists: the second record took the subject from 60 past both levels of the limit at once.
    alerts = eventually(both_alerts, 60, interval=0.5)
    assert sorted(
        (
            a["type"],
            a["thresholdId"],
            a["metricKey"],
            a["subjectType"],
            a["subjectId"],
            a["threshold"],
            a["value"],
            a["action"],
            a["periodType"],
        )
        for a in alerts
    ) == [
        ("threshold.approaching", "acme-calls", "api_calls", "org", "acme", "100", "120", "BLOCK", "MONTHLY"),
        ("threshold.exceeded", "acme-calls", "api_calls", "org", "acme", "100", "120", "BLOCK", "MONTHLY"),
    ]
    period = now.strftime("%Y-%m")
    expected_subtotal = admin.get("/v1/subjects/org/acme/invoice", params={"period": period}).json()["subtotal"]

    with headless_chromium(tmp_path / "chromium") as driver:
        driver.get(f"{billing.url}/ui?subject=org:acme&period={period}")
        driver.find_element(By.ID, "api-key").send_keys(billing.keys["reader"])
        Select(driver.find_element(By.ID, "period-type")).select_by_value("HOURLY")
        driver.find_element(By.ID, "show").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "ok", driver.find_element(
            By.ID, "message"
        ).text
        bars = driver.find_elements(By.CSS_SELECTOR, '.chart[data-metric="api_calls"] rect.bar')
        assert [bar.get_attribute("data-value") for bar in bars][-1] == "120"
        row = driver.find_element(By.CSS_SELECTOR, '#status-rows tr[data-threshold="acme-calls"]')
        assert (
            "state-blocked" in row.get_attribute("class") and row.find_element(By.CLASS_NAME, "badge").text == "blocked"
        )
        alert_types = [
            r.find_elements(By.TAG_NAME, "td")[1].text for r in driver.find_elements(By.CSS_SELECTOR, "#alert-rows tr")
        ]
        assert sorted(alert_types) == ["threshold.approaching", "threshold.exceeded"]
        assert driver.find_element(By.ID, "invoice-subtotal").text == f"{expected_subtotal} USD"
        assert "OPEN" in driver.find_element(By.ID, "invoice-status").text
        screenshot = tmp_path / "dashboard.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
        print(f"dashboard screenshot: {screenshot}")
