"""`metering bench --soak`: one worker under steady load for a long while, watched as it runs.

Throughput phases end before slow problems show; a soak holds a fixed rate (half the measured
capacity by default) for tens of minutes and samples the worker every few seconds: RSS (a leak
shows as a slope once the worker is warm), consumer lag of both stages (a backlog that keeps
growing), records/s counted and error lines in its log. Afterwards the lag must drain and the
ClickHouse totals must equal the independently computed ones, exactly as in the throughput phases.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from metering_dev.bench import phases
from metering_dev.bench.measure import rss_bytes
from metering_dev.bench.soak_summary import (
    Sample,
    count_error_lines,
    counter,
    is_error_line,
    lag_by_stage,
    samples_csv,
    summarise,
    warmup_seconds,
)
from metering_dev.bench.workload import MEAN_QUANTITY, Expected, Workload
from metering_dev.worker_process import WorkerProcess, settings_env
from metering_pipeline import tables
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics, ensure_topics, internal_topics
from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.migrations import migrate


@dataclass(frozen=True)
class SoakPlan:
    minutes: float = 30.0
    rate: float | None = None  # records/s; None: half the capacity measured first
    subjects: int = 2_000
    dedup_window: timedelta | None = None  # None: a quarter of the soak (see `effective_dedup_window`)
    sample_every_s: float = 5.0
    progress_every_s: float = 60.0
    capacity_records: int = 60_000
    drain_timeout_s: float = 600.0

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    def effective_dedup_window(self) -> timedelta:
        """With the worker's 24 h default every record's identity stays in memory for the whole soak,
        so RSS would grow by design and hide a leak. A quarter of the soak lets the window fill and
        start expiring before the second half, whose slope is the verdict."""
        return self.dedup_window or timedelta(seconds=max(60.0, self.seconds / 4))


@dataclass
class SoakOutcome:
    rate: float
    published: int = 0
    samples: list[Sample] = field(default_factory=list)
    expected: Expected = field(default_factory=Expected)
    drained: bool = False
    drain_seconds: float | None = None
    mismatches: int | None = None
    alerts_emitted: int = 0
    alerts_expected: int = 0
    error_lines: int = 0
    failure: str | None = None
    log_path: str = ""
    lag_source: str = ""


def soak_thresholds(plan: SoakPlan, rate: float) -> list[dict]:
    """Wildcard thresholds on one metric at 1/4, 1/2 and 3/4 of the total a subject is expected to
    reach, so every subject crosses approaching and exceeded alerts spread over the whole run."""
    records = int(rate * plan.seconds)
    final = Decimal(records) / 5 / plan.subjects * MEAN_QUANTITY  # five metrics take turns (see Workload.record)
    limits = [(final * share).quantize(Decimal(1)) for share in (Decimal("0.25"), Decimal("0.5"), Decimal("0.75"))]
    return [
        {
            "id": f"soak-{n}",
            "metricKey": phases.THRESHOLD_METRIC,
            "subjectType": "org",
            "subjectId": "*",
            "threshold": str(max(limit, Decimal(1))),
            "action": "ALERT",
            "notifyEmails": [],
        }
        for n, limit in enumerate(limits)
    ]


def expected_alerts(expected: Expected, thresholds: list[dict], fraction: Decimal) -> int:
    """Alerts the published records must cause: per subject and threshold, approaching at
    `fraction` × limit and exceeded above it, once each in the (monthly) window."""
    alerts = 0
    for (metric, _subject), total in expected.sum.items():
        if metric != phases.THRESHOLD_METRIC:
            continue
        for threshold in thresholds:
            limit = Decimal(threshold["threshold"])
            alerts += (total >= limit * fraction) + (total > limit)
    return alerts


def run_soak(
    settings: Settings, plan: SoakPlan, log_dir: Path, say: Callable[[str], None]
) -> tuple[dict, list[Sample]]:
    """Capacity (unless given), then the soak on topics and a database of its own, dropped afterwards."""
    run_id = f"soak{int(time.time())}"
    log_dir.mkdir(parents=True, exist_ok=True)
    databases: list[str] = []
    capacity = None
    try:
        rate = plan.rate
        if rate is None:
            capacity = measure_capacity(settings, plan, run_id, log_dir, databases, say)
            rate = capacity * 0.5
        soak_settings = phases.isolated(settings, f"{run_id}-soak.", f"{run_id}-soak")
        databases.append(soak_settings.clickhouse_database)
        say(
            f"soak: {rate:,.0f} records/s for {plan.minutes:g} min, 1 worker, {plan.subjects:,} subjects, "
            f"dedup window {plan.effective_dedup_window()} ..."
        )
        outcome = asyncio.run(_soak(soak_settings, plan, rate, log_dir / f"{run_id}-soak.log", say))
    finally:
        with connect(settings, database="default") as admin:
            for database in databases:
                admin.command(f"DROP DATABASE IF EXISTS `{database}`")
    return report(plan, outcome, capacity), outcome.samples


def measure_capacity(
    settings: Settings, plan: SoakPlan, run_id: str, log_dir: Path, databases: list[str], say: Callable[[str], None]
) -> float:
    """Records/s of one worker on single-record messages, measured like the throughput phase (start to all
    summarised)."""
    isolated = phases.isolated(settings, f"{run_id}-capacity.", f"{run_id}-capacity")
    databases.append(isolated.clickhouse_database)
    say(f"capacity: 1 worker on {plan.capacity_records:,} single-record messages ...")
    expected = asyncio.run(phases.prepare_input(isolated, Workload.recent(plan.capacity_records, plan.subjects), 1))
    result, started = phases.run_workers(isolated, 1, plan.capacity_records, log_dir, f"{run_id}-capacity")
    phases.stop_all(started)
    mismatches = phases.check_totals(isolated, expected)
    say(f"  {result.rate:,.0f} records/s" + ("" if mismatches == 0 else f" ({mismatches} totals wrong)"))
    return result.rate


class LogScanner:
    """Counts error lines in a growing log file, reading only what was appended since the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = ""
        self.errors = 0

    def scan(self) -> int:
        try:
            with self.path.open("r", errors="replace") as log:
                log.seek(self.offset)
                text = log.read()
                self.offset = log.tell()
        except FileNotFoundError:
            return self.errors
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()  # a line still being written
        self.errors += count_error_lines(lines)
        return self.errors

    def finish(self) -> int:
        self.scan()
        if self.partial:
            self.errors += is_error_line(self.partial)
            self.partial = ""
        return self.errors


