"""Thresholds through a real worker: alerts on metering.alerts and in ClickHouse, re-arming,
blocking and the entitlement endpoint, each reset period, and exactness across a killed worker."""

from __future__ import annotations

import asyncio
import json
import random
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from aiokafka import AIOKafkaConsumer
from click.testing import CliRunner

from metering_pipeline.cli import main
from metering_pipeline.topics import Topics
from metering_pipeline.warehouse.client import connect
from support import (
    define,
    delete_threshold,
    eventually,
    metric,
    publish,
    set_thresholds,
    settings_env,
    threshold,
    usage,
)

pytestmark = pytest.mark.integration


class AlertReader:
    """Reads metering.alerts from the start, remembering its position between calls."""

    def __init__(self, settings) -> None:
        self.consumer = AIOKafkaConsumer(
            Topics.of(settings).alerts,
            bootstrap_servers=settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )

    async def __aenter__(self) -> AlertReader:
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.consumer.stop()

    async def take(self, count: int, timeout: float = 60) -> list[dict]:
        found: list[dict] = []
        async with asyncio.timeout(timeout):
            while len(found) < count:
                for messages in (await self.consumer.getmany(timeout_ms=300)).values():
                    found.extend(json.loads(m.value) for m in messages)
        assert len(found) == count, f"expected {count} alerts, got {len(found)}: {found}"
        return found

    async def none_within(self, seconds: float) -> None:
        extra: list[dict] = []
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            for messages in (await self.consumer.getmany(timeout_ms=300)).values():
                extra.extend(json.loads(m.value) for m in messages)
        assert not extra, f"unexpected alerts: {extra}"


def summary_of(alerts: list[dict]) -> list[tuple]:
    return [(a["thresholdId"], a["subjectId"], a["type"], a["value"]) for a in alerts]


def serving(worker, subject: str, metric_key: str, timeout: float = 60) -> None:
    """Wait until the worker owns partitions and answers entitlement checks (its groups have formed)."""

    def answers() -> bool:
        try:
            entitlement(worker, subject, metric_key)
        except urllib.error.HTTPError as error:  # not yet (503 while rebalancing); anything else fails at once
            raise AssertionError(f"worker never served {subject} {metric_key}: {error.code} {error.read()!r}") from None
        return True

    eventually(answers, timeout)


def entitlement(worker, subject: str, metric_key: str) -> dict:
    return entitlement_answer(worker, subject, metric_key)[0]


def entitlement_answer(worker, subject: str, metric_key: str) -> tuple[dict, str]:
    """(body, URL of the worker that answered)."""
    subject_type, subject_id = subject.split(":")
    with urllib.request.urlopen(
        f"{worker.url}/v1/subjects/{subject_type}/{subject_id}/metrics/{metric_key}", timeout=5
    ) as r:
        return json.loads(r.read()), r.headers["X-Metering-Served-By"]


def stored_alert_ids(settings) -> Counter:
    with connect(settings) as client:
        return Counter(row[0] for row in client.query("SELECT id FROM threshold_events FINAL").result_rows)


async def test_approaching_then_exceeded_once_each_and_wildcards_per_subject(pipeline):
    settings, new_worker = pipeline
    await define(settings, metric("tokens", "SUM"))
    await set_thresholds(
        settings, threshold("t1", "tokens", "org:org-1", "100"), threshold("t-all", "tokens", "org:*", "150")
    )
    worker = new_worker().start()
    worker.wait_healthy()
    await asyncio.to_thread(serving, worker, "org:org-1", "tokens")
    async with AlertReader(settings) as alerts:
        await publish(settings, [usage("a1", "tokens", "org:org-1", "50"), usage("a2", "tokens", "org:org-1", "29.99")])
        await alerts.none_within(2)  # 79.99: just below 80 % of 100
        await publish(settings, [usage("a3", "tokens", "org:org-1", "5.51")])
        assert summary_of(await alerts.take(1)) == [("t1", "org-1", "threshold.approaching", "85.50")]
        await publish(settings, [usage("a4", "tokens", "org:org-1", "14.50")])  # exactly 100: not exceeded
        await alerts.none_within(2)
        await publish(
            settings,
            [
                usage("a5", "tokens", "org:org-1", "0.000000000000000001"),
                usage("a5", "tokens", "org:org-1", "0.000000000000000001"),
            ],
        )  # a duplicate
        [exceeded] = await alerts.take(1)
        assert summary_of([exceeded]) == [("t1", "org-1", "threshold.exceeded", "100.000000000000000001")]
        assert exceeded["periodType"] == "MONTHLY" and exceeded["action"] == "ALERT"
        assert exceeded["periodStart"] == datetime.now(UTC).strftime("%Y-%m-01T00:00:00Z")

        # One record takes org-2 past both levels of the wildcard threshold: approaching first.
        await publish(settings, [usage("b1", "tokens", "org:org-2", "200")])
        both = await alerts.take(2)
        assert summary_of(both) == [
            ("t-all", "org-2", "threshold.approaching", "200"),
            ("t-all", "org-2", "threshold.exceeded", "200"),
        ]
        await alerts.none_within(2)

    ids = [exceeded["id"], *(a["id"] for a in both)]

    def archived() -> Counter:
        stored = stored_alert_ids(settings)
        assert set(ids) <= set(stored), f"alerts missing from threshold_events: {stored}"
        return stored

    stored = await asyncio.to_thread(eventually, archived, 30)
    assert all(n == 1 for n in stored.values()) and len(stored) == 4

    status = await asyncio.to_thread(entitlement, worker, "org:org-1", "tokens")
    assert (status["value"], status["status"], status["blocked"]) == ("100.000000000000000001", "exceeded", False)
    assert [(t["id"], t["status"]) for t in status["thresholds"]] == [("t1", "exceeded"), ("t-all", "ok")]


