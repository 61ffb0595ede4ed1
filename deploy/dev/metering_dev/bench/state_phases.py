"""The bench's state phases (issue 25), each against the local stack with topics and tables of its own.

`history`: one worker counts records spread over 30 days of event time; its RSS is sampled after the first records
and at the end (bytes of RAM per record of history), then it is SIGKILLed and a new worker on the same state dir
counts a new record (restart to count), and a worker on a fresh, empty state dir restores from the changelog (restore
rate). `rebalance`: millions of dedup identities in one partition's changelog, a second worker joins the first, and
threshold alerts of the other partitions are timed while the partition is restored; evictions are looked for in the
consumer groups and the workers' logs.
"""

from __future__ import annotations

import asyncio
import http.client
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DescribeGroupsRequest, DescribeGroupsRequest_v2, DescribeGroupsRequestStruct
from aiokafka.structs import TopicPartition

from metering_dev.bench import phases
from metering_dev.bench.measure import cpu_seconds, peak_rss_bytes, percentile, rss_bytes
from metering_dev.bench.phases import Result
from metering_dev.bench.workload import Workload, as_messages
from metering_dev.worker_process import WorkerProcess, settings_env
from metering_pipeline import tables
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics, ensure_topics, internal_topics
from metering_pipeline.warehouse.client import connect
from metering_pipeline.warehouse.migrations import migrate
from metering_pipeline.worker.changelog import identities_entries
from metering_pipeline.worker.routing import subject_partition

HISTORY_PHASE = "history: worker ×1, 30 days of event time"
REBALANCE_PHASE = "rebalance: a 2nd worker joins, dedup identities in one partition's changelog"

# What the worker exposes on /metrics. The two state metrics come with the on-disk store (issue 25); without them the
# restore is timed to the first count instead.
COUNTED = "metering_records_counted"
DUPLICATES = "metering_records_duplicate"
RESTORED_ENTRIES = "metering_state_restored_entries"  # counter: changelog entries replayed into the store
RESTORING_PARTITIONS = "metering_state_restoring_partitions"  # gauge: assigned partitions not restored yet

HISTORY_METRICS = ("bench_tokens", "bench_bytes")  # both SUM
HISTORY_DAYS = 30
DEDUP_WINDOW = "PT24H"
# The history workers join as one static member: a restarted worker takes its partitions back at once instead of
# after the killed one's Kafka session timeout, so "restart to count" measures the worker, not the session timeout.
HISTORY_INSTANCE_ID = "bench-history"


# --- /metrics ---------------------------------------------------------------------------------------------------


def metric(text: str, name: str) -> float | None:
    """A metric's value in Prometheus text: a counter is found under `name` or `name_total`, labelled samples are
    summed; None when the worker does not expose it."""
    found = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample.split("{", 1)[0] in (name, name + "_total"):
            found = (found or 0.0) + float(value)
    return found


def scrape(worker: WorkerProcess) -> str | None:
    """The worker's /metrics, or None while it does not answer (starting, or its event loop busy)."""
    try:
        return worker.metrics()
    except (OSError, http.client.HTTPException):
        return None


def healthy(worker: WorkerProcess) -> bool:
    try:
        return worker.health()[0] == 200
    except (OSError, http.client.HTTPException, ValueError):
        return False


def _check_alive(*workers: WorkerProcess) -> None:
    for worker in workers:
        if worker.process is not None and worker.process.poll() is not None:
            raise RuntimeError(f"a worker exited; its log ends with:\n{worker.log_tail()}")


# --- the history workload ---------------------------------------------------------------------------------------


@dataclass
class MonthlyExpected:
    """Per (metric, subject, month start in epoch seconds): the monthly total and record count the pipeline must
    reach. Records over 30 days fall in two calendar months, which `phases.check_totals` (one row per metric and
    subject) does not tell apart."""

    rows: dict[tuple[str, str, int], tuple[Decimal, int]] = field(default_factory=dict)

    def add(self, metric_key: str, subject: str, at: datetime, quantity: Decimal) -> None:
        month = int(at.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())
        total, count = self.rows.get((metric_key, subject, month), (Decimal(0), 0))
        self.rows[(metric_key, subject, month)] = (total + quantity, count + 1)

    def records(self) -> int:
        return sum(count for _, count in self.rows.values())


