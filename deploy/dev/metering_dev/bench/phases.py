"""The benchmark's phases, each against the local stack with topics and tables of its own."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from metering_dev.bench.measure import cpu_seconds, peak_rss_bytes, percentile
from metering_dev.bench.soak_summary import counter
from metering_dev.bench.workload import (
    DIMENSION_METRICS,
    MEAN_QUANTITY,
    METRICS,
    DimensionExpected,
    DimensionWorkload,
    Expected,
    Workload,
)
from metering_dev.worker_process import WorkerProcess, settings_env
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics, ensure_topics, internal_topics, public_topics
from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.migrations import migrate


@dataclass
class Result:
    phase: str
    records: int
    seconds: float
    cpu_seconds: float = 0.0
    peak_rss_mb: float | None = None
    processes: int = 1
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


def isolated(settings: Settings, prefix: str, group: str) -> Settings:
    return settings.model_copy(
        update={"topic_prefix": prefix, "consumer_group_prefix": group, "clickhouse_database": group.replace("-", "_")}
    )


async def prepare_input(
    settings: Settings, workload: Workload | DimensionWorkload, batch: int, thresholds: list[dict] | None = None
) -> Expected | DimensionExpected:
    """Topics, metric definitions (and thresholds), then every record of the workload published."""
    await ensure_topics(settings, public_topics(settings))
    topics = Topics.of(settings)
    expected = workload.expectation()
    producer = AIOKafkaProducer(
        **settings.kafka_client_options(),
        acks="all",
        linger_ms=20,
        max_batch_size=1 << 20,
        compression_type="lz4",
        enable_idempotence=settings.processing_guarantee == "exactly_once",
    )
    await producer.start()
    try:
        for definition in workload.definitions():
            await producer.send_and_wait(topics.metrics, orjson.dumps(definition), key=definition["id"].encode())
        for threshold in thresholds or []:
            await producer.send_and_wait(topics.thresholds, orjson.dumps(threshold), key=threshold["id"].encode())
        for subject in workload.subject_settings() if isinstance(workload, Workload) else []:
            key = f"{subject['subjectType']}:{subject['subjectId']}".encode()
            await producer.send_and_wait(topics.subjects, orjson.dumps(subject), key=key)
        pending = []
        for key, value in workload.messages(batch, expected):  # type: ignore[arg-type]
            pending.append(await producer.send(topics.usage_recorded, value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return expected


async def baseline(settings: Settings, records: int, label: str) -> Result:
    """The floor any Python consumer pays: decode each message, sum quantities per (metric, subject, hour)."""
    consumer = AIOKafkaConsumer(
        Topics.of(settings).usage_recorded,
        **settings.kafka_client_options(),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    sums: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    seen = 0
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        while seen < records:
            for messages in (await consumer.getmany(timeout_ms=500, max_records=50_000)).values():
                for message in messages:
                    document = orjson.loads(message.value)
                    for record in document["records"] if "records" in document else (document,):
                        sums[(record["metricKey"], record["subjectId"], record["timestamp"][:13])] += Decimal(
                            record["quantity"]
                        )
                        seen += 1
    finally:
        await consumer.stop()
    return Result(label, seen, time.perf_counter() - started, time.process_time() - cpu_started)


def summarised_records(settings: Settings) -> int:
    """Records counted so far: the monthly total rows' counts (a grouped metric's dimension rows count them again)."""
    with connect(settings) as client:
        return int(
            client.query(
                "SELECT sum(record_count) FROM usage_summary WHERE period_type = 'MONTHLY' AND empty(dimensions)"
            ).result_rows[0][0]
            or 0
        )


def check_totals(settings: Settings, expected: Expected | DimensionExpected) -> int:
    """Monthly totals in ClickHouse against the independently computed ones; returns the number of mismatches."""
    if isinstance(expected, DimensionExpected):
        return check_dimension_totals(settings, expected)
    aggregation = dict(METRICS)
    with connect(settings) as client:
        rows = client.query(
            "SELECT metric_key, subject_id, total_quantity, record_count FROM usage_summary "
            "WHERE period_type = 'MONTHLY' AND empty(dimensions)"
        ).result_rows
    actual = {(metric, subject): (Decimal(total), count) for metric, subject, total, count in rows}
    wanted = {key: (expected.total(key[0], key[1], aggregation[key[0]]), expected.count[key]) for key in expected.count}
    return sum(1 for key in wanted.keys() | actual.keys() if wanted.get(key) != actual.get(key))


def check_dimension_totals(settings: Settings, expected: DimensionExpected) -> int:
    """The dimensions phase: every monthly row (total rows and the grouped metric's row per combination) and the
    UNIQUE_COUNT metric's hourly and daily total rows, against the ones computed from the records; returns the
    number of rows that differ (missing or extra rows included)."""
    with connect(settings) as client:
        monthly = client.query(
            "SELECT metric_key, subject_id, dimensions, total_quantity, record_count "
            "FROM usage_summary WHERE period_type = 'MONTHLY' AND time_zone = 'UTC'"
        ).result_rows
        periods = client.query(
            "SELECT metric_key, subject_id, toString(period_type), toUnixTimestamp(period_start), "
            "total_quantity, record_count FROM usage_summary "
            "WHERE period_type IN ('HOURLY', 'DAILY') AND empty(dimensions) AND time_zone = 'UTC' "
            "AND metric_key = {metric:String}",
            parameters={"metric": DIMENSION_METRICS[1]["key"]},
        ).result_rows
    actual: dict[tuple, tuple[Decimal, int]] = {
        (metric, subject, tuple(sorted(dimensions.items()))): (Decimal(total), count)
        for metric, subject, dimensions, total, count in monthly
    }
    actual.update(
        {
            (metric, subject, period, int(start)): (Decimal(total), count)
            for metric, subject, period, start, total, count in periods
        }
    )
    wanted: dict[tuple, tuple[Decimal, int]] = {**expected.monthly, **expected.periods}
    return sum(1 for key in wanted.keys() | actual.keys() if wanted.get(key) != actual.get(key))


def run_workers(
    settings: Settings, processes: int, records: int, log_dir: Path, label: str, timeout: float = 1800
) -> tuple[Result, list[WorkerProcess]]:
    """Start `processes` workers on the prepared input; time until usage_summary reflects every record."""
    migrate(settings)
    asyncio.run(ensure_topics(settings, internal_topics(settings)))
    env = settings_env(settings)
    started = time.perf_counter()
    workers = [WorkerProcess(env, log_dir / f"{label}-{n}.log").start() for n in range(processes)]
    deadline = time.monotonic() + timeout
    done = 0
    try:
        while done < records:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{label}: {done} of {records} records reached usage_summary in {timeout:.0f} s")
            for worker in workers:
                if worker.process is not None and worker.process.poll() is not None:
                    raise RuntimeError(f"{label}: a worker exited:\n{worker.log_tail()}")
            time.sleep(0.25)
            done = summarised_records(settings)
    except BaseException:
        stop_all(workers)
        raise
    elapsed = time.perf_counter() - started
    pids = [w.process.pid for w in workers if w.process is not None]
    result = Result(
        label,
        records,
        elapsed,
        sum(cpu_seconds(p) for p in pids),
        max(peak_rss_bytes(p) for p in pids) / 2**20,
        processes,
    )
    return result, workers


def stop_all(workers: list[WorkerProcess]) -> None:
    for worker in workers:
        worker.stop()


STEADY_PHASE = "worker ×1, steady load at 50 %"
THRESHOLD_METRIC = "bench_tokens"
WARM_UP_SECONDS = 10.0  # every key's hour, day and month are opened by then; CPU is counted from here


@dataclass(frozen=True)
class SteadyLoad:
    """What the steady phase publishes: the throughput phases' mix (subjects × 5 metrics, single-record messages,
    stamped now rather than hours ago) at `rate`, with thresholds on the first `alerting` subjects' tokens set to
    trip about halfway through."""

    rate: float
    seconds: float
    subjects: int
    alerting: int
    zoned_share: float = 0.0

    def limit(self) -> Decimal:
        """Half of a subject's expected tokens total over the phase."""
        per_subject = self.rate * (self.seconds + WARM_UP_SECONDS) / (self.subjects * len(METRICS))
        return max(Decimal(1), (Decimal(per_subject) * MEAN_QUANTITY / 2).to_integral_value())

    def thresholds(self) -> list[dict]:
        return [
            {
                "id": f"steady-{n}",
                "metricKey": THRESHOLD_METRIC,
                "subjectType": "org",
                "subjectId": f"s{n}",
                "threshold": str(self.limit()),
                "action": "ALERT",
                "notifyEmails": [],
            }
            for n in range(min(self.alerting, self.subjects))
        ]