class Watcher:
    """Takes the samples: RSS from /proc, lag from Kafka (committed group offsets against end
    offsets, which stay true even if the worker hangs), counters from the worker's /metrics."""

    def __init__(self, settings: Settings, worker: WorkerProcess, started: float) -> None:
        self.settings = settings
        self.worker = worker
        self.started = started
        self.topics = Topics.of(settings)
        self.logs = LogScanner(worker.log_path)
        self.admin = AIOKafkaAdminClient(**settings.kafka_client_options())
        self.offsets = AIOKafkaConsumer(
            **settings.kafka_client_options(), group_id=None, isolation_level="read_committed"
        )
        self.samples: list[Sample] = []
        self.metrics_text = ""
        self.metrics_lag_samples = 0  # samples whose lag came from /metrics because Kafka did not answer
        self.partitions: dict[str, list[TopicPartition]] = {}

    async def start(self) -> None:
        await self.admin.start()
        await self.offsets.start()

    async def stop(self) -> None:
        await self.offsets.stop()
        await self.admin.close()

    async def _partitions(self, topic: str) -> list[TopicPartition]:
        """Asked once: the soak's topics keep their partition count. Raises rather than measure no partitions as
        no lag."""
        if topic not in self.partitions:
            described = await self.admin.describe_topics([topic])
            numbers = sorted(p["partition"] for d in described if d["topic"] == topic for p in d["partitions"])
            if not numbers:
                raise LookupError(f"no partitions found for {topic}")
            self.partitions[topic] = [TopicPartition(topic, n) for n in numbers]
        return self.partitions[topic]

    async def _group_lag(self, group: str, topic: str) -> int:
        partitions = await self._partitions(topic)
        ends = await self.offsets.end_offsets(partitions)
        committed = await self.admin.list_consumer_group_offsets(group, partitions=partitions)
        lag = 0
        for tp in partitions:
            done = committed.get(tp)
            lag += max(0, ends[tp] - (done.offset if done is not None and done.offset >= 0 else 0))
        return lag

    async def sample(self, phase: str, published: int) -> Sample:
        now = time.perf_counter() - self.started
        pid = self.worker.process.pid if self.worker.process else 0
        try:
            self.metrics_text = await asyncio.to_thread(self.worker.metrics)
        except OSError:
            pass  # keep the last counters: a busy worker may answer late
        prefix = self.settings.consumer_group_prefix
        try:
            router = await self._group_lag(f"{prefix}-router", self.topics.usage_recorded)
            rollups = await self._group_lag(f"{prefix}-rollups", self.topics.routed)
        except Exception:  # noqa: BLE001 - a broker without group offsets (or a hiccup): the worker's own view
            self.metrics_lag_samples += 1
            stages = lag_by_stage(self.metrics_text)
            router, rollups = stages.get("router", 0), stages.get("rollups", 0)
        counted = counter(self.metrics_text, "metering_records_counted_total")
        previous = self.samples[-1] if self.samples else None
        elapsed = now - previous.t_s if previous else now
        rate = (counted - previous.counted) / elapsed if previous and elapsed > 0 else 0.0
        sample = Sample(
            now,
            phase,
            rss_bytes(pid) / 2**20 if pid else 0.0,
            router,
            rollups,
            published,
            counted,
            rate,
            counter(self.metrics_text, "metering_alerts_total"),
            self.logs.scan(),
        )
        self.samples.append(sample)
        return sample

    @property
    def lag_source(self) -> str:
        source = "committed group offsets vs end offsets"
        if self.metrics_lag_samples:
            source += f"; worker /metrics in {self.metrics_lag_samples} of {len(self.samples)} samples"
        return source

    def worker_exit(self) -> int | None:
        return self.worker.process.poll() if self.worker.process else None