@dataclass(frozen=True)
class HistoryWorkload:
    """`records` records of two SUM metrics over `subjects` subjects, with timestamps spread uniformly (whole
    seconds, a seeded generator) over the `days` before `start`: most records open an hourly rollup of their own."""

    records: int
    subjects: int
    start: datetime
    days: int = HISTORY_DAYS
    seed: int = 5

    @classmethod
    def recent(cls, records: int, subjects: int) -> HistoryWorkload:
        return cls(records, subjects, datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1))

    @staticmethod
    def definitions() -> tuple[dict, ...]:
        return tuple(
            {"id": key, "key": key, "name": key, "aggregationType": "SUM", "resetPeriod": "MONTHLY"}
            for key in HISTORY_METRICS
        )

    @staticmethod
    def expectation() -> MonthlyExpected:
        return MonthlyExpected()

    def record(self, n: int, at: datetime) -> tuple[str, str, Decimal, dict]:
        metric_key = HISTORY_METRICS[n % len(HISTORY_METRICS)]
        subject = f"s{(n // len(HISTORY_METRICS)) % self.subjects}"
        quantity = Decimal((n * 7919 + self.seed) % 100_000) / 100
        return (
            metric_key,
            subject,
            quantity,
            {
                "id": f"h{self.seed}-{n}",
                "metricKey": metric_key,
                "subjectType": "org",
                "subjectId": subject,
                "quantity": str(quantity),
                "timestamp": at.isoformat(),
            },
        )

    def timed_records(self) -> Iterator[tuple[datetime, tuple[str, str, Decimal, dict]]]:
        rng = random.Random(self.seed)
        span = self.days * 86_400
        for n in range(self.records):
            at = self.start - timedelta(seconds=rng.randrange(span))
            yield at, self.record(n, at)

    def messages(self, batch: int, expected: MonthlyExpected | None = None) -> Iterator[tuple[bytes | None, bytes]]:
        def records() -> Iterator[tuple[str, dict]]:
            for at, (metric_key, subject, quantity, record) in self.timed_records():
                if expected is not None:
                    expected.add(metric_key, subject, at, quantity)
                yield subject, record

        return as_messages(records(), batch)

    def old_message(self, n: int) -> tuple[bytes, bytes]:
        """Record `n` again, as published (a duplicate the worker must refuse within the dedup window)."""
        for index, (_, (_, subject, _, record)) in enumerate(self.timed_records()):
            if index == n:
                return f"org:{subject}".encode(), orjson.dumps(record)
        raise IndexError(n)

    def new_message(self, name: str, expected: MonthlyExpected) -> tuple[bytes, bytes]:
        """A record not in the workload, timestamped now (and added to `expected`)."""
        at = datetime.now(UTC).replace(microsecond=0)
        metric_key, subject, quantity = HISTORY_METRICS[0], "s0", Decimal("1.25")
        expected.add(metric_key, subject, at, quantity)
        record = {
            "id": name,
            "metricKey": metric_key,
            "subjectType": "org",
            "subjectId": subject,
            "quantity": str(quantity),
            "timestamp": at.isoformat(),
        }
        return f"org:{subject}".encode(), orjson.dumps(record)


def check_monthly_totals(settings: Settings, expected: MonthlyExpected) -> int:
    """Monthly totals and counts in ClickHouse against the workload's, per calendar month; returns the mismatches."""
    with connect(settings) as client:
        rows = client.query(
            "SELECT metric_key, subject_id, toUnixTimestamp(period_start), total_quantity, record_count "
            "FROM usage_summary WHERE period_type = 'MONTHLY' AND empty(dimensions) AND time_zone = 'UTC'"
        ).result_rows
    actual = {(m, s, int(start)): (Decimal(total), count) for m, s, start, total, count in rows}
    return sum(1 for key in expected.rows.keys() | actual.keys() if expected.rows.get(key) != actual.get(key))


