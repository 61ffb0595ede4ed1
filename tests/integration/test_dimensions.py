"""Meters that read the payload, through real `metering worker` processes, Apache Kafka and ClickHouse: groupBy
dimensions, valueProperty, filters, UNIQUE_COUNT and LATEST. What usage_summary must hold is computed here from what
the test published, from first principles, independently of the pipeline's code."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest

from metering_dev.bench.soak_summary import counter
from metering_pipeline.topics import Topics
from metering_pipeline.warehouse.client import connect
from support import define, eventually, metric, publish, read_json, set_thresholds, summary_rows, threshold

pytestmark = pytest.mark.integration

TOKENS = {
    **metric("tokens", "SUM"),
    "valueProperty": "$.metadata.usage.tokens",
    "groupBy": {"model": "$.metadata.model", "region": "$.metadata.region"},
}
USERS = {
    **metric("users", "UNIQUE_COUNT"),
    "valueProperty": "$.metadata.user",
    "groupBy": {"model": "$.metadata.model"},
}
GAUGE = metric("gauge", "LATEST")
EU_CALLS = {**metric("eu_calls", "COUNT"), "filter": {"$.metadata.region": ["eu"]}}
DEFINITIONS = (TOKENS, USERS, GAUGE, EU_CALLS)
GROUPS = {"tokens": ("model", "region"), "users": ("model",), "gauge": (), "eu_calls": ()}


def _record(rng: random.Random, n: int, now: datetime, at: datetime | None = None) -> dict:
    at = at or now - timedelta(milliseconds=rng.randint(0, 3 * 86_400_000))
    metadata: dict = {
        "user": f"u{rng.randint(1, 12)}",
        "region": rng.choice(["eu", "us"]),
        "usage": {
            "tokens": rng.choice([rng.randint(1, 5000), f"{rng.randint(0, 999)}.{rng.randint(0, 10**18 - 1):018d}"])
        },
    }
    model = rng.choice(["a", "b", "c", None, "missing"])
    if model != "missing":
        metadata["model"] = model
    return {
        "id": f"e{n}",
        "metricKey": rng.choice(sorted(GROUPS)),
        "subjectType": "org",
        "subjectId": f"org-{rng.randint(1, 3)}",
        "quantity": str(rng.randint(1, 1000)),
        "timestamp": at.isoformat(),
        "metadata": metadata,
    }


def _starts(at: datetime) -> dict[str, datetime]:
    naive = at.astimezone(UTC).replace(tzinfo=None)
    return {
        "HOURLY": naive.replace(minute=0, second=0, microsecond=0),
        "DAILY": naive.replace(hour=0, minute=0, second=0, microsecond=0),
        "MONTHLY": naive.replace(day=1, hour=0, minute=0, second=0, microsecond=0),
    }


def _text(value: object) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def expected_summary(records: list[dict]) -> dict[tuple, tuple[Decimal, int]]:
    """(metric, subject, period, start, dimensions) -> (total_quantity, record_count), from first principles."""
    rows: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        metadata = r["metadata"]
        if r["metricKey"] == "eu_calls" and metadata["region"] != "eu":
            continue  # filtered out
        dimensions = tuple(sorted((name, _text(metadata.get(name))) for name in GROUPS[r["metricKey"]]))
        for period, start in _starts(datetime.fromisoformat(r["timestamp"])).items():
            for dims in {(), dimensions}:
                rows[(r["metricKey"], r["subjectId"], period, start, dims)].append(r)
    expected = {}
    for key, members in rows.items():
        metric_key = key[0]
        if metric_key == "tokens":
            total = sum((Decimal(str(m["metadata"]["usage"]["tokens"])) for m in members), Decimal(0))
        elif metric_key == "users":
            total = Decimal(len({m["metadata"]["user"] for m in members}))
        elif metric_key == "gauge":
            latest = max(members, key=lambda m: (datetime.fromisoformat(m["timestamp"]), m["id"]))
            total = Decimal(latest["quantity"])
        else:
            total = Decimal(len(members))
        expected[key] = (total, len(members))
    return expected


def summary_is(settings, expected: dict) -> bool:
    """usage_summary holds exactly `expected` for these metrics (a condition for `eventually`)."""
    actual = summary_rows(settings, list(GROUPS))
    if actual != expected:
        wrong = {k: (v, actual.get(k)) for k, v in expected.items() if actual.get(k) != v}
        extra = [k for k in actual if k not in expected]
        raise AssertionError(
            f"usage_summary differs: {len(wrong)} wrong or missing, e.g. {list(wrong.items())[:3]}; "
            f"{len(extra)} extra, e.g. {extra[:3]}"
        )
    return True


def _messages(records: list[dict]) -> list[tuple[bytes | None, bytes, int | None]]:
    return [(f"{r['subjectType']}:{r['subjectId']}".encode(), orjson.dumps(r), None) for r in records]


def test_grouped_unique_latest_and_filtered_metrics_roll_up_exactly_and_bad_payloads_are_dead_lettered(pipeline):
    settings, new_worker = pipeline
    asyncio.run(define(settings, *DEFINITIONS))
    worker = new_worker().start()
    worker.wait_healthy()
    rng = random.Random(15)
    now = datetime.now(UTC).replace(microsecond=0)
    records = [_record(rng, n, now) for n in range(400)]
    # LATEST ties: the same millisecond, the greatest id wins whatever order they arrive in.
    tie = now - timedelta(minutes=3)
    records += [
        {
            **_record(rng, 1000 + n, now, tie),
            "metricKey": "gauge",
            "subjectId": "org-1",
            "id": f"tie-{n}",
            "quantity": str(10 + n),
        }
        for n in (3, 9, 1)
    ]
    bad = [
        {**_record(rng, 2000, now), "metricKey": "tokens", "metadata": {"model": "a"}},  # no $.metadata.usage.tokens
        {
            **_record(rng, 2001, now),
            "metricKey": "tokens",
            "metadata": {"model": {"nested": 1}, "usage": {"tokens": 1}},
        },
        {**_record(rng, 2002, now), "metricKey": "users", "metadata": {"model": "a"}},  # no $.metadata.user
    ]
    asyncio.run(publish(settings, _messages(records + bad)))
    retries = rng.sample(records, 40)
    asyncio.run(publish(settings, _messages(retries)))  # never counted twice
    expected = expected_summary(records)
    eventually(lambda: summary_is(settings, expected), 120, interval=0.5)

    letters = asyncio.run(
        read_json(settings.kafka_bootstrap, Topics.of(settings).dead_letters, 3, timeout=60, settle=2)
    )
    assert [letter["reason"] for letter in letters] == ["invalid_record"] * 3
    messages = sorted(letter["message"] for letter in letters)
    assert any("$.metadata.usage.tokens" in m for m in messages), messages
    assert any("$.metadata.model" in m and "object" in m for m in messages), messages
    assert any("$.metadata.user" in m for m in messages), messages
    # The router filters what it reads (a retry too: de-duplication comes after it, in the rollup stage).
    filtered = sum(1 for r in records + retries if r["metricKey"] == "eu_calls" and r["metadata"]["region"] != "eu")
    assert filtered and counter(worker.metrics(), "metering_records_filtered_total") == filtered

    with connect(settings) as client:
        [[stored, distinct]] = client.query(
            "SELECT count(), uniqExact(distinct_value) FROM usage_records FINAL WHERE metric_key = 'users'"
        ).result_rows
        [[dimensioned]] = client.query(
            "SELECT count() FROM usage_records FINAL WHERE metric_key = 'tokens' "
            "AND mapKeys(dimensions) = ['model', 'region']"
        ).result_rows
    users = [r for r in records if r["metricKey"] == "users"]
    assert (stored, distinct) == (len(users), len({r["metadata"]["user"] for r in users}))
    assert dimensioned == sum(1 for r in records if r["metricKey"] == "tokens")


def test_sigkill_mid_stream_loses_and_doubles_no_distinct_value_latest_value_or_dimension_row(pipeline):
    settings, new_worker = pipeline
    asyncio.run(define(settings, *DEFINITIONS))
    worker = new_worker().start()
    worker.wait_healthy()
    rng = random.Random(16)
    now = datetime.now(UTC).replace(microsecond=0)
    records = [_record(rng, n, now) for n in range(1500)]
    first, second = records[:900], records[900:]
    asyncio.run(publish(settings, _messages(first)))
    eventually(
        lambda: (
            sum(
                count
                for (_, _, period, _, dims), (_, count) in summary_rows(settings, list(GROUPS)).items()
                if period == "MONTHLY" and not dims
            )
            >= 300
        ),
        60,
        interval=0.2,
        message=worker.log_tail,
    )
    worker.kill()  # SIGKILL mid-stream: checkpoints in flight are lost, the next worker replays them
    asyncio.run(publish(settings, _messages(second + rng.sample(first, 100))))
    restarted = new_worker().start()
    restarted.wait_healthy()
    expected = expected_summary(records)
    eventually(lambda: summary_is(settings, expected), 120, interval=0.5)


def test_a_threshold_on_a_dimension_row_fires_on_that_row_only_and_its_alert_carries_the_dimensions(pipeline):
    settings, new_worker = pipeline
    asyncio.run(define(settings, TOKENS))
    on_a = {**threshold("a-cap", "tokens", "org:*", "100"), "dimensions": {"model": "a", "region": "eu"}}
    total_cap = threshold("total-cap", "tokens", "org:org-1", "1000")
    asyncio.run(set_thresholds(settings, on_a, total_cap))
    worker = new_worker().start()
    worker.wait_healthy()
    now = datetime.now(UTC)

    def usage(n: int, model: str, tokens: int) -> dict:
        return {
            "id": f"t{n}",
            "metricKey": "tokens",
            "subjectType": "org",
            "subjectId": "org-1",
            "timestamp": now.isoformat(),
            "metadata": {"model": model, "region": "eu", "usage": {"tokens": tokens}},
        }

    # Model b alone goes far past 100 without touching a's row; a crosses 100 with its own records.
    asyncio.run(
        publish(
            settings, _messages([usage(n, "b", 150) for n in range(4)] + [usage(10 + n, "a", 60) for n in range(2)])
        )
    )
    alerts = asyncio.run(read_json(settings.kafka_bootstrap, Topics.of(settings).alerts, 2, timeout=60, settle=3))
    assert sorted((a["thresholdId"], a["type"], a["value"], a["dimensions"]) for a in alerts) == [
        ("a-cap", "threshold.approaching", "120", {"model": "a", "region": "eu"}),
        ("a-cap", "threshold.exceeded", "120", {"model": "a", "region": "eu"}),
    ]
    # The total (720) is under its own cap's approaching fraction (800): one more b record crosses it.
    asyncio.run(publish(settings, _messages([usage(20, "b", 100)])))
    alerts = asyncio.run(read_json(settings.kafka_bootstrap, Topics.of(settings).alerts, 3, timeout=60, settle=2))
    assert [
        (a["thresholdId"], a["type"], a["value"], a["dimensions"]) for a in alerts if a["thresholdId"] == "total-cap"
    ] == [("total-cap", "threshold.approaching", "820", {})]

    def archived() -> list[tuple]:
        with connect(settings) as client:
            rows = client.query("SELECT threshold_id, dimensions FROM threshold_events FINAL ORDER BY id").result_rows
        assert len(rows) == 3, rows
        return rows

    rows = eventually(archived, 30, interval=0.5)
    assert sorted((tid, tuple(sorted(d.items()))) for tid, d in rows) == [
        ("a-cap", (("model", "a"), ("region", "eu"))),
        ("a-cap", (("model", "a"), ("region", "eu"))),
        ("total-cap", ()),
    ]