async def _soak(
    settings: Settings, plan: SoakPlan, rate: float, log_path: Path, say: Callable[[str], None]
) -> SoakOutcome:
    outcome = SoakOutcome(rate=rate, log_path=str(log_path))
    thresholds = soak_thresholds(plan, rate)
    await phases.prepare_input(settings, Workload.recent(0, 1), 1, thresholds)  # metric definitions and thresholds
    migrate(settings)
    await ensure_topics(settings, internal_topics(settings))
    env = settings_env(settings) | {"METERING_DEDUP_WINDOW": f"PT{plan.effective_dedup_window().total_seconds():.0f}S"}
    worker = WorkerProcess(env, log_path).start()
    total = int(rate * plan.seconds)
    workload = Workload.recent(total, plan.subjects, seed=3)
    topic = Topics.of(settings).usage_recorded
    producer = AIOKafkaProducer(
        **settings.kafka_client_options(),
        acks="all",
        linger_ms=5,
        compression_type="lz4",
        enable_idempotence=settings.processing_guarantee == "exactly_once",
    )
    watcher: Watcher | None = None
    try:
        await asyncio.to_thread(worker.wait_healthy)
        await producer.start()
        started = time.perf_counter()
        watcher = Watcher(settings, worker, started)
        await watcher.start()
        stop = asyncio.Event()

        async def watch() -> None:
            next_progress = plan.progress_every_s
            while not stop.is_set():
                try:
                    sample = await watcher.sample("soak", outcome.published)
                except Exception as error:  # noqa: BLE001 - end the soak, keep what was sampled
                    outcome.failure = f"sampling failed: {error!r}"
                    stop.set()
                    return
                if (code := watcher.worker_exit()) is not None:
                    outcome.failure = f"the worker exited with code {code} after {sample.t_s:.0f} s"
                    stop.set()
                    return
                if sample.t_s >= next_progress:
                    next_progress += plan.progress_every_s
                    say(_progress(watcher.samples, plan, rate))
                try:
                    await asyncio.wait_for(stop.wait(), plan.sample_every_s)
                except TimeoutError:
                    pass

        watching = asyncio.create_task(watch())
        try:
            outcome.published = await _publish(producer, topic, workload, total, rate, started, stop, outcome)
            await producer.flush()
        except Exception as error:  # noqa: BLE001 - a failed send: report what was sampled, skip the totals
            outcome.failure = f"publishing failed after {outcome.published:,} records: {error!r}"
        finally:
            stop.set()
            await watching

        if outcome.failure is None:
            drain_started = time.perf_counter()
            deadline = drain_started + plan.drain_timeout_s
            while time.perf_counter() < deadline:
                sample = await watcher.sample("drain", outcome.published)
                if (code := watcher.worker_exit()) is not None:
                    outcome.failure = f"the worker exited with code {code} while draining"
                    break
                summarised = await asyncio.to_thread(phases.summarised_records, settings)
                if summarised >= outcome.published and sample.router_lag == 0 and sample.rollups_lag == 0:
                    outcome.drained = True
                    outcome.drain_seconds = time.perf_counter() - drain_started
                    break
                await asyncio.sleep(min(plan.sample_every_s, 2.0))
            if not outcome.drained and outcome.failure is None:
                outcome.failure = (
                    f"not drained within {plan.drain_timeout_s:.0f} s: usage_summary holds {summarised:,} "
                    f"of {outcome.published:,} records, lag router {sample.router_lag:,} "
                    f"rollups {sample.rollups_lag:,}"
                )
            outcome.mismatches = await asyncio.to_thread(phases.check_totals, settings, outcome.expected)
        outcome.alerts_emitted = counter(watcher.metrics_text, "metering_alerts_total")
        outcome.alerts_expected = expected_alerts(outcome.expected, thresholds, settings.threshold_approaching_fraction)
    finally:
        await producer.stop()
        await asyncio.to_thread(worker.stop)
        if watcher is not None:
            await watcher.stop()
            outcome.samples = watcher.samples
            outcome.lag_source = watcher.lag_source
            outcome.error_lines = watcher.logs.finish()  # shutdown included
    return outcome