async def _publish(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(**settings.kafka_client_options(), acks="all")
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(Topics.of(settings).usage_recorded, value, key=key)
    finally:
        await producer.stop()


async def _changelog_offsets(settings: Settings) -> int:
    """Offsets in the changelog's partitions (end minus start): its entries, plus transaction markers, before
    compaction; what a fresh worker has at most to replay."""
    consumer = AIOKafkaConsumer(**settings.kafka_client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        topic = Topics.of(settings).rollup_changelog
        tps = [TopicPartition(topic, p) for p in range(settings.usage_partitions)]
        start, end = await consumer.beginning_offsets(tps), await consumer.end_offsets(tps)
        return sum(end[tp] - start[tp] for tp in tps)
    finally:
        await consumer.stop()


# --- history ----------------------------------------------------------------------------------------------------


@dataclass
class _Restart:
    """A worker started after another, timed from its start() until the new record it was sent is counted."""

    counted_s: float | None = None  # its metering_records_counted reached 1
    visible_s: float | None = None  # usage_summary held the record
    restore_s: float | None = None  # from the last poll with nothing restored to metering_state_restoring_partitions 0
    restore_done_s: float | None = None  # the latter, from start()
    restored_entries: float | None = None
    restore_rate: float | None = None  # entries/s over the restore (with the store's metrics)
    rss_mb: float = 0.0
    duplicates: int = 0


def _timed_restart(
    settings: Settings, worker: WorkerProcess, visible_target: int, timeout: float, send: Callable[[], None]
) -> _Restart:
    """Start `worker`, call `send` (publish the new record), then poll /metrics every 0.1 s and usage_summary every
    0.25 s until the worker has counted the record, usage_summary shows `visible_target` records, and the restore
    the worker reports (if it reports one) is done."""
    timing = _Restart()
    started = time.perf_counter()
    worker.start()
    send()
    assert worker.process is not None
    restore_began = started  # the last poll that saw nothing restored yet
    reports_restore = False
    last_summary = 0.0
    while timing.counted_s is None or timing.visible_s is None or (reports_restore and timing.restore_s is None):
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"the worker did not count its new record in {timeout:.0f} s:\n{worker.log_tail()}")
        _check_alive(worker)
        text = scrape(worker)
        now = time.perf_counter()
        if text is not None:
            if timing.counted_s is None and (metric(text, COUNTED) or 0) >= 1:
                timing.counted_s = now - started
            restored, restoring = metric(text, RESTORED_ENTRIES), metric(text, RESTORING_PARTITIONS)
            if restored is not None:
                reports_restore = True
                # Done once nothing is restoring after something was: entries replayed, or (an empty tail) a count.
                if restoring == 0 and (restored > 0 or timing.counted_s is not None) and timing.restore_s is None:
                    timing.restore_done_s = now - started
                    timing.restore_s = max(now - restore_began, 1e-3)
                    timing.restored_entries = restored
                    timing.restore_rate = restored / timing.restore_s
                elif restored == 0:
                    restore_began = now
        if timing.visible_s is None and now - last_summary >= 0.25:
            last_summary = now
            if phases.summarised_records(settings) >= visible_target:
                timing.visible_s = time.perf_counter() - started
        time.sleep(0.1)
    time.sleep(1)  # the duplicate was sent with the new record; its count settles
    timing.duplicates = int(metric(scrape(worker) or "", DUPLICATES) or 0)
    timing.rss_mb = rss_bytes(worker.process.pid) / 2**20
    return timing


@dataclass
class _Growth:
    """The first worker's RSS (bytes) as its count grew: at its first /metrics answer, after `sample_at` records,
    after half of them, after all; and when each was taken. The second half tells growth that goes on from the
    memory budget filling up (the rollup cache, RocksDB's block cache), which may take longer than `sample_at`."""

    start: tuple[int, int] | None = None  # (records counted, RSS)
    sample: tuple[int, int, float] | None = None  # (records counted, RSS, perf_counter)
    middle: tuple[int, int, float] | None = None
    end: tuple[int, int, float] | None = None

    def bytes_per_record(self, since: tuple[int, int, float] | None = None) -> float:
        since = since or self.sample
        assert since is not None and self.end is not None
        return (self.end[1] - since[1]) / max(self.end[0] - since[0], 1)

    def rate_after_sample(self) -> float:
        assert self.sample is not None and self.end is not None
        return (self.end[0] - self.sample[0]) / max(self.end[2] - self.sample[2], 1e-3)


def _count_history(worker: WorkerProcess, records: int, sample_at: int, deadline: float) -> _Growth:
    """Poll the worker's /metrics every 0.1 s until it has counted `records`, sampling its RSS on the way."""
    assert worker.process is not None
    growth = _Growth()
    counted = 0.0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"history: {counted:,.0f} of {records:,} records counted before the deadline")
        _check_alive(worker)
        text = scrape(worker)
        found = None if text is None else metric(text, COUNTED)
        if found is not None:
            counted, rss, now = found, rss_bytes(worker.process.pid), time.perf_counter()
            if growth.start is None:
                growth.start = (int(counted), rss)
            if growth.sample is None and counted >= sample_at:
                growth.sample = (int(counted), rss, now)
            if growth.middle is None and counted >= records // 2:
                growth.middle = (int(counted), rss, now)
            if counted >= records:
                growth.end = (int(counted), rss, now)
                return growth
        time.sleep(0.1)


