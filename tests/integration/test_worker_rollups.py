"""Real `metering worker` processes against Apache Kafka and the ClickHouse endpoint.

Expected rollups are computed here, independently of the pipeline's code, from what the
test published; ClickHouse must hold exactly those rows.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest

from metering_dev.bench.soak_summary import counter
from metering_pipeline.topics import Topics
from metering_pipeline.warehouse.client import connect
from support import PARTITIONS, WorkerProcess, define, eventually, metric, publish, read_json

pytestmark = pytest.mark.integration


def expected_rollups(records: list[dict], aggregation_of) -> dict[tuple, tuple[Decimal, int]]:
    """(metric, subject_type, subject_id, period, start) -> (total, count), computed from first principles."""
    values: dict[tuple, list[Decimal]] = defaultdict(list)
    for r in records:
        at = r["at"]
        starts = {
            "HOURLY": at.replace(minute=0, second=0, microsecond=0),
            "DAILY": at.replace(hour=0, minute=0, second=0, microsecond=0),
            "MONTHLY": at.replace(day=1, hour=0, minute=0, second=0, microsecond=0),
        }
        for period, start in starts.items():
            values[(r["metricKey"], r["subjectType"], r["subjectId"], period, start.replace(tzinfo=None))].append(
                Decimal(r["quantity"])
            )
    result = {}
    for key, quantities in values.items():
        aggregation = aggregation_of(key[0], key[2])
        total = {
            "COUNT": Decimal(len(quantities)),
            "SUM": sum(quantities, Decimal(0)),
            "MAX": max(quantities),
            "MIN": min(quantities),
            "AVG": (sum(quantities, Decimal(0)) / len(quantities)).quantize(Decimal("1e-18")),
        }[aggregation]
        result[key] = (total, len(quantities))
    return result


def summary(settings) -> dict[tuple, tuple[Decimal, int]]:
    with connect(settings) as client:
        rows = client.query(
            "SELECT metric_key, subject_type, subject_id, period_type, period_start, total_quantity, record_count "
            "FROM usage_summary"
        ).result_rows
    return {tuple(row[:5]): (Decimal(row[5]), row[6]) for row in rows}


def summary_is(settings, expected) -> bool:
    """usage_summary holds exactly `expected` (a condition for `eventually`)."""
    actual = summary(settings)
    if actual != expected:
        missing = {k: v for k, v in expected.items() if actual.get(k) != v}
        extra = {k: v for k, v in actual.items() if k not in expected}
        raise AssertionError(
            f"usage_summary differs: {len(missing)} wrong/missing e.g. {list(missing.items())[:3]}, "
            f"actual {[actual.get(k) for k in list(missing)[:3]]}; {len(extra)} extra e.g. {list(extra.items())[:3]}"
        )
    return True


def usage_record(rng: random.Random, now: datetime, n: int, metrics: list[str], **overrides) -> dict:
    at = now - timedelta(seconds=rng.randint(0, 3 * 86_400))
    record = {
        "id": f"evt-{n}",
        "metricKey": rng.choice(metrics),
        "subjectType": "org",
        "subjectId": f"org-{rng.randint(1, 6)}",
        "quantity": str(Decimal(rng.randint(1, 10_000)) / 1000),
        "timestamp": at.isoformat(),
        "at": at.replace(microsecond=at.microsecond // 1000 * 1000),
    }
    record.update(overrides)
    return record


def wire(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "at"}


async def test_worker_rolls_up_exactly_with_dedup_batches_late_records_org_overrides_and_dlq(pipeline):
    settings, new_worker = pipeline
    await define(
        settings,
        metric("calls", "COUNT"),
        metric("tokens", "SUM"),
        metric("peak", "MAX"),
        metric("floor", "MIN"),
        metric("mean", "AVG"),
        metric("org-6:tokens", "MAX", org_id="org-6", key="tokens"),
    )
    aggregation = {"calls": "COUNT", "tokens": "SUM", "peak": "MAX", "floor": "MIN", "mean": "AVG"}
    worker = new_worker().start()
    worker.wait_healthy()

    rng = random.Random(3)
    now = datetime.now(UTC)
    records = [usage_record(rng, now, n, sorted(aggregation)) for n in range(400)]
    # Exactness: quantities with 18 decimals, given as JSON numbers, never pass through a float.
    records += [usage_record(rng, now, 400 + n, ["tokens"], quantity="0.100000000000000001") for n in range(5)]
    messages: list[tuple[bytes | None, bytes, int | None]] = []
    for r in records:
        key = rng.choice([None, f"{r['subjectType']}:{r['subjectId']}".encode(), b"whatever"])
        value = orjson.dumps(wire(r)).replace(b'"0.100000000000000001"', b"0.100000000000000001")
        messages.append((key, value, rng.randrange(PARTITIONS)))
    # Retries of 60 records on other partitions, with other keys: not counted again.
    for r in rng.sample(records, 60):
        messages.append((None, orjson.dumps(wire(r)), rng.randrange(PARTITIONS)))
    # A batch message: 30 good records and one bad one.
    batch = [usage_record(rng, now, 1000 + n, ["calls", "tokens"]) for n in range(30)]
    bad_element = {"metricKey": "calls", "subjectType": "org", "quantity": "NaN"}
    messages.append((None, orjson.dumps({"records": [*map(wire, batch[:10]), bad_element, *map(wire, batch[10:])]}), 0))
    records += batch
    # Records without ids count once per message, even with identical content.
    no_id = [usage_record(rng, now, 0, ["calls"]) for _ in range(8)]
    for r in no_id:
        del r["id"]
        messages.append((None, orjson.dumps(wire(r)), rng.randrange(PARTITIONS)))
    records += no_id
    # A late record inside the allowed lateness lands in its own (old) periods.
    late = usage_record(
        rng,
        now,
        2000,
        ["tokens"],
        timestamp=(now - timedelta(days=20)).isoformat(),
        at=(now - timedelta(days=20)).replace(microsecond=(now - timedelta(days=20)).microsecond // 1000 * 1000),
    )
    messages.append((None, orjson.dumps(wire(late)), 1))
    records.append(late)
    # The org-scoped definition overrides the global one for org-6's tokens (MAX instead of SUM).
    rejected = {
        "too_late": usage_record(rng, now, 3000, ["tokens"], timestamp=(now - timedelta(days=40)).isoformat()),
        "future_timestamp": usage_record(rng, now, 3001, ["tokens"], timestamp=(now + timedelta(hours=1)).isoformat()),
        "unknown_metric": usage_record(rng, now, 3002, ["no_such_metric"]),
    }
    for r in rejected.values():
        messages.append((None, orjson.dumps(wire(r)), 2))
    messages.append((b"k", b"{not json", 3))
    await publish(settings, messages)

    def aggregation_of(metric_key: str, subject_id: str) -> str:
        return "MAX" if (metric_key, subject_id) == ("tokens", "org-6") else aggregation[metric_key]

    expected = expected_rollups(records, aggregation_of)
    await asyncio.to_thread(eventually, lambda: summary_is(settings, expected), 90, interval=0.5)

    # Anything beyond the 5 expected would be a bug: give it a second to show up.
    letters = await read_json(settings.kafka_bootstrap, Topics.of(settings).dead_letters, 5, settle=1)
    assert Counter(d["reason"] for d in letters) == Counter(
        {"too_late": 1, "future_timestamp": 1, "unknown_metric": 1, "invalid_json": 1, "invalid_record": 1}
    )
    bad = next(d for d in letters if d["reason"] == "invalid_record")
    assert bad["index"] == 10 and {tuple(e["loc"]) for e in bad["errors"]} >= {("subjectId",), ("quantity",)}
    assert next(d for d in letters if d["reason"] == "invalid_json")["source"]["partition"] == 3

    with connect(settings) as client:
        stored = client.query("SELECT count() FROM usage_records FINAL").result_rows[0][0]
    assert stored == len(records)
    assert counter(worker.metrics(), "metering_records_duplicate_total") == 60


async def test_sigkilled_and_restarted_workers_in_one_group_neither_lose_nor_double_count(pipeline):
    settings, new_worker = pipeline
    await define(settings, metric("calls", "COUNT"), metric("tokens", "SUM"))
    first, second = new_worker().start(), new_worker().start()
    first.wait_healthy()
    second.wait_healthy()

    rng = random.Random(11)
    now = datetime.now(UTC)
    records = [usage_record(rng, now, n, ["calls", "tokens"]) for n in range(12_000)]
    chunks = [records[i : i + 1_000] for i in range(0, len(records), 1_000)]

    async def produce() -> None:
        for chunk in chunks:
            await publish(settings, [(None, orjson.dumps(wire(r)), rng.randrange(PARTITIONS)) for r in chunk])
            await asyncio.sleep(0.4)

    producing = asyncio.create_task(produce())
    # Crash each worker mid-stream, at different moments, and bring it back.
    await asyncio.sleep(1.5)
    first.kill()
    await asyncio.sleep(1.0)
    first = new_worker().start()
    await asyncio.sleep(1.5)
    second.kill()
    await asyncio.sleep(0.5)
    second = new_worker().start()
    await producing
    # Producer retries after a crash are re-sends of the same records: they must not count.
    await publish(
        settings, [(None, orjson.dumps(wire(r)), rng.randrange(PARTITIONS)) for r in rng.sample(records, 500)]
    )

    expected = expected_rollups(records, lambda metric_key, _: {"calls": "COUNT", "tokens": "SUM"}[metric_key])
    await asyncio.to_thread(eventually, lambda: summary_is(settings, expected), 180, interval=0.5)
    with connect(settings) as client:
        assert client.query("SELECT count() FROM usage_records FINAL").result_rows[0][0] == len(records)


async def test_dedup_state_survives_a_worker_restart(pipeline):
    settings, new_worker = pipeline
    await define(settings, metric("calls", "COUNT"))
    worker = new_worker().start()
    worker.wait_healthy()
    rng = random.Random(5)
    now = datetime.now(UTC)
    records = [usage_record(rng, now, n, ["calls"]) for n in range(200)]
    await publish(settings, [(None, orjson.dumps(wire(r)), rng.randrange(PARTITIONS)) for r in records])
    expected = expected_rollups(records, lambda *_: "COUNT")
    await asyncio.to_thread(eventually, lambda: summary_is(settings, expected), 90, interval=0.5)
    worker.stop()

    restarted = new_worker().start()
    restarted.wait_healthy()
    # The same 200 records again, after the restart: the restored dedup window drops all of them.
    await publish(settings, [(None, orjson.dumps(wire(r)), rng.randrange(PARTITIONS)) for r in records])
    marker = usage_record(rng, now, 10_000, ["calls"])
    await publish(settings, [(None, orjson.dumps(wire(marker)), 0)])
    expected = expected_rollups([*records, marker], lambda *_: "COUNT")
    await asyncio.to_thread(eventually, lambda: summary_is(settings, expected), 90, interval=0.5)
    assert counter(restarted.metrics(), "metering_records_duplicate_total") == 200


async def test_on_tansu_the_worker_runs_at_least_once_and_rollups_still_converge(tansu_stack, unique_name, tmp_path):
    """tansu has no transactions: the documented degrade is at_least_once, whose ClickHouse rollups stay exact."""
    settings = tansu_stack.settings(
        topic_prefix=f"{unique_name}.",
        consumer_group_prefix=unique_name,
        clickhouse_database=unique_name,
        usage_partitions=2,
        processing_guarantee="at_least_once",
    )
    env = {
        "METERING_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "METERING_CLICKHOUSE_URL": settings.clickhouse_url,
        "METERING_TOPIC_PREFIX": settings.topic_prefix,
        "METERING_CONSUMER_GROUP_PREFIX": unique_name,
        "METERING_CLICKHOUSE_DATABASE": unique_name,
        "METERING_USAGE_PARTITIONS": "2",
        "METERING_PROCESSING_GUARANTEE": "at_least_once",
        "METERING_FLUSH_INTERVAL": "0.5",
    }
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        worker.wait_healthy(timeout=120)
        await define(settings, metric("tokens", "SUM"))
        rng = random.Random(2)
        now = datetime.now(UTC)
        records = [usage_record(rng, now, n, ["tokens"]) for n in range(300)]
        await asyncio.sleep(1)
        await publish(settings, [(None, orjson.dumps(wire(r)), None) for r in records + records[:50]])
        expected = expected_rollups(records, lambda *_: "SUM")
        await asyncio.to_thread(eventually, lambda: summary_is(settings, expected), 120, interval=0.5)
    finally:
        worker.stop()