async def _publish(
    producer: AIOKafkaProducer,
    topic: str,
    workload: Workload,
    total: int,
    rate: float,
    started: float,
    stop: asyncio.Event,
    outcome: SoakOutcome,
) -> int:
    """Paced by the clock: every 10 ms, the records due by now (`rate` × elapsed) are sent, so the broker
    sees a steady stream rather than a burst a second; a producer that falls behind catches up."""
    sent = 0
    pending: list[asyncio.Future] = []
    while sent < total and not stop.is_set():
        due = min(total, int((time.perf_counter() - started) * rate)) - sent
        for _ in range(max(0, due)):
            metric, subject, quantity, record = workload.record(sent)
            pending.append(await producer.send(topic, orjson.dumps(record), key=f"org:{subject}".encode()))
            outcome.expected.add(metric, subject, quantity)
            sent += 1
            outcome.published = sent
        still = []
        for future in pending:
            if future.done():
                future.result()  # a failed send ends the soak: the totals could not match
            else:
                still.append(future)
        pending = still
        await asyncio.sleep(0.01)
    await asyncio.gather(*pending)
    return sent


def _progress(samples: list[Sample], plan: SoakPlan, rate: float) -> str:
    last = samples[-1]
    window = [s for s in samples if s.t_s >= last.t_s - plan.progress_every_s]
    first = window[0]
    span = last.t_s - first.t_s
    published = (last.published - first.published) / span if span > 0 else 0.0
    counted = (last.counted - first.counted) / span if span > 0 else 0.0
    return (
        f"  {last.t_s / 60:4.1f}/{plan.minutes:g} min: published {published:,.0f}/s (target {rate:,.0f}), "
        f"counted {counted:,.0f}/s, RSS {last.rss_mb:,.0f} MB, lag router {last.router_lag:,} "
        f"rollups {last.rollups_lag:,}, error lines {last.error_lines}"
    )