def history(
    settings: Settings,
    records: int,
    subjects: int,
    sample_at: int,
    log_dir: Path,
    say: Callable[[str], None],
    timeout: float = 1800,
) -> tuple[Result, int]:
    """Issue 25's targets 1 and 3: returns the phase's result and the monthly totals' mismatches."""
    workload = HistoryWorkload.recent(records, subjects)
    say(
        f"history: publishing {records:,} records over {HISTORY_DAYS} days of event time ({subjects:,} subjects × "
        f"{len(HISTORY_METRICS)} SUM metrics, dedup window 24 h) ..."
    )
    expected: MonthlyExpected = asyncio.run(phases.prepare_input(settings, workload, 1))  # type: ignore[arg-type]
    migrate(settings)
    asyncio.run(ensure_topics(settings, internal_topics(settings)))
    env = {
        **settings_env(settings),
        "METERING_DEDUP_WINDOW": DEDUP_WINDOW,
        "METERING_KAFKA_GROUP_INSTANCE_ID": HISTORY_INSTANCE_ID,
    }
    workers: list[WorkerProcess] = []
    try:
        # 1. One worker counts the history; its RSS after `sample_at` records and after all.
        say(f"  one worker until it has counted all {records:,}; its RSS at {sample_at:,} and at the end ...")
        first = WorkerProcess(env, log_dir / "history-1.log")
        workers.append(first)
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        first.start()
        assert first.process is not None
        growth = _count_history(first, records, sample_at, deadline)
        assert growth.sample is not None and growth.end is not None
        while phases.summarised_records(settings) < records:
            if time.monotonic() > deadline:
                raise TimeoutError(f"history: usage_summary short of {records:,} records after {timeout:.0f} s")
            _check_alive(first)
            time.sleep(0.25)
        elapsed = time.perf_counter() - started
        cpu, peak = cpu_seconds(first.process.pid), peak_rss_bytes(first.process.pid)
        rss_written = rss_bytes(first.process.pid)  # the checkpoint writers' buffers included
        say(
            f"  RSS {growth.sample[1] / 2**20:,.0f} MB at {growth.sample[0]:,} records, "
            f"{growth.end[1] / 2**20:,.0f} MB at {growth.end[0]:,}: {growth.bytes_per_record():,.0f} B per record "
            f"after the first {sample_at:,}; {records / elapsed:,.0f} records/s "
            f"({growth.rate_after_sample():,.0f} after the first {sample_at:,})"
        )

        # 2. SIGKILL, and a new worker on the same state dir: seconds until a new record is counted.
        time.sleep(max(3.0, 3 * settings.flush_interval))  # the last checkpoint commits: nothing left to replay
        first.kill()
        say("  SIGKILLed; a new worker on the same state dir is sent one new record and one old duplicate ...")
        second = WorkerProcess(env, log_dir / "history-2.log", state_dir=first.state_dir)
        workers.append(second)
        restart_messages = [workload.new_message("history-restart", expected), workload.old_message(0)]
        restart = _timed_restart(
            settings, second, records + 1, 600, lambda: asyncio.run(_publish(settings, restart_messages))
        )
        replayed = "" if restart.restored_entries is None else f"; {restart.restored_entries:,.0f} entries replayed"
        say(
            f"  restart to count, same state dir: {restart.counted_s:.1f} s (in usage_summary after "
            f"{restart.visible_s:.1f} s){replayed}; RSS then {restart.rss_mb:,.0f} MB; duplicates refused: "
            f"{restart.duplicates}"
        )

        # 3. Stopped; a worker on a fresh, empty state dir (same group and member) restores from the changelog.
        second.stop()
        offsets = asyncio.run(_changelog_offsets(settings))
        say(f"  stopped; a worker on a fresh state dir restores the changelog ({offsets:,} offsets) ...")
        third = WorkerProcess(env, log_dir / "history-3.log")
        workers.append(third)
        fresh_messages = [workload.new_message("history-fresh", expected), workload.old_message(1)]
        fresh = _timed_restart(
            settings, third, records + 2, 600, lambda: asyncio.run(_publish(settings, fresh_messages))
        )
        assert fresh.counted_s is not None
        if fresh.restore_rate is not None:
            say(
                f"  fresh state dir: restored {fresh.restored_entries:,.0f} entries in {fresh.restore_s:.1f} s "
                f"({fresh.restore_rate:,.0f} entries/s, done {fresh.restore_done_s:.1f} s after start); counted a new "
                f"record {fresh.counted_s:.1f} s after start"
            )
        else:
            say(
                f"  fresh state dir: no {RESTORED_ENTRIES} on /metrics; counted a new record {fresh.counted_s:.1f} s "
                f"after start: {offsets / fresh.counted_s:,.0f} changelog offsets/s at least"
            )
        mismatches = check_monthly_totals(settings, expected)
        say(f"  {len(expected.rows):,} monthly totals {'exact' if mismatches == 0 else f'{mismatches} wrong'}")
    finally:
        phases.stop_all(workers)
    extra: dict[str, float] = {
        "subjects": subjects,
        "days": HISTORY_DAYS,
        "counted_at_start": growth.start[0] if growth.start else 0,
        "rss_start_mb": growth.start[1] / 2**20 if growth.start else 0.0,
        "sample_at": sample_at,
        "counted_at_sample": growth.sample[0],
        "rss_at_sample_mb": growth.sample[1] / 2**20,
        "counted_at_end": growth.end[0],
        "rss_end_mb": growth.end[1] / 2**20,
        "rss_in_summary_mb": rss_written / 2**20,
        "bytes_per_record_after_sample": growth.bytes_per_record(),
        "counted_at_middle": growth.middle[0] if growth.middle else 0,
        "bytes_per_record_second_half": growth.bytes_per_record(growth.middle),
        "records_per_s_after_sample": growth.rate_after_sample(),
        "restart_to_count_s": restart.counted_s or 0.0,
        "restart_to_summary_s": restart.visible_s or 0.0,
        "restart_rss_mb": restart.rss_mb,
        "restart_restored_entries": -1.0 if restart.restored_entries is None else restart.restored_entries,
        "restart_duplicates_refused": restart.duplicates,
        "changelog_offsets": offsets,
        # From the store's metrics when the worker has them; else the changelog's offsets over the time to the
        # first count (process start included: a lower bound).
        "fresh_restore_from_metrics": 0.0 if fresh.restore_rate is None else 1.0,
        "fresh_restored_entries": offsets if fresh.restored_entries is None else fresh.restored_entries,
        "fresh_restore_s": fresh.counted_s if fresh.restore_s is None else fresh.restore_s,
        "fresh_restore_done_s": fresh.counted_s if fresh.restore_done_s is None else fresh.restore_done_s,
        "fresh_restore_entries_per_s": offsets / fresh.counted_s if fresh.restore_rate is None else fresh.restore_rate,
        "fresh_to_count_s": fresh.counted_s,
        "fresh_to_summary_s": fresh.visible_s or 0.0,
        "fresh_rss_mb": fresh.rss_mb,
        "fresh_duplicates_refused": fresh.duplicates,
        "monthly_totals": len(expected.rows),
    }
    return Result(HISTORY_PHASE, records, elapsed, cpu, peak / 2**20, 1, extra), mismatches


# --- rebalance --------------------------------------------------------------------------------------------------

IDENTITY_CHUNK = 50_000  # identities per identities_entries() call (entries of IDENTITIES_PER_ENTRY each)
# Checkpoint ids of the written entries: far above any routed offset, so no checkpoint of a worker's own replaces them.
CHECKPOINT_BASE = 10**15
LANES = 12  # subjects fed at once, each until it has crossed both thresholds, then the next one
PER_SUBJECT = 110  # records of quantity 10 per subject: approaching at the 80th, exceeded at the 101st
LIMIT = Decimal(1000)
WARM_UP = 5.0  # seconds of alerts before the second worker starts
TAIL = 5.0  # seconds of alerts after both count
# aiokafka's heartbeat lines when a member was dropped from its group: its own session expired, or the coordinator no
# longer knows its member id. (A commit refused with IllegalGenerationError, UnknownMemberIdError or CommitFailedError
# is what any rebalance may cause: not counted.)
EVICTION_SIGNS = ("Heartbeat session expired", "local member_id was not recognized")
WATCHED_GROUPS = ("rollups", "router", "alert_archive", "app")  # the worker's consumer groups, as the report names them
REBALANCE_NOTICE = "because it is rebalancing"  # aiokafka's warning at every rebalance, expected once per group