async def test_thresholds_apply_to_recorded_usage_block_rearm_and_stop_when_deleted(pipeline):
    settings, new_worker = pipeline
    await define(settings, metric("calls", "COUNT", reset="DAILY"))
    worker = new_worker().start()
    worker.wait_healthy()
    await asyncio.to_thread(serving, worker, "user:u1", "calls")
    await publish(settings, [usage(f"c{n}", "calls", "user:u1") for n in range(10)])
    await asyncio.sleep(2)  # counted before any threshold exists
    env = settings_env(settings) | {"METERING_WORKER_URL": worker.url}
    runner = CliRunner()

    async with AlertReader(settings) as alerts:
        await set_thresholds(settings, threshold("b1", "calls", "user:u1", "8", action="BLOCK"))
        fired = await alerts.take(2)
        assert summary_of(fired) == [
            ("b1", "u1", "threshold.approaching", "10"),
            ("b1", "u1", "threshold.exceeded", "10"),
        ]
        assert fired[0]["periodType"] == "DAILY"
        status = await asyncio.to_thread(entitlement, worker, "user:u1", "calls")
        assert status["blocked"] is True and status["thresholds"][0]["blocked"] is True
        checked = await asyncio.to_thread(runner.invoke, main, ["check", "user:u1", "calls"], env=env)
        assert checked.exit_code == 3 and "BLOCKED" in checked.stdout

        # Raised above the current value: re-armed (10 < 16, so nothing fires yet) and unblocked.
        await set_thresholds(settings, threshold("b1", "calls", "user:u1", "20", action="BLOCK"))
        await alerts.none_within(3)
        status = await asyncio.to_thread(entitlement, worker, "user:u1", "calls")
        assert (status["blocked"], status["status"]) == (False, "ok")
        checked = await asyncio.to_thread(runner.invoke, main, ["check", "user:u1", "calls"], env=env)
        assert checked.exit_code == 0, checked.output

        await publish(settings, [usage(f"d{n}", "calls", "user:u1") for n in range(6)])
        [again] = await alerts.take(1)
        assert summary_of([again]) == [("b1", "u1", "threshold.approaching", "16")]
        assert again["id"] != fired[0]["id"], "a re-armed alert has a new id"

        await delete_threshold(settings, "b1")
        await asyncio.sleep(2)
        await publish(settings, [usage(f"e{n}", "calls", "user:u1") for n in range(10)])
        await alerts.none_within(3)
        status = await asyncio.to_thread(entitlement, worker, "user:u1", "calls")
        assert (status["value"], status["thresholds"], status["blocked"]) == ("26", [], False)