def report(plan: SoakPlan, outcome: SoakOutcome, capacity: float | None) -> dict:
    summary = summarise(outcome.samples, plan.seconds) if outcome.samples else None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "plan": {
            "minutes": plan.minutes,
            "rate": outcome.rate,
            "capacity_measured": capacity,
            "rate_source": "--soak-rate" if capacity is None else "half the measured capacity",
            "subjects": plan.subjects,
            "dedup_window_s": plan.effective_dedup_window().total_seconds(),
            "sample_every_s": plan.sample_every_s,
            "warmup_s": warmup_seconds(plan.seconds),
        },
        "published": outcome.published,
        "summary": asdict(summary) if summary else None,
        "drained": outcome.drained,
        "drain_seconds": outcome.drain_seconds,
        "total_mismatches": outcome.mismatches,
        "totals_exact": outcome.mismatches == 0,
        "alerts_emitted": outcome.alerts_emitted,
        "alerts_expected": outcome.alerts_expected,
        "error_lines": outcome.error_lines,
        "lag_source": outcome.lag_source,
        "failure": outcome.failure,
        "worker_log": outcome.log_path,
    }


def render(result: dict) -> str:
    """The soak's report as a two-column table people can read at the end of a long run."""
    s = result["summary"]
    plan = result["plan"]
    rows: list[tuple[str, str]] = [
        (
            "rate",
            f"{plan['rate']:,.0f} records/s ({plan['rate_source']}"
            + (f": {plan['capacity_measured']:,.0f}" if plan["capacity_measured"] else "")
            + ")",
        ),
        (
            "duration",
            f"{plan['minutes']:g} min, {result['published']:,} records published, "
            f"warm-up {plan['warmup_s']:.0f} s, dedup window {plan['dedup_window_s']:.0f} s",
        ),
    ]
    if s:
        slope = s["rss_slope_mb_per_10_min"]
        rows += [
            ("counted", f"{s['counted_per_s_mean']:,.0f} records/s (mean after warm-up)"),
            (
                "RSS MB start / middle / end / max",
                f"{s['rss_start_mb']:,.0f} / {s['rss_middle_mb']:,.0f} / "
                f"{s['rss_end_mb']:,.0f} / {s['rss_max_mb']:,.0f}",
            ),
            (
                "RSS slope, second half",
                ("n/a" if slope is None else f"{slope:+,.1f} MB per 10 min") + f" ({s['rss_verdict']})",
            ),
            (
                "router lag p50 / p99 / max",
                f"{s['router_lag_p50']:,.0f} / {s['router_lag_p99']:,.0f} / {s['router_lag_max']:,}",
            ),
            (
                "rollups lag p50 / p99 / max",
                f"{s['rollups_lag_p50']:,.0f} / {s['rollups_lag_p99']:,.0f} / {s['rollups_lag_max']:,}",
            ),
            ("lag measured as", f"messages, {result['lag_source']}"),
        ]
    drain = result["drain_seconds"]
    mismatches = result["total_mismatches"]
    rows += [
        ("lag drained", f"yes, {drain:.0f} s after publishing stopped" if result["drained"] else "no"),
        ("alerts emitted / expected", f"{result['alerts_emitted']:,} / {result['alerts_expected']:,}"),
        ("error log lines", f"{result['error_lines']:,}"),
        (
            "totals exact",
            "not checked" if mismatches is None else "yes" if mismatches == 0 else f"no ({mismatches:,} wrong)",
        ),
    ]
    if result["failure"]:
        rows.append(("failure", result["failure"]))
    table = tables.render(["soak", "value"], rows)
    return table + f"\n{result['machine']['cores']} cores, Python {result['machine']['python']}, {result['date']}"


def write_outputs(result: dict, samples: list[Sample], output: Path) -> dict[str, Path]:
    """bench-soak.json, .csv and .png beside the run's --output (bench.json -> bench-soak.*)."""
    from metering_dev.bench.chart import render_soak_chart

    output.parent.mkdir(parents=True, exist_ok=True)
    paths = {ext: output.with_name(f"{output.stem}-soak.{ext}") for ext in ("json", "csv", "png")}
    result = result | {"files": {ext: str(path) for ext, path in paths.items()}}
    paths["json"].write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    paths["csv"].write_text(samples_csv(samples))
    if samples:
        plan = result["plan"]
        render_soak_chart(
            samples,
            paths["png"],
            f"metering bench --soak: {plan['rate']:,.0f} records/s, {plan['minutes']:g} min, 1 worker",
            plan["warmup_s"],
        )
    else:
        del paths["png"]
    return paths