async def _write_identities(settings: Settings, partition: int, count: int) -> None:
    """`count` dedup identities of subjects of `partition`, seen now, into that partition of the rollup changelog as a
    worker's checkpoints write them (not transactionally: read_committed readers see them all the same)."""
    topic = Topics.of(settings).rollup_changelog
    subjects: list[str] = []
    candidate = 0
    while len(subjects) < 1000:
        name = f"heavy{candidate}"
        candidate += 1
        if subject_partition("org", name, settings.usage_partitions) == partition:
            subjects.append(name)
    producer = AIOKafkaProducer(
        **settings.kafka_client_options(),
        acks="all",
        linger_ms=20,
        max_batch_size=1 << 20,
        compression_type="lz4",
    )
    await producer.start()
    try:
        now = datetime.now(UTC)
        pending = []
        for chunk, first in enumerate(range(0, count, IDENTITY_CHUNK)):
            identities = [
                (("org", subjects[n % len(subjects)], f"old-{n}"), now)
                for n in range(first, min(count, first + IDENTITY_CHUNK))
            ]
            for key, value in identities_entries(CHECKPOINT_BASE + chunk, identities):
                pending.append(await producer.send(topic, value, key=key, partition=partition))
            if len(pending) >= 200:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


class _Subjects:
    """Subject ids, in order, whose routed partition is not `avoid`."""

    def __init__(self, partitions: int, avoid: int) -> None:
        self.partitions, self.avoid = partitions, avoid
        self.names: list[str] = []
        self._next = 0

    def __getitem__(self, index: int) -> str:
        while len(self.names) <= index:
            name = f"light{self._next}"
            self._next += 1
            if subject_partition("org", name, self.partitions) != self.avoid:
                self.names.append(name)
        return self.names[index]


@dataclass
class _Alerts:
    crossing_sent: dict[tuple[str, str], float] = field(default_factory=dict)
    received: dict[tuple[str, str], float] = field(default_factory=dict)
    sent: int = 0