async def steady_load(settings: Settings, load: SteadyLoad, backlog_us: float | None, log_dir: Path) -> Result:
    """One worker fed at a fixed rate below its capacity, the normal state of a metering pipeline: CPU per record
    (against `backlog_us`, the same worker's cost catching up on a backlog), time from a crossing record's send to
    its alert, and how far `usage_summary` trails what was sent."""
    workload = Workload.recent(0, load.subjects, zoned_share=load.zoned_share)
    await prepare_input(settings, workload, 1, load.thresholds())
    migrate(settings)
    await ensure_topics(settings, internal_topics(settings))
    worker = WorkerProcess(settings_env(settings), log_dir / "steady.log").start()
    await asyncio.to_thread(worker.wait_healthy)
    await asyncio.sleep(5)  # the groups settle before the clock starts
    pid = worker.process.pid if worker.process is not None else 0
    topics = Topics.of(settings)
    limit = load.limit()
    alerting = {threshold["subjectId"] for threshold in load.thresholds()}
    crossing_sent: dict[tuple[str, str], float] = {}
    received: dict[tuple[str, str], float] = {}
    sent_at: list[tuple[float, int]] = []
    visible_at: list[tuple[float, int]] = []

    async def watch_freshness(stop: asyncio.Event) -> None:
        while not stop.is_set():
            count = await asyncio.to_thread(summarised_records, settings)
            visible_at.append((time.perf_counter(), count))
            await asyncio.sleep(0.2)

    stop = asyncio.Event()
    readers = [
        asyncio.create_task(read_alerts(settings, received, stop)),
        asyncio.create_task(watch_freshness(stop)),
    ]
    producer = AIOKafkaProducer(**settings.kafka_client_options(), acks="all", linger_ms=1, max_batch_size=1 << 20)
    await producer.start()
    # The load comes in record batches built here (one send per partition per tick): `send()` per record costs the
    # generator more CPU than the worker spends on the record, on the two cores they share.
    partitions = sorted(await producer.partitions_for(topics.usage_recorded))
    partition_of = DefaultPartitioner()
    totals: dict[str, Decimal] = defaultdict(Decimal)
    sent = 0
    window: tuple[float, int] | None = None  # (worker CPU s, records counted) when the warm-up ended
    cpu_used = 0.0
    started = time.perf_counter()
    try:
        while (elapsed := time.perf_counter() - started) < load.seconds + WARM_UP_SECONDS:
            if window is None and elapsed >= WARM_UP_SECONDS:
                window = (cpu_seconds(pid), await asyncio.to_thread(_counted, worker))
            due = int(elapsed * load.rate) - sent
            batches: dict[int, object] = {}
            crossed: list[tuple[str, str]] = []
            for _ in range(max(0, due)):
                metric, subject, quantity, record = workload.record(sent)
                del record["timestamp"]  # now: records arrive as they happen
                key = f"org:{subject}".encode()
                partition = partition_of(key, partitions, partitions)
                value = orjson.dumps(record)
                batch = batches.get(partition) or batches.setdefault(partition, producer.create_batch())
                if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start another
                    batch.close()
                    await producer.send_batch(batch, topics.usage_recorded, partition=partition)
                    batch = batches[partition] = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
                if metric == THRESHOLD_METRIC and subject in alerting:
                    before, totals[subject] = totals[subject], totals[subject] + quantity
                    if before < limit * Decimal("0.8") <= totals[subject]:
                        crossed.append((subject, "threshold.approaching"))
                    if before <= limit < totals[subject]:
                        crossed.append((subject, "threshold.exceeded"))
                sent += 1
            for partition, batch in batches.items():
                batch.close()
                await producer.send_batch(batch, topics.usage_recorded, partition=partition)
            now = time.perf_counter()
            crossing_sent.update((crossing, now) for crossing in crossed)
            sent_at.append((now, sent))
            await asyncio.sleep(0.002)
        await producer.flush()
        deadline = time.perf_counter() + 60
        while visible_at[-1][1] < sent and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        cpu_used = cpu_seconds(pid)
        while set(crossing_sent) - set(received) and time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)
    finally:
        stop.set()
        await asyncio.gather(*readers, return_exceptions=True)
        await producer.stop()
        await asyncio.to_thread(worker.stop)
    if window is None or visible_at[-1][1] < sent:
        raise RuntimeError(f"steady load: {visible_at[-1][1] if visible_at else 0} of {sent} records summarised")
    counted = sent - window[1]
    latencies = [received[key] - at for key, at in crossing_sent.items() if key in received]
    freshness = _freshness(sent_at, visible_at)
    cpu_us = (cpu_used - window[0]) / counted * 1e6
    return Result(
        STEADY_PHASE,
        counted,
        load.seconds,
        cpu_used - window[0],
        extra={
            "rate": load.rate,
            "cpu_us_per_record": cpu_us,
            "backlog_cpu_us_per_record": backlog_us or 0.0,
            "cpu_vs_backlog": cpu_us / backlog_us if backlog_us else 0.0,
            "alerts_expected": len(crossing_sent),
            "alerts_received": len(latencies),
            "latency_p50_s": percentile(latencies, 0.5),
            "latency_p99_s": percentile(latencies, 0.99),
            "freshness_p50_s": percentile(freshness, 0.5),
            "freshness_p99_s": percentile(freshness, 0.99),
        },
    )


