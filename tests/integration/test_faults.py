"""Servers stop mid-stream and come back (ClickHouse, the Kafka broker): the worker holds on
(bounded memory, retries with backoff, reconnects) and every record ends up in the rollups exactly once;
/ready tells a worker whose writes keep failing (/health stays 200), and a permanent ClickHouse error stops the
worker."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import signal
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from metering_dev.bench.measure import rss_bytes
from metering_dev.bench.state_phases import metric as metric_value, scrape
from metering_pipeline.invoicing.settlement import processed_through
from metering_pipeline.topics import KAFKA_UNREACHABLE, Topics
from metering_pipeline.warehouse.client import connect
from metering_pipeline.worker.routing import ROUTED_BATCH, subject_partition
from support import (
    PARTITIONS,
    define,
    eventually,
    metric,
    publish,
    read_json,
    routing_progress,
    running_api,
    set_thresholds,
    summary_rows,
    threshold,
    usage,
    while_running,
)

pytestmark = pytest.mark.integration

# Short versions run in CI; `make faults-long` runs the same tests with a 60 s outage and a 2-minute storm.
OUTAGE_SECONDS = float(os.environ.get("METERING_FAULT_OUTAGE_SECONDS", "20"))
STORM_SECONDS = float(os.environ.get("METERING_FAULT_STORM_SECONDS", "50"))
BUFFERED_RECORDS = 4000  # the outage brings more than this, so the worker must pause consumption


def _rss_mb(pid: int) -> float:
    return rss_bytes(pid) / 2**20


def _totals(settings) -> tuple[int, Decimal, int]:
    """The `tokens` metric's records: how many are stored, their sum, and how many its monthly total rows count."""
    with connect(settings) as client:
        records = client.query(
            "SELECT count(), sum(quantity) FROM usage_records FINAL WHERE metric_key = 'tokens'"
        ).result_rows[0]
        [[monthly]] = client.query(
            "SELECT sum(record_count) FROM usage_summary WHERE metric_key = 'tokens' "
            "AND period_type = 'MONTHLY' AND empty(dimensions)"
        ).result_rows
    return records[0], records[1], monthly


def _batch(start: int, count: int) -> list:
    return [usage(f"r{n}", "tokens", f"org:o{n % 50}", "0.1") for n in range(start, start + count)]