async def _publish_crossings(settings: Settings, rate: float, avoid: int, alerts: _Alerts, stop: asyncio.Event) -> None:
    """Records of quantity 10 at `rate`/s, `LANES` subjects at a time, each subject until it has crossed its
    threshold's approaching fraction and the threshold; the time each crossing record was sent is kept."""
    topic = Topics.of(settings).usage_recorded
    subjects = _Subjects(settings.usage_partitions, avoid)
    approaching = LIMIT * settings.threshold_approaching_fraction
    quantity = Decimal(10)
    totals: dict[str, Decimal] = defaultdict(Decimal)
    producer = AIOKafkaProducer(**settings.kafka_client_options(), acks="all", linger_ms=1)
    await producer.start()
    try:
        started = time.perf_counter()
        pending = []
        while not stop.is_set():
            crossed = []
            for _ in range(max(0, int((time.perf_counter() - started) * rate) - alerts.sent)):
                n = alerts.sent
                subject = subjects[(n // LANES // PER_SUBJECT) * LANES + n % LANES]
                record = {
                    "id": f"rb-{n}",
                    "metricKey": "bench_tokens",
                    "subjectType": "org",
                    "subjectId": subject,
                    "quantity": str(quantity),
                }
                pending.append(await producer.send(topic, orjson.dumps(record), key=f"org:{subject}".encode()))
                before = totals[subject]
                totals[subject] = after = before + quantity
                if before < approaching <= after:
                    crossed.append((subject, "threshold.approaching"))
                if before <= LIMIT < after:
                    crossed.append((subject, "threshold.exceeded"))
                alerts.sent += 1
            now = time.perf_counter()
            alerts.crossing_sent.update((crossing, now) for crossing in crossed)
            if len(pending) > 1000:
                await asyncio.gather(*pending)
                pending = []
            await asyncio.sleep(0.005)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


@dataclass
class GroupWatch:
    """What repeated DescribeGroups calls saw of each group: its member ids, and how often it left Stable (a
    rebalance, that is one more generation). A member dropped from its group rejoins under a new member id."""

    member_ids: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    rebalances: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    state: dict[str, str] = field(default_factory=dict)


class _DescribeGroups(DescribeGroupsRequest):
    """DescribeGroups at version 2 at most: aiokafka 0.14 reads a version 3 answer with version 2's layout (its
    DescribeGroupsRequest_v3.RESPONSE_TYPE), fails to decode it, and drops the connection."""

    def build(self, request_struct_class: type[DescribeGroupsRequestStruct]) -> DescribeGroupsRequestStruct:
        if request_struct_class.API_VERSION > 2:
            return DescribeGroupsRequest_v2(self._groups)
        return request_struct_class(self._groups)


async def _watch_groups(settings: Settings, groups: list[str], watch: GroupWatch, stop: asyncio.Event) -> None:
    client = AIOKafkaClient(**settings.kafka_client_options())
    await client.bootstrap()
    coordinators: dict[str, int] = {}
    try:
        while not stop.is_set():
            for group in groups:
                try:
                    if group not in coordinators:
                        coordinators[group] = await client.coordinator_lookup(CoordinationType.GROUP, group)
                    response = await client.send(coordinators[group], _DescribeGroups([group]))
                except (KafkaError, OSError):
                    coordinators.pop(group, None)
                    continue
                for described in response.groups:  # error_code, group, state, protocol_type, protocol, members
                    state, members = described[2], described[5]
                    if state != "Stable" and watch.state.get(group) == "Stable":
                        watch.rebalances[group] += 1
                    watch.state[group] = state
                    watch.member_ids[group].update(member[0] for member in members)
            await asyncio.sleep(0.25)
    finally:
        await client.close()


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _log_lines(logs: dict[Path, int], signs: tuple[str, ...]) -> int:
    """Lines with any of `signs` in these logs past the given offsets (the bench's logs are appended to, run after
    run)."""
    lines = 0
    for path, start in logs.items():
        try:
            with path.open("rb") as log:
                log.seek(start)
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            continue
        lines += sum(1 for line in text.splitlines() if any(sign in line for sign in signs))
    return lines


PROBE = {"id": "probe", "metricKey": "bench_tokens", "subjectType": "org", "subjectId": "probe", "quantity": "1"}


async def _until_counted(worker: WorkerProcess, records: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_alive(worker)
        text = await asyncio.to_thread(scrape, worker)
        if text is not None and (metric(text, COUNTED) or 0) >= records:
            return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"the worker did not count {records} record(s) in {timeout:.0f} s:\n{worker.log_tail()}")


@dataclass
class _Poll:
    """A worker as one poll saw it; None where /metrics did not answer or lacks the metric."""

    healthy: bool
    counted: float | None = None
    restored: float | None = None  # metering_state_restored_entries
    restoring: float | None = None  # metering_state_restoring_partitions


async def _poll(worker: WorkerProcess) -> _Poll:
    is_healthy, text = await asyncio.gather(asyncio.to_thread(healthy, worker), asyncio.to_thread(scrape, worker))
    if text is None:
        return _Poll(is_healthy)
    return _Poll(is_healthy, metric(text, COUNTED), metric(text, RESTORED_ENTRIES), metric(text, RESTORING_PARTITIONS))


@dataclass
class _Settling:
    """Times (perf_counter) of the join's milestones, None until seen."""

    settled: float | None = None  # both healthy and counting
    restore_began: float | None = None  # a worker first reported a partition restoring (with the store's metrics)
    restored: float | None = None  # then neither did any more
    entries: float = 0.0  # changelog entries the workers replayed since the join (with the store's metrics)


async def _until_settled(first: WorkerProcess, second: WorkerProcess, timeout: float) -> _Settling:
    """Poll both workers every 0.25 s until both are healthy and counting: the second has counted, and the first has
    counted again since (a rebalance revokes every partition; a worker counts again once it has its new ones). With
    the store's metrics, also until neither reports a partition restoring, after the second has counted."""
    joined = time.perf_counter()
    times = _Settling()
    second_counted = False
    first_reference: float | None = None  # the first's count when the second's first count was seen
    baseline: float | None = None  # the entries the workers had restored before the join
    while time.perf_counter() - joined < timeout:
        await asyncio.sleep(0.25)
        _check_alive(first, second)
        one, two = await asyncio.gather(_poll(first), _poll(second))
        now = time.perf_counter()
        if one.restored is not None and baseline is None:
            baseline = one.restored
        if one.restored is not None and two.restored is not None and baseline is not None:
            times.entries = max(times.entries, one.restored + two.restored - baseline)
        restoring = [poll.restoring for poll in (one, two)]
        if times.restore_began is None and any(r for r in restoring):
            times.restore_began = now
        second_counted = second_counted or (two.counted or 0) > 0
        if second_counted and one.counted is not None:
            if first_reference is None:
                first_reference = one.counted
            elif times.settled is None and one.counted > first_reference and one.healthy and two.healthy:
                times.settled = now
        reports_restore = baseline is not None
        if second_counted and reports_restore and times.restored is None and restoring == [0, 0]:
            times.restored = now
        if times.settled is not None and (times.restored is not None or not reports_restore):
            break
    return times


def rebalance(
    settings: Settings,
    identities: int,
    rate: float,
    log_dir: Path,
    say: Callable[[str], None],
    timeout: float = 900,
) -> Result:
    """Issue 25's target 4."""
    return asyncio.run(_rebalance(settings, identities, rate, log_dir, say, timeout))


async def _rebalance(
    settings: Settings, identities: int, rate: float, log_dir: Path, say: Callable[[str], None], timeout: float
) -> Result:
    topics = Topics.of(settings)
    wildcard = {
        "id": "rebalance-every-org",
        "metricKey": "bench_tokens",
        "subjectType": "org",
        "subjectId": "*",
        "threshold": str(LIMIT),
        "action": "ALERT",
        "notifyEmails": [],
    }
    await phases.prepare_input(settings, Workload.recent(0, 1), 1, [wildcard])
    await asyncio.to_thread(migrate, settings)
    await ensure_topics(settings, internal_topics(settings))
    env = settings_env(settings)
    heavy = 0
    workers: list[WorkerProcess] = []
    stop_publishing, stop_watching = asyncio.Event(), asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    alerts, watch = _Alerts(), GroupWatch()
    prefix = settings.consumer_group_prefix
    ids = (
        f"{prefix}-rollups",
        f"{prefix}-router",
        f"{prefix}-alert-archive",
        f"{settings.topic_prefix}{prefix}-worker",
    )
    groups = dict(zip(WATCHED_GROUPS, ids, strict=True))  # the last is Faust's (the definitions mirror)
    logs = {path: _log_size(path) for path in (log_dir / "rebalance-1.log", log_dir / "rebalance-2.log")}
    try:
        say("rebalance: one worker, until healthy (the topics exist with the product's partition count) ...")
        first = WorkerProcess(env, log_dir / "rebalance-1.log").start()
        workers.append(first)
        await asyncio.to_thread(first.wait_healthy)
        # Its rollup stage has its partitions (and restored their empty state) once it counts: only then the
        # identities go in, for the partition's next owner to restore at the rebalance.
        await _publish(settings, [(b"org:probe", orjson.dumps(PROBE))])
        await _until_counted(first, 1, 120)
        say(f"  writing {identities:,} dedup identities into partition {heavy} of {topics.rollup_changelog} ...")
        written = time.perf_counter()
        await _write_identities(settings, heavy, identities)
        say(
            f"  written in {time.perf_counter() - written:.1f} s; alerts of the other partitions at {rate:,.0f} "
            f"records/s, then a second worker joins ..."
        )
        tasks = [
            asyncio.create_task(phases.read_alerts(settings, alerts.received, stop_watching)),
            asyncio.create_task(_watch_groups(settings, list(groups.values()), watch, stop_watching)),
        ]
        await asyncio.sleep(1)  # the alert reader has started
        tasks.append(asyncio.create_task(_publish_crossings(settings, rate, heavy, alerts, stop_publishing)))
        await asyncio.sleep(WARM_UP)
        joined = time.perf_counter()
        second = WorkerProcess(env, log_dir / "rebalance-2.log").start()
        workers.append(second)
        times = await _until_settled(first, second, timeout)
        settle_s = (times.settled or time.perf_counter()) - joined
        say(
            f"  both healthy and counting {settle_s:.1f} s after the second worker started"
            if times.settled
            else f"  not both healthy and counting after {timeout:.0f} s"
        )
        if times.restored is not None:
            say(f"  neither restoring {times.restored - joined:.1f} s after it started ({times.entries:,.0f} entries)")
        await asyncio.sleep(TAIL)
        stop_publishing.set()
        await tasks[-1]
        deadline = time.perf_counter() + 30
        while set(alerts.crossing_sent) - set(alerts.received) and time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        pids = [w.process.pid for w in workers if w.process is not None]
        cpu, peak = sum(cpu_seconds(pid) for pid in pids), max(peak_rss_bytes(pid) for pid in pids) / 2**20
    finally:
        stop_publishing.set()
        stop_watching.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(phases.stop_all, workers)

    # The restore: from the join until both count and, with the store's metrics, neither restores any more.
    end = max(joined + settle_s, times.restored or 0.0)
    windows = {"before": (0.0, joined), "during": (joined, end), "after": (end, float("inf"))}
    latencies = {
        name: [
            alerts.received[key] - at
            for key, at in alerts.crossing_sent.items()
            if key in alerts.received and low <= at < high
        ]
        for name, (low, high) in windows.items()
    }
    expected = {
        name: sum(1 for at in alerts.crossing_sent.values() if low <= at < high)
        for name, (low, high) in windows.items()
    }
    rebalances = watch.rebalances.get(groups["rollups"], 0)
    members = len(watch.member_ids.get(groups["rollups"], ()))
    # A member dropped from its group (evicted, or reset by its client after a failed commit) rejoins under a new id:
    # more than the two workers' ids in a group.
    rejoined = {name: max(0, len(watch.member_ids.get(group, ())) - 2) for name, group in groups.items()}
    eviction_lines = _log_lines(logs, EVICTION_SIGNS)
    say(
        f"  rollups group: {rebalances} rebalance(s) seen, {members} member ids (expected 1 and 2); members that "
        f"rejoined under a new id: {sum(rejoined.values())} ({', '.join(f'{n} {c}' for n, c in rejoined.items())}); "
        f"heartbeat eviction lines in the logs: {eviction_lines}; alert latency from the join to the restore's end: "
        f"p50 {percentile(latencies['during'], 0.5) * 1000:,.0f} ms, p99 "
        f"{percentile(latencies['during'], 0.99) * 1000:,.0f} ms ({len(latencies['during'])} of "
        f"{expected['during']} alerts)"
    )
    extra: dict[str, float] = {
        "identities": identities,
        "partition": heavy,
        "rate": rate,
        "settled": 1.0 if times.settled is not None else 0.0,
        "restore_reported": 0.0 if times.restored is None else 1.0,
        "restore_end_s": end - joined,
        "restore_s": (times.restored - (times.restore_began or joined)) if times.restored is not None else -1.0,
        "restored_entries": times.entries,
        "rejoined_members": sum(rejoined.values()),
        "eviction_log_lines": eviction_lines,
        "rebalance_log_notices": _log_lines(logs, (REBALANCE_NOTICE,)),
    }
    for name, group in groups.items():
        extra[f"{name}_group_rebalances"] = watch.rebalances.get(group, 0)
        extra[f"{name}_group_member_ids"] = len(watch.member_ids.get(group, ()))
    for name in windows:
        extra[f"alerts_{name}_expected"] = expected[name]
        extra[f"alerts_{name}_received"] = len(latencies[name])
        extra[f"latency_{name}_p50_s"] = percentile(latencies[name], 0.5)
        extra[f"latency_{name}_p99_s"] = percentile(latencies[name], 0.99)
    return Result(REBALANCE_PHASE, identities, settle_s, cpu, peak, 2, extra)


# --- the report -------------------------------------------------------------------------------------------------


def render(results: list[dict]) -> str:
    """The state phases' figures, for `runner.render` (empty without them)."""
    parts = []
    history_row = next((r for r in results if r["phase"] == HISTORY_PHASE), None)
    if history_row:
        e = history_row["extra"]
        restore = (
            f"{e['fresh_restore_entries_per_s']:,.0f} entries/s ({e['fresh_restored_entries']:,.0f} entries in "
            f"{e['fresh_restore_s']:.1f} s, done {e['fresh_restore_done_s']:.1f} s after start)"
            if e["fresh_restore_from_metrics"]
            else f"≥ {e['fresh_restore_entries_per_s']:,.0f} entries/s ({e['changelog_offsets']:,.0f} changelog "
            f"offsets by the first count; no {RESTORED_ENTRIES} metric)"
        )
        rows = [
            (
                f"RSS at the first /metrics answer ({e['counted_at_start']:,.0f} counted)",
                f"{e['rss_start_mb']:,.0f} MB",
            ),
            (f"RSS at {e['counted_at_sample']:,.0f} records", f"{e['rss_at_sample_mb']:,.0f} MB"),
            (f"RSS at {e['counted_at_end']:,.0f} records", f"{e['rss_end_mb']:,.0f} MB"),
            ("RSS once all are in usage_summary", f"{e['rss_in_summary_mb']:,.0f} MB"),
            (f"RAM per record after the first {e['sample_at']:,.0f}", f"{e['bytes_per_record_after_sample']:,.0f} B"),
            (
                f"RAM per record after the first {e['counted_at_middle']:,.0f}",
                f"{e['bytes_per_record_second_half']:,.0f} B",
            ),
            ("records/s (start to all in usage_summary)", f"{history_row['records_per_s']:,.0f}"),
            (f"records/s after the first {e['sample_at']:,.0f}", f"{e['records_per_s_after_sample']:,.0f}"),
            (
                "restart to count, same state dir (SIGKILL)",
                f"{e['restart_to_count_s']:.1f} s (usage_summary {e['restart_to_summary_s']:.1f} s), "
                f"RSS {e['restart_rss_mb']:,.0f} MB"
                + (
                    f", {e['restart_restored_entries']:,.0f} changelog entries replayed"
                    if e.get("restart_restored_entries", -1) >= 0
                    else ""
                ),
            ),
            ("fresh state dir: restore rate", restore),
            (
                "fresh state dir: start to count",
                f"{e['fresh_to_count_s']:.1f} s (usage_summary {e['fresh_to_summary_s']:.1f} s), "
                f"RSS {e['fresh_rss_mb']:,.0f} MB",
            ),
        ]
        parts.append(
            f"history: {history_row['records']:,} records over {e['days']:.0f} days of event time, "
            f"{e['subjects']:,.0f} subjects × 2 SUM metrics, dedup window 24 h\n"
            + tables.render(["measure", "value"], rows)
        )
    rebalance_row = next((r for r in results if r["phase"] == REBALANCE_PHASE), None)
    if rebalance_row:
        e = rebalance_row["extra"]
        settled = (
            f"{rebalance_row['seconds']:.1f} s" if e["settled"] else f"not within {rebalance_row['seconds']:.0f} s"
        )
        restore = (
            f"{e['restore_end_s']:.1f} s after the 2nd started ({e['restored_entries']:,.0f} changelog entries "
            f"replayed, restoring for {e['restore_s']:.1f} s)"
            if e.get("restore_reported")
            else f"no {RESTORING_PARTITIONS} metric: taken as the above"
        )
        rows = [
            ("both workers healthy and counting after the 2nd started", settled),
            ("no partition restoring any more", restore),
            (
                "rollups group: rebalances, member ids (expected 1, 2)",
                f"{e['rollups_group_rebalances']:.0f}, {e['rollups_group_member_ids']:.0f}",
            ),
            (
                "members rejoined under a new id (all groups), heartbeat eviction log lines",
                f"{e['rejoined_members']:.0f}, {e['eviction_log_lines']:.0f}",
            ),
            (
                "member ids seen: rollups, router, alert archive, app groups",
                ", ".join(f"{e[f'{name}_group_member_ids']:.0f}" for name in WATCHED_GROUPS),
            ),
        ]
        windows = (("before", "before the join"), ("during", "from the join to the restore's end"), ("after", "after"))
        for name, label in windows:
            rows.append(
                (
                    f"alert latency {label}: p50, p99",
                    f"{e[f'latency_{name}_p50_s'] * 1000:,.0f} ms, {e[f'latency_{name}_p99_s'] * 1000:,.0f} ms "
                    f"({e[f'alerts_{name}_received']:.0f} of {e[f'alerts_{name}_expected']:.0f} alerts)",
                )
            )
        parts.append(
            f"rebalance: {rebalance_row['records']:,} dedup identities in changelog partition {e['partition']:.0f}, "
            f"alerts of the other partitions at {e['rate']:,.0f} records/s\n"
            + tables.render(["measure", "value"], rows)
        )
    return "\n\n".join(parts)