async def test_each_reset_period_is_its_own_window(pipeline):
    settings, new_worker = pipeline
    now = datetime.now(UTC)
    this_hour = now.replace(minute=0, second=0, microsecond=0)
    await define(settings, metric("req", "COUNT", reset="HOURLY"), metric("gb", "MAX", reset="NEVER"))
    await set_thresholds(settings, threshold("h", "req", "org:o1", "5"), threshold("n", "gb", "org:o1", "40"))
    worker = new_worker().start()
    worker.wait_healthy()
    await asyncio.to_thread(serving, worker, "org:o1", "req")
    async with AlertReader(settings) as alerts:
        # Six late records in the previous hour exceed that hour's window...
        await publish(
            settings, [usage(f"p{n}", "req", "org:o1", at=this_hour - timedelta(minutes=30)) for n in range(6)]
        )
        previous = await alerts.take(2)
        assert [(a["type"], a["value"], a["periodStart"]) for a in previous] == [
            ("threshold.approaching", "6", (this_hour - timedelta(hours=1)).isoformat().replace("+00:00", "Z")),
            ("threshold.exceeded", "6", (this_hour - timedelta(hours=1)).isoformat().replace("+00:00", "Z")),
        ]
        # ...and this hour starts clean: four records are only approaching.
        await publish(settings, [usage(f"c{n}", "req", "org:o1", at=now) for n in range(4)])
        [current] = await alerts.take(1)
        assert (current["type"], current["value"], current["periodStart"]) == (
            "threshold.approaching",
            "4",
            this_hour.isoformat().replace("+00:00", "Z"),
        )

        # NEVER: the all-time MAX across months.
        await publish(
            settings,
            [usage("g1", "gb", "org:o1", "35", at=now - timedelta(days=33)), usage("g2", "gb", "org:o1", "12", at=now)],
        )
        [lifetime] = await alerts.take(1)
        assert (lifetime["type"], lifetime["value"], lifetime["periodType"], lifetime["periodStart"]) == (
            "threshold.approaching",
            "35",
            "NEVER",
            "1970-01-01T00:00:00Z",
        )
        await publish(settings, [usage("g3", "gb", "org:o1", "40.5", at=now)])
        [over] = await alerts.take(1)
        assert (over["type"], over["value"]) == ("threshold.exceeded", "40.5")


@pytest.mark.timeout(400)
async def test_alerts_stay_exactly_once_across_a_killed_worker(pipeline):
    """Many subjects cross a wildcard threshold while one of two workers is SIGKILLed and restarted:
    every expected alert id is on the topic and in ClickHouse exactly once."""
    settings, new_worker = pipeline
    await define(settings, metric("ops", "SUM"))
    await set_thresholds(settings, threshold("w", "ops", "org:*", "10"))
    first, second = new_worker().start(), new_worker().start()
    first.wait_healthy()
    second.wait_healthy()
    rng = random.Random(7)
    subjects = [f"s{n}" for n in range(60)]
    totals = dict.fromkeys(subjects, Decimal(0))
    messages = []
    for n in range(3000):
        subject = rng.choice(subjects)
        quantity = Decimal(rng.randint(1, 300)) / 100
        totals[subject] += quantity
        messages.append(usage(f"r{n}", "ops", f"org:{subject}", str(quantity)))
    expected = Counter()
    for subject, total in totals.items():
        expected[("approaching", subject)] = int(total >= 8)
        expected[("exceeded", subject)] = int(total > 10)
    expected = +expected

    for start in range(0, len(messages), 300):
        await publish(settings, messages[start : start + 300])
        if start == 900:
            second.kill()
        if start == 1800:
            second = new_worker().start()
        await asyncio.sleep(0.2)
    second.wait_healthy()

    async with AlertReader(settings) as alerts:
        found = await alerts.take(sum(expected.values()), timeout=120)
        await alerts.none_within(5)
    seen = Counter((a["type"].removeprefix("threshold."), a["subjectId"]) for a in found)
    assert seen == expected
    assert len({a["id"] for a in found}) == len(found)

    def archived_once() -> bool:
        stored = stored_alert_ids(settings)
        assert stored == Counter({a["id"]: 1 for a in found}), (
            f"threshold_events differs: {len(stored)} ids vs {len(found)}"
        )
        return True

    await asyncio.to_thread(eventually, archived_once, 60, interval=0.5)

    # Either worker answers an entitlement check; the one that does not own the subject forwards it. Right after
    # the restart a check may meet the group still settling (503 rebalancing / owner_unreachable, which clients
    # retry): wait until both workers serve every subject checked, then check what they answer.
    for w in (first, second):
        for subject in subjects[:10]:
            await asyncio.to_thread(serving, w, f"org:{subject}", "ops")
    for subject in subjects[:10]:
        answers = [await asyncio.to_thread(entitlement_answer, w, f"org:{subject}", "ops") for w in (first, second)]
        assert [Decimal(body["value"]) for body, _ in answers] == [totals[subject]] * 2
        assert answers[0][1] == answers[1][1] and answers[0][1] in (first.url, second.url)