@contextmanager
def _sampled(worker, name: str, every: float = 0.05) -> Iterator[list[float]]:
    """The worker's metric `name` every `every` seconds while the block runs (a gauge's peak between scrapes); a
    scrape the busy worker does not answer is skipped."""
    values: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            text = scrape(worker)
            value = None if text is None else metric_value(text, name)
            if value is not None:
                values.append(value)
            done.wait(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield values
    finally:
        done.set()
        sampler.join()


def _wait_for_records(settings, worker, at_least: int, timeout: float) -> None:
    eventually(
        while_running(worker, lambda: _totals(settings)[0] >= at_least), timeout, interval=0.5, message=worker.log_tail
    )


def _worker_counting(settings, new_worker, first_records: int, **overrides: str):
    """A running worker that has already counted part of a first batch: the fault hits mid-stream."""
    asyncio.run(define(settings, metric("tokens", "SUM")))
    worker = new_worker(**overrides).start()
    worker.wait_healthy()
    asyncio.run(publish(settings, _batch(0, first_records)))
    _wait_for_records(settings, worker, 500, 60)
    return worker


@pytest.mark.slow  # about 45 s in CI with its 20 s outage, over a minute under `make faults-long`
def test_a_clickhouse_outage_mid_stream_loses_and_doubles_nothing_and_alerts_keep_flowing(private_clickhouse_pipeline):
    endpoint, settings, new_worker = private_clickhouse_pipeline
    asyncio.run(set_thresholds(settings, threshold("cap", "tokens", "org:loud", "5")))
    worker = _worker_counting(settings, new_worker, 2000, METERING_MAX_BUFFERED_RECORDS=str(BUFFERED_RECORDS))

    endpoint.stop()
    rss_before = _rss_mb(worker.process.pid)
    started = time.monotonic()
    asyncio.run(publish(settings, [usage("loud-1", "tokens", "org:loud", "10")]))
    alerts = asyncio.run(read_json(settings.kafka_bootstrap, Topics.of(settings).alerts, 2, timeout=15))
    assert {a["type"] for a in alerts} == {"threshold.approaching", "threshold.exceeded"}
    assert time.monotonic() - started < OUTAGE_SECONDS  # they came while ClickHouse was still down
    # A backlog: read at once when the rollup stage resumes.
    asyncio.run(publish(settings, _batch(2000, 5 * BUFFERED_RECORDS)))
    sent = 2000 + 5 * BUFFERED_RECORDS
    # The rollup stage pauses at once; the router holds once that pause has lasted ROUTER_HOLD_AFTER_SECONDS.
    eventually(while_running(worker, lambda: "router holding" in worker.log_path.read_text()), 30)
    time.sleep(1)  # a poll the router read before the hold is routed
    routed_at_pause, unrouted_at_pause = asyncio.run(routing_progress(settings))
    sent_at_pause = sent
    while time.monotonic() - started < OUTAGE_SECONDS:  # usage keeps arriving while ClickHouse is down
        asyncio.run(publish(settings, _batch(sent, 500)))
        sent += 500
        time.sleep(1)
    assert worker.process.poll() is None, "the worker died while ClickHouse was down"
    # The router holds while the rollup stage stays paused: what arrived meanwhile waits in usage.recorded (whose
    # retention the operator sizes), not in the routed topic.
    routed, unrouted = asyncio.run(routing_progress(settings))
    assert sent - sent_at_pause >= 500 * 5, "the outage ended before usage arrived during the router's hold"
    assert routed == routed_at_pause and unrouted - unrouted_at_pause >= sent - sent_at_pause
    rss_grown = _rss_mb(worker.process.pid) - rss_before
    assert rss_grown < 150, f"RSS grew by {rss_grown:.0f} MB during the outage"
    assert "pausing consumption" in worker.log_path.read_text()  # backpressure, not an unbounded buffer

    endpoint.start()
    with _sampled(worker, "metering_buffered_records") as buffered:
        _wait_for_records(settings, worker, sent + 1, 180)
    # The first poll after the pause brings the whole backlog (up to a fetch per partition): the worker holds the
    # bound and at most one routed message (ROUTED_BATCH records) more, never the whole poll.
    assert buffered and max(buffered) <= BUFFERED_RECORDS + ROUTED_BATCH, buffered[-20:]
    time.sleep(2)  # a late duplicate would show up now
    assert _totals(settings) == (sent + 1, Decimal("0.1") * sent + 10, sent + 1)
    assert "retrying" in worker.log_path.read_text()  # the sink did fail and retry, the outage was real
    with connect(settings) as client:  # the alerts reached the warehouse too, once each
        rows = client.query("SELECT type FROM threshold_events FINAL ORDER BY type").result_rows
    assert rows == [("threshold.approaching",), ("threshold.exceeded",)]


def test_a_worker_started_while_clickhouse_hangs_consumes_alerts_and_serves_and_is_exact_once_it_answers(
    private_clickhouse_pipeline,
):
    endpoint, settings, new_worker = private_clickhouse_pipeline
    asyncio.run(define(settings, metric("tokens", "SUM")))
    asyncio.run(set_thresholds(settings, threshold("cap", "tokens", "org:loud", "5", action="BLOCK")))
    os.kill(endpoint.process.pid, signal.SIGSTOP)
    try:
        worker = new_worker().start()
        worker.wait_healthy(timeout=90)
        published = time.monotonic()
        asyncio.run(publish(settings, [usage("loud-1", "tokens", "org:loud", "10"), *_batch(0, 500)]))
        alerts = asyncio.run(read_json(settings.kafka_bootstrap, Topics.of(settings).alerts, 2, timeout=30))
        assert sorted(a["type"] for a in alerts) == ["threshold.approaching", "threshold.exceeded"]
        assert time.monotonic() - published < 15, "alerts wait for nothing but Kafka"
        with urllib.request.urlopen(f"{worker.url}/v1/subjects/org/loud/metrics/tokens", timeout=10) as answer:
            checked = json.loads(answer.read())
        assert (checked["value"], checked["blocked"]) == ("10", True)
        assert "ClickHouse does not answer" in worker.log_path.read_text()
        assert endpoint.process.poll() is None  # still hanging all along
    finally:
        os.kill(endpoint.process.pid, signal.SIGCONT)
    _wait_for_records(settings, worker, 501, 240)
    time.sleep(2)  # a late duplicate would show up now
    assert _totals(settings) == (501, Decimal("0.1") * 500 + 10, 501)


@contextmanager
def _usage_flowing(settings, first: int) -> Iterator[Callable[[], int]]:
    """`_batch` records published at about 300/s from record `first` on until the block ends; yields how many so far."""
    sent, done = [0], threading.Event()

    def flow() -> None:
        while not done.wait(0.5):
            asyncio.run(publish(settings, _batch(first + sent[0], 150)))
            sent[0] += 150

    flowing = threading.Thread(target=flow)
    flowing.start()
    try:
        yield lambda: sent[0]
    finally:
        done.set()
        flowing.join()


def _owned_partitions(worker) -> int:
    [line] = [line for line in worker.metrics().splitlines() if line.startswith("metering_owned_partitions ")]
    return int(float(line.split()[1]))


def _a_subject_per_partition(prefix: str) -> list[str]:
    """Org subject ids, one routed to each partition: what they bring needs every partition's owner."""
    found: dict[int, str] = {}
    for n in itertools.count():
        found.setdefault(subject_partition("org", f"{prefix}{n}", PARTITIONS), f"{prefix}{n}")
        if len(found) == PARTITIONS:
            return sorted(found.values())


def test_a_worker_that_replaces_a_killed_one_while_clickhouse_hangs_restores_and_alerts_before_it_answers(
    private_clickhouse_pipeline,
):
    """Two workers with state; ClickHouse hangs; one is SIGKILLed and a successor starts at once. The rebalance that
    follows (the survivor giving its partitions up, the successor and the survivor restoring them) waits for nothing
    but the killed worker's session, and the successor alerts and answers from restored state."""
    endpoint, settings, new_worker = private_clickhouse_pipeline
    asyncio.run(define(settings, metric("loud", "SUM")))
    asyncio.run(set_thresholds(settings, threshold("cap", "loud", "org:*", "5", action="BLOCK")))
    # The killed worker's session is short: the successor gets no partition before it ends, whatever else happens.
    # The others have the production default: a worker slow to give its partitions up holds the whole group that long.
    killed = _worker_counting(settings, new_worker, 1000, METERING_KAFKA_SESSION_TIMEOUT="6")
    survivor = new_worker(METERING_KAFKA_SESSION_TIMEOUT="30").start()
    survivor.wait_healthy()
    eventually(
        lambda: _owned_partitions(survivor) > 0 and _owned_partitions(killed) > 0,
        60,
        interval=0.5,
        message=survivor.log_tail,
    )
    _wait_for_records(settings, killed, 1000, 60)  # every partition has state in the changelog to restore
    alerted: list[dict] = []

    def alerts_within(seconds: float, wave: str) -> list[str]:
        """A record over the threshold for a subject on each partition; all their alerts within `seconds`."""
        subjects = _a_subject_per_partition(wave)
        asyncio.run(publish(settings, [usage(f"{wave}-record", "loud", f"org:{s}", "10") for s in subjects]))
        published = time.monotonic()
        alerted[:] = asyncio.run(
            read_json(
                settings.kafka_bootstrap, Topics.of(settings).alerts, len(alerted) + 2 * len(subjects), timeout=60
            )
        )
        took = time.monotonic() - published
        assert took < seconds, f"the {wave} wave's alerts took {took:.1f} s"
        assert endpoint.process.poll() is None  # ClickHouse hangs all along
        return subjects

    os.kill(endpoint.process.pid, signal.SIGSTOP)
    try:
        with _usage_flowing(settings, 1000) as flowed:
            alerts_within(10, "before")
            killed.kill()
            successor = new_worker(METERING_KAFKA_SESSION_TIMEOUT="30").start()
            alerts_within(20, "during")  # the successor starts, the group rebalances, the partitions are restored
            subjects = alerts_within(10, "after")
            successor.wait_healthy(timeout=10)
        assert sorted((a["subjectId"], a["type"]) for a in alerted) == sorted(
            (subject, t)
            for wave in ("before", "during", "after")
            for subject in _a_subject_per_partition(wave)
            for t in ("threshold.approaching", "threshold.exceeded")
        )
        for worker, subject in itertools.product((successor, survivor), subjects):  # owners answer, the other forwards
            with urllib.request.urlopen(f"{worker.url}/v1/subjects/org/{subject}/metrics/loud", timeout=10) as answer:
                checked = json.loads(answer.read())
            assert (checked["value"], checked["blocked"]) == ("10", True)
        assert "ClickHouse does not answer" in successor.log_path.read_text()
    finally:
        os.kill(endpoint.process.pid, signal.SIGCONT)
    sent = 1000 + flowed()
    _wait_for_records(settings, successor, sent, 240)
    time.sleep(2)  # a late duplicate would show up now
    assert _totals(settings) == (sent, Decimal("0.1") * sent, sent)


def _wait_for_probe(worker, path: str, status: int, timeout: float) -> dict:
    def answered() -> dict:
        answer = worker.probe(path)
        assert answer[0] == status, f"{path} still {answer}"
        return answer[1]

    return eventually(while_running(worker, answered), timeout, interval=0.2)


def test_ready_is_503_with_the_failing_writer_while_clickhouse_is_down_longer_than_allowed_and_health_stays_200(
    private_clickhouse_pipeline,
):
    endpoint, settings, new_worker = private_clickhouse_pipeline
    worker = _worker_counting(settings, new_worker, 1000, METERING_WRITER_UNHEALTHY_AFTER="2")
    assert worker.health() == (200, {"healthy": True})
    assert worker.ready() == (200, {"ready": True, "restoring": []})

    endpoint.stop()
    stopped = time.monotonic()
    asyncio.run(publish(settings, _batch(1000, 200)))  # the writer has something to write, and fails
    body = _wait_for_probe(worker, "/ready", 503, 30)
    assert time.monotonic() - stopped > 2  # not before METERING_WRITER_UNHEALTHY_AFTER
    assert body["ready"] is False
    assert re.fullmatch(
        r"checkpoint writer of partition \d+ failing for \d+ s: .*[Cc]onnection refused.*", body["reason"]
    ), body
    assert worker.health() == (200, {"healthy": True})  # alive: a liveness probe must not restart it for this

    endpoint.start()
    assert _wait_for_probe(worker, "/ready", 200, 60) == {"ready": True, "restoring": []}
    _wait_for_records(settings, worker, 1200, 120)
    time.sleep(2)  # a late duplicate would show up now
    assert _totals(settings) == (1200, Decimal("120.0"), 1200)


async def _committed(settings) -> dict:
    """The rollup stage's committed offsets on the routed topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(f"{settings.consumer_group_prefix}-rollups")
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == Topics.of(settings).routed}


def test_a_permanent_clickhouse_error_stops_the_worker_with_one_error_line_exit_1_and_nothing_committed_past_it(
    pipeline,
):
    settings, new_worker = pipeline
    worker = _worker_counting(settings, new_worker, 1000)
    _wait_for_records(settings, worker, 1000, 60)
    eventually(
        lambda: _totals(settings)[2] >= 1000,
        60,
        interval=0.5,  # the rollups too: the last checkpoint is committed
        message=worker.log_tail,
    )
    committed = asyncio.run(_committed(settings))
    assert committed

    with connect(settings) as client:  # the worker's inserts now fail with 60 UNKNOWN_TABLE, which no retry fixes
        client.command("RENAME TABLE usage_records TO usage_records_parked")
    asyncio.run(publish(settings, _batch(1000, 500)))
    assert worker.process.wait(timeout=60) == 1, worker.log_tail()

    # (Faust's console spinner may prefix the line with terminal control characters.)
    failed = [
        json.loads(line[line.index("{") :])
        for line in worker.log_path.read_text().splitlines()
        if "stage failed" in line
    ]
    assert len(failed) == 1, failed
    [line] = failed
    assert line["level"] == "error" and line["stage"] == "rollups"
    assert "UNKNOWN_TABLE" in line["error"] and "while trying to write usage_records" in line["error"], line["error"]
    assert '"what": "write usage_records"' not in worker.log_path.read_text()  # not retried
    assert asyncio.run(_committed(settings)) == committed  # the offsets did not move past what was written

    with connect(settings) as client:
        client.command("RENAME TABLE usage_records_parked TO usage_records")
    replacement = new_worker().start()
    replacement.wait_healthy()
    _wait_for_records(settings, replacement, 1500, 120)
    time.sleep(2)  # a late duplicate would show up now
    assert _totals(settings) == (1500, Decimal("150.0"), 1500)


@pytest.mark.slow  # about 40 s in CI (a stack of its own, its broker down for half the outage), more under faults-long
def test_a_broker_restart_mid_stream_loses_and_doubles_nothing(private_apache_stack, isolated, unique_name, tmp_path):
    stack, config, running = private_apache_stack
    with (
        isolated(running, unique_name, tmp_path) as (settings, new_worker),
        running_api(settings, tmp_path / "api") as api,
        api.client() as client,
    ):
        worker = _worker_counting(settings, new_worker, 3000)
        assert client.post("/v1/usage", json=_api_record("api-before")).status_code == 202

        assert worker.ready()[0] == 200 and api.client(None).get("/ready").json() == {"ready": True}  # no key needed
        log_before_outage = worker.log_path.stat().st_size
        assert stack.kafka.stop()
        outage_started = time.monotonic()
        # Not ready while no broker answers, and alive all along: a liveness probe must not restart them for this.
        assert worker.ready() == (503, {"ready": False, "restoring": [], "reason": KAFKA_UNREACHABLE})
        assert (client.get("/ready").status_code, client.get("/ready").json()) == (
            503,
            {"ready": False, "reason": KAFKA_UNREACHABLE},
        )
        assert worker.health() == (200, {"healthy": True}) and client.get("/health").status_code == 200
        time.sleep(max(0.0, OUTAGE_SECONDS / 2 - (time.monotonic() - outage_started)))
        assert worker.process.poll() is None, "the worker died while the broker was down"
        stack.up(config)  # the same broker (same log dir and port) again
        asyncio.run(publish(settings, _batch(3000, 2000)))
        deadline = time.monotonic() + 60  # the API's long-lived producer reconnects by itself
        while (status := client.post("/v1/usage", json=_api_record("api-after")).status_code) != 202:
            assert status == 503 and time.monotonic() < deadline, status  # "unavailable" until then, never lost
            time.sleep(1)

        _wait_for_records(settings, worker, 5002, 180)
        time.sleep(2)  # a late duplicate would show up now
        assert _totals(settings) == (5002, Decimal("500.0") + 2, 5002)
        assert worker.ready() == (200, {"ready": True, "restoring": []}) and client.get("/ready").status_code == 200

        def back() -> str:
            said = _log_since(worker, log_before_outage)
            assert re.search("Kafka (broker )?reachable again", said), said[-3000:]
            return said

        # The outage is told in a few lines, not thousands of retried errors; "back" once the retries stopped.
        said = eventually(back, 30, interval=1)
        loud = [
            line
            for line in said.splitlines()
            if re.search(r'\[(WARNING|ERROR|CRITICAL)\]|"level": "(warning|error|critical)"', line)
        ]
        assert len(loud) < 10, "\n".join(loud[:40])
        assert [line for line in loud if re.search("Kafka (broker )?unreachable", line)] and [
            line for line in loud if re.search("Kafka (broker )?reachable again", line)
        ]


def _log_since(worker, offset: int) -> str:
    with worker.log_path.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _api_record(record_id: str) -> dict:
    return {"id": record_id, "metricKey": "tokens", "subjectType": "org", "subjectId": "api", "quantity": "1"}


# The storm's load also carries a metric of each kind that reads the payload: their state (distinct values, the latest
# value with its timestamp and id, per-dimension rollups) must move between workers exactly too.
PAYLOAD_METRICS = (
    {
        **metric("model_tokens", "SUM"),
        "valueProperty": "$.metadata.tokens",
        "groupBy": {"model": "$.metadata.model", "region": "$.metadata.region"},
    },
    {**metric("users", "UNIQUE_COUNT"), "valueProperty": "$.metadata.user", "groupBy": {"model": "$.metadata.model"}},
    metric("gauge", "LATEST"),
    {**metric("eu_tokens", "SUM"), "valueProperty": "$.metadata.tokens", "filter": {"$.metadata.region": ["eu"]}},
)
GROUPS = {d["key"]: tuple(d.get("groupBy", ())) for d in PAYLOAD_METRICS}


def _payload_record(rng: random.Random, n: int, now: datetime) -> dict:
    metric_key = rng.choice(sorted(GROUPS))
    if (
        metric_key == "gauge"
    ):  # whole minutes within half an hour: the latest timestamp is often shared (greatest id wins)
        at = now - timedelta(minutes=rng.randint(0, 30))
    else:  # over two days: hours and days of their own
        at = now - timedelta(milliseconds=rng.randint(0, 2 * 86_400_000))
    metadata: dict = {
        "user": f"u{rng.randint(1, 20)}",
        "tokens": rng.choice([rng.randint(1, 5000), f"{rng.randint(0, 99)}.{rng.randint(0, 10**18 - 1):018d}"]),
    }
    for name, values in (("model", ["a", "b", "c", None, "missing"]), ("region", ["eu", "us", None, "missing"])):
        if (value := rng.choice(values)) != "missing":
            metadata[name] = value
    return {
        "id": f"x{n}",
        "metricKey": metric_key,
        "subjectType": "org",
        "subjectId": f"p{rng.randint(1, 8)}",
        "quantity": str(rng.randint(1, 1000)),
        "timestamp": at.isoformat(),
        "metadata": metadata,
    }


def _payload_expected(records: list[dict]) -> dict[tuple, tuple[Decimal, int]]:
    """(metric, subject, period, start, dimensions) -> (total_quantity, record_count), from first principles: a total
    row ({}) per period, and for a grouped metric a row per combination of its dimensions' values ("" when missing)."""
    members: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        metadata = r["metadata"]
        if r["metricKey"] == "eu_tokens" and metadata.get("region") != "eu":
            continue  # filtered out
        dimensions = tuple(sorted((name, metadata.get(name) or "") for name in GROUPS[r["metricKey"]]))
        at = datetime.fromisoformat(r["timestamp"]).astimezone(UTC).replace(tzinfo=None)
        hour = at.replace(minute=0, second=0, microsecond=0)
        for period, start in (
            ("HOURLY", hour),
            ("DAILY", hour.replace(hour=0)),
            ("MONTHLY", hour.replace(day=1, hour=0)),
        ):
            for dims in {(), dimensions}:
                members[(r["metricKey"], r["subjectId"], period, start, dims)].append(r)
    expected = {}
    for key, rows in members.items():
        if key[0] == "users":
            total = Decimal(len({m["metadata"]["user"] for m in rows}))
        elif key[0] == "gauge":
            total = Decimal(max(rows, key=lambda m: (datetime.fromisoformat(m["timestamp"]), m["id"]))["quantity"])
        else:
            total = sum((Decimal(str(m["metadata"]["tokens"])) for m in rows), Decimal(0))
        expected[key] = (total, len(rows))
    return expected


@pytest.mark.slow  # about a minute in CI with its 50 s storm, over two under `make faults-long`
def test_a_rebalance_storm_under_steady_load_loses_and_doubles_nothing(pipeline):
    settings, new_worker = pipeline
    asyncio.run(define(settings, metric("tokens", "SUM"), *PAYLOAD_METRICS))
    asyncio.run(set_thresholds(settings, threshold("cap", "tokens", "org:*", "5")))  # every subject crosses it
    alive = [new_worker().start() for _ in range(3)]
    for worker in alive:
        worker.wait_healthy()
    rng = random.Random(5)
    load, now, payload = random.Random(15), datetime.now(UTC).replace(microsecond=0), []

    async def storm() -> int:
        sent = 0
        started = time.monotonic()
        next_change = started + 10
        while time.monotonic() - started < STORM_SECONDS:
            fresh = [_payload_record(load, len(payload) + n, now) for n in range(20)]
            retries = load.sample(payload, min(2, len(payload)))  # the same records again: never counted twice
            payload.extend(fresh)
            messages = [(f"org:{r['subjectId']}".encode(), orjson.dumps(r), None) for r in fresh + retries]
            await publish(
                settings, _batch(sent, 100) + messages
            )  # ~200 records/s across 50 subjects, and ~40 of the others
            sent += 100
            await asyncio.sleep(0.5)
            if time.monotonic() >= next_change:
                next_change += 10
                if len(alive) > 1 and (len(alive) == 3 or rng.random() < 0.5):
                    victim = alive.pop(rng.randrange(len(alive)))
                    await asyncio.to_thread(victim.kill)
                else:
                    alive.append(new_worker().start())
        return sent

    sent = asyncio.run(storm())
    assert any(worker.process.poll() is None for worker in alive)
    stormed = time.monotonic()
    _wait_for_records(settings, next(w for w in alive if w.process.poll() is None), sent, 180)
    caught_up = time.monotonic()
    # Lag back to zero: both groups consumed everything published (billing's settlement check, read through
    # transaction markers; every record's time is before a close a day from now).
    assert asyncio.run(processed_through(settings, datetime.now(UTC) + timedelta(days=1), wait=120))
    caught_up = time.monotonic() - caught_up
    print(
        f"storm: {sent} + {len(payload)} records in {STORM_SECONDS:.0f} s; "
        f"totals complete {time.monotonic() - stormed:.1f} s and lag zero {caught_up:.1f} s after it"
    )
    time.sleep(2)
    assert _totals(settings) == (sent, Decimal("0.1") * sent, sent)
    expected = _payload_expected(payload)

    def summarized() -> bool:  # their rollups are written with the last checkpoints
        actual = summary_rows(settings, list(GROUPS))
        if actual != expected:
            wrong = {k: (v, actual.get(k)) for k, v in expected.items() if actual.get(k) != v}
            extra = [k for k in actual if k not in expected]
            raise AssertionError(
                f"usage_summary of {len(payload)} payload records differs: {len(wrong)} rows wrong or "
                f"missing, e.g. {list(wrong.items())[:3]}; {len(extra)} extra, e.g. {extra[:3]}"
            )
        return True

    eventually(summarized, 60, interval=0.5)
    assert sum(1 for k in expected if k[4]) > 100  # many dimension rows, not only totals
    with connect(settings) as client:
        [[events, distinct]] = client.query("SELECT count(), uniqExact(id) FROM threshold_events FINAL").result_rows
    assert events == distinct == 100  # approaching and exceeded once for each of the 50 subjects
    alerts = asyncio.run(read_json(settings.kafka_bootstrap, Topics.of(settings).alerts, 100, timeout=60, settle=2))
    assert len({a["id"] for a in alerts}) == 100  # a replay on the topic could only repeat an id