def _counted(worker: WorkerProcess) -> int:
    """Records the worker has counted so far, from its /metrics."""
    return counter(worker.metrics(), "metering_records_counted_total")


def _freshness(sent_at: list[tuple[float, int]], visible_at: list[tuple[float, int]]) -> list[float]:
    """For each time ClickHouse showed n records: how long ago the n-th record had been sent."""
    lags = []
    cursor = 0
    for seen_time, count in visible_at:
        while cursor < len(sent_at) and sent_at[cursor][1] < count:
            cursor += 1
        if count and cursor < len(sent_at):
            lags.append(max(0.0, seen_time - sent_at[cursor][0]))
    return lags


async def read_alerts(settings: Settings, received: dict[tuple[str, str], float], stop: asyncio.Event) -> None:
    """When each (subject, alert type) first reached metering.alerts (perf_counter), until `stop`."""
    consumer = AIOKafkaConsumer(
        Topics.of(settings).alerts,
        **settings.kafka_client_options(),
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        while not stop.is_set():
            for messages in (await consumer.getmany(timeout_ms=50)).values():
                now = time.perf_counter()
                for message in messages:
                    alert = orjson.loads(message.value)
                    received.setdefault((alert["subjectId"], alert["type"]), now)
    finally:
        await consumer.stop()
