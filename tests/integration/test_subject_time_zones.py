"""A subject's time zone (issue 28) through the real API, CLI, Kafka and ClickHouse: set and read over HTTP and the CLI,
kept on the compacted metering.subjects topic as a consumer reads it, unknown zones refused, org-scoped keys confined
to their subjects, and summaries that name no zone answered in the subject's, exactly from its records."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from aiokafka import AIOKafkaConsumer
from click.testing import CliRunner

from metering_pipeline.cli import main
from metering_pipeline.topics import Topics
from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.queries import naive_utc
from metering_pipeline.warehouse.sink import RECORD_COLUMNS
from support import eventually, headless_chromium, publish, running_api, settings_env

pytestmark = pytest.mark.integration

# Either side of Kolkata's midnight (18:30 UTC): two local days, one UTC day.
RECORDS = [
    ("k1", datetime(2026, 2, 10, 18, 29, 59, tzinfo=UTC), Decimal("2.5")),
    ("k2", datetime(2026, 2, 10, 18, 30, tzinfo=UTC), Decimal("4")),
    ("k3", datetime(2026, 2, 10, 20, tzinfo=UTC), Decimal("0.25")),
]
WINDOW = {"from": "2026-02-01T00:00:00Z", "to": "2026-03-01T00:00:00Z"}


@pytest.fixture(scope="module")
def api(module_pipeline, tmp_path_factory):
    settings, _ = module_pipeline
    with running_api(settings, tmp_path_factory.mktemp("api")) as started:
        created = started.client().post("/v1/metrics", json={"key": "tz_sum", "name": "tz", "aggregationType": "SUM"})
        assert created.status_code == 201, created.text
        insert_records(settings, "tz-1", "tz_sum", RECORDS)
        yield started


def insert_records(settings, subject_id: str, metric: str, records: list[tuple[str, datetime, Decimal]]) -> None:
    """Counted records of org:`subject_id`, as the worker writes them to usage_records."""
    with connect(settings) as client:
        client.insert(
            "usage_records",
            [
                ["org", subject_id, metric, record_id, naive_utc(at), quantity, "{}", metric, {}, ""]
                for record_id, at, quantity in records
            ],
            column_names=RECORD_COLUMNS,
        )


def end_of_utc_day() -> str:
    """When a change from UTC made now takes effect: the next UTC midnight, or the one after in the last hour."""
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    if midnight - now < timedelta(hours=1):
        midnight += timedelta(days=1)
    return midnight.isoformat().replace("+00:00", "Z")


def cli(settings, *args: str):
    return CliRunner().invoke(main, list(args), env=settings_env(settings), catch_exceptions=False)


def daily(client, zone: str | None = None) -> list[tuple[str, str, str, int]]:
    params = {"metricKey": "tz_sum", "subjectType": "org", "subjectId": "tz-1", "periodType": "DAILY", **WINDOW}
    response = client.get("/v1/usage/summary", params=params | ({"timeZone": zone} if zone else {}))
    assert response.status_code == 200, response.text
    return [
        (s["periodStart"], s["timeZone"], s["totalQuantity"], s["recordCount"]) for s in response.json()["summaries"]
    ]


def test_a_subjects_zone_is_the_default_until_set_and_then_its_summaries_are_local(api):
    client = api.client()
    assert client.get("/v1/subjects/org/never-set").json() == {
        "subjectType": "org",
        "subjectId": "never-set",
        "timeZone": "UTC",
        "previousTimeZone": None,
        "effectiveFrom": None,
    }
    put = client.put("/v1/subjects/org/tz-1", json={"timeZone": "Asia/Kolkata"})
    assert put.status_code == 200, put.text
    assert (
        put.json()
        == client.get("/v1/subjects/org/tz-1").json()
        == {
            "subjectType": "org",
            "subjectId": "tz-1",
            "timeZone": "Asia/Kolkata",
            # Its rollups move at the end of today in the zone it had (UTC, the default).
            "previousTimeZone": "UTC",
            "effectiveFrom": end_of_utc_day(),
        }
    )
    # No timeZone in the query: the subject's. k1 ends 10 February in Kolkata; k2 and k3 are on the 11th.
    assert daily(client) == [
        ("2026-02-09T18:30:00Z", "Asia/Kolkata", "2.5", 1),
        ("2026-02-10T18:30:00Z", "Asia/Kolkata", "4.25", 2),
    ]
    assert daily(client, "Asia/Kathmandu") == [  # a zone named in the query wins: 18:15 UTC is its midnight
        ("2026-02-10T18:15:00Z", "Asia/Kathmandu", "6.75", 3)
    ]


def test_the_subjects_topic_holds_the_setting_as_a_consumer_reads_it(api):
    settings = api.settings
    client = api.client()
    assert client.put("/v1/subjects/user/u-7", json={"timeZone": "America/New_York"}).status_code == 200

    async def entries() -> dict[bytes, dict]:
        consumer = AIOKafkaConsumer(
            Topics.of(settings).subjects, bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            found: dict[bytes, dict] = {}
            async with asyncio.timeout(30):
                while b"user:u-7" not in found:
                    for messages in (await consumer.getmany(timeout_ms=500)).values():
                        found.update({m.key: json.loads(m.value) for m in messages if m.value is not None})
            return found
        finally:
            await consumer.stop()

    assert asyncio.run(entries())[b"user:u-7"] == {
        "subjectType": "user",
        "subjectId": "u-7",
        "timeZone": "America/New_York",
        "previousTimeZone": "UTC",
        "effectiveFrom": end_of_utc_day(),
    }


def test_an_unknown_zone_is_refused_by_name_and_nothing_is_written(api):
    client = api.client()
    for zone in ("Mars/Olympus_Mons", "asia/kolkata", "+05:30"):
        refused = client.put("/v1/subjects/org/tz-3", json={"timeZone": zone})
        assert refused.status_code == 422, refused.text
        body = refused.json()
        assert (body["error"], [e["field"] for e in body["errors"]]) == ("invalid_time_zone", ["body.timeZone"])
        assert repr(zone) in body["message"]
    assert client.get("/v1/subjects/org/tz-3").json()["timeZone"] == "UTC"


def test_an_org_scoped_key_sets_only_its_own_subjects(api):
    org1 = api.client("org1")
    assert org1.put("/v1/subjects/org/org-1", json={"timeZone": "Europe/Berlin"}).status_code == 200
    other = org1.put("/v1/subjects/org/org-2", json={"timeZone": "Europe/Berlin"})
    assert other.status_code == 404, other.text
    assert api.client().get("/v1/subjects/org/org-2").json()["timeZone"] == "UTC"


def test_the_cli_sets_and_gets_a_subjects_zone_and_summarizes_in_it(api):
    settings = api.settings
    assert "METERING_DEFAULT_TIME_ZONE" in cli(settings, "subject", "get", "--subject", "org:tz-cli").output
    set_ = cli(settings, "subject", "set", "--subject", "org:tz-cli", "--time-zone", "Asia/Kathmandu")
    assert set_.exit_code == 0 and "Asia/Kathmandu" in set_.output, set_.output
    got = cli(settings, "subject", "get", "--subject", "org:tz-cli", "--json")
    assert json.loads(got.output) == {
        "subjectType": "org",
        "subjectId": "tz-cli",
        "timeZone": "Asia/Kathmandu",
        "previousTimeZone": "UTC",
        "effectiveFrom": end_of_utc_day(),
    }
    eventually(lambda: api.client().get("/v1/subjects/org/tz-cli").json()["timeZone"] == "Asia/Kathmandu", 30)
    refused = cli(settings, "subject", "set", "--subject", "org:tz-cli", "--time-zone", "Nowhere/Land")
    assert refused.exit_code == 2 and "unknown time zone 'Nowhere/Land'" in refused.output

    # metering summary without --time-zone: the subject's.
    cli(settings, "subject", "set", "--subject", "org:tz-1", "--time-zone", "Asia/Kolkata")
    summary = cli(
        settings,
        "summary",
        "--metric",
        "tz_sum",
        "--subject",
        "org:tz-1",
        "--from",
        "2026-02-01",
        "--to",
        "2026-03-01",
        "--json",
    )
    assert summary.exit_code == 0, summary.output
    rows = [json.loads(line) for line in summary.stdout.splitlines()]
    assert [(r["periodStart"], r["timeZone"], r["totalQuantity"]) for r in rows] == [
        ("2026-02-09T18:30:00Z", "Asia/Kolkata", "2.5"),
        ("2026-02-10T18:30:00Z", "Asia/Kolkata", "4.25"),
    ]


def test_the_dashboard_shows_a_subjects_days_in_its_zone_in_a_real_browser(api, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    settings = api.settings
    assert api.client().put("/v1/subjects/org/tz-ui", json={"timeZone": "Asia/Kolkata"}).status_code == 200
    # Two records 40 minutes apart either side of a Kolkata midnight (18:30 UTC), a few days ago: one UTC day, two
    # Kolkata days.
    midnight = datetime.combine(datetime.now(UTC).date() - timedelta(days=3), datetime.min.time(), tzinfo=UTC)
    kolkata_midnight = midnight - timedelta(hours=5, minutes=30)
    records = [
        ("ui-1", kolkata_midnight - timedelta(minutes=20), Decimal(3)),
        ("ui-2", kolkata_midnight + timedelta(minutes=20), Decimal(4)),
    ]
    insert_records(settings, "tz-ui", "tz_sum", records)
    eventually(lambda: api.client().get("/v1/subjects/org/tz-ui").json()["timeZone"] == "Asia/Kolkata", 30)
    with headless_chromium(tmp_path / "chromium") as driver:
        driver.get(f"{api.url}/ui?subject=org:tz-ui")
        driver.find_element(By.ID, "api-key").send_keys(api.keys["reader"])
        Select(driver.find_element(By.ID, "period-type")).select_by_value("DAILY")
        driver.find_element(By.ID, "show").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
        body = driver.find_element(By.TAG_NAME, "body")
        assert body.get_attribute("data-loaded") == "ok", driver.find_element(By.ID, "message").text
        assert body.get_attribute("data-time-zone") == "Asia/Kolkata"
        chart = driver.find_element(By.CSS_SELECTOR, '.chart[data-metric="tz_sum"]')
        assert "Asia/Kolkata" in chart.find_element(By.TAG_NAME, "h3").text
        bars = {
            bar.get_attribute("data-period-start"): bar.get_attribute("data-value")
            for bar in chart.find_elements(By.CSS_SELECTOR, "rect.bar")
        }
        day = timedelta(days=1)
        assert bars == {
            (kolkata_midnight - day).isoformat().replace("+00:00", "Z"): "3",
            kolkata_midnight.isoformat().replace("+00:00", "Z"): "4",
        }
        driver.save_screenshot(str(tmp_path / "dashboard-kolkata.png"))


def test_a_zoned_subjects_status_is_its_local_days_usage(api):
    """The status endpoint answers the window the worker's thresholds use: the local day of the subject's zone, summed
    exactly."""
    settings, client = api.settings, api.client()
    assert (
        client.post(
            "/v1/metrics", json={"key": "tz_daily", "name": "d", "aggregationType": "SUM", "resetPeriod": "DAILY"}
        ).status_code
        == 201
    )
    limit = {
        "metricKey": "tz_daily",
        "subjectType": "org",
        "subjectId": "tz-status",
        "threshold": "10",
        "action": "ALERT",
    }
    assert client.post("/v1/thresholds", json=limit).status_code == 201
    # Written by another producer, without effectiveFrom: in force at once, and (no worker here counts records into
    # local rollups) summed from the records.
    entry = {"subjectType": "org", "subjectId": "tz-status", "timeZone": "Asia/Kolkata"}
    asyncio.run(publish(settings, [(b"org:tz-status", json.dumps(entry).encode(), None)], Topics.of(settings).subjects))
    now = datetime.now(UTC)
    kolkata = ZoneInfo("Asia/Kolkata")
    today = datetime.combine(now.astimezone(kolkata).date(), datetime.min.time(), tzinfo=kolkata).astimezone(UTC)
    records = [
        ("s-1", today - timedelta(seconds=1), Decimal(5)),  # yesterday in Kolkata
        ("s-2", today, Decimal("2.5")),
        ("s-3", min(now, today + timedelta(hours=1)), Decimal(1)),
    ]
    insert_records(settings, "tz-status", "tz_daily", records)

    def status() -> dict:
        metrics = client.get("/v1/subjects/org/tz-status/status").json()["metrics"]
        assert metrics and metrics[0]["timeZone"] == "Asia/Kolkata", metrics
        return metrics[0]

    found = eventually(status, 30)
    assert (found["periodStart"], found["value"]) == (today.isoformat().replace("+00:00", "Z"), "3.5")
