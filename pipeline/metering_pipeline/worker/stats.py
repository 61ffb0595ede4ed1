"""What the worker exposes on `/metrics` (Prometheus text, through prometheus_client).

The counters the stages bump per record stay plain ints: a prometheus_client Counter takes a
lock on every `inc()`, too much at 100k records/s. `_Collector` reads them (and the rollup
stage's gauges) only when /metrics is scraped. Histograms are observed once per checkpoint,
alert or polled batch, rare enough for prometheus_client's own. Each WorkerStats has its own
registry, with the process's metrics (RSS, CPU, open files, GC).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from metering_pipeline.observability import process_registry

# Upper bounds in seconds. A checkpoint write takes milliseconds while ClickHouse keeps up and up to
# minutes while it is down; alert latency is meant to stay under a few seconds; a record's age at
# rollup grows with the stage's lag and reaches hours or days only after an outage.
FLUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
ALERT_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
RECORD_AGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)


@dataclass(frozen=True)
class RollupGauges:
    """The rollup stage's state as a scrape sees it."""

    buffered_records: int  # counted, not yet committed with their rollups in ClickHouse (what backpressure counts)
    paused_partitions: int
    owned_partitions: int
    failing_writers: int  # partition writers whose checkpoint writes are failing
    restoring_partitions: int = 0  # assigned, their state store still replaying the changelog
    restored_entries: int = 0  # changelog entries replayed into state stores since the worker started
    router_holding: bool = False  # paused long enough that the router holds too (ClickHouse down, not behind)


class WorkerStats:
    def __init__(self) -> None:
        self.records_in = 0  # records read from usage.recorded (batch elements counted one by one)
        self.accepted = 0  # passed intake and were routed
        self.filtered = 0  # valid records their metric's filter left out (neither counted nor dead-lettered)
        self.counted = 0  # new records folded into rollups
        self.duplicates = 0  # records whose identity was seen within the dedup window
        self.dead_letters: Counter[str] = Counter()  # by reason
        self.alerts = 0  # threshold alerts committed to metering.alerts
        self.flushes = 0
        self.restored_entries = 0  # changelog entries replayed by the restores that finished
        self.lag: dict[str, int] = {}  # "stage/partition" -> messages behind
        self.rollup_gauges: Callable[[], RollupGauges] | None = None  # the rollup stage's, once it exists
        self.registry = process_registry()
        self.flush_seconds = Histogram(
            "metering_flush_seconds",
            "Duration of a checkpoint write up to its commit: usage_records, then the Kafka "
            "transaction (changelog, usage.aggregated, offsets), retries included.",
            buckets=FLUSH_BUCKETS,
            registry=self.registry,
        )
        self.alert_latency_seconds = Histogram(
            "metering_alert_latency_seconds",
            "From the Kafka time of the usage.recorded message that crossed a threshold "
            "to the commit of its alert on metering.alerts. Measured from the oldest usage message the router "
            "polled with the crossing record, so an upper bound (by at most one router poll). Alerts fired by a "
            "threshold change are "
            "not observed.",
            buckets=ALERT_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.record_age_seconds = Histogram(
            "metering_record_age_seconds",
            "Age (now minus Kafka time on usage.recorded) of the oldest usage message in "
            "each batch the rollup stage folds in; observed once per polled batch and partition.",
            buckets=RECORD_AGE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Collector(self))

    def prometheus(self) -> bytes:
        """Every metric in Prometheus text format; serve with prometheus_client.CONTENT_TYPE_LATEST."""
        return generate_latest(self.registry)


class _Collector:
    """Reads WorkerStats' plain counters and the rollup stage's gauges at scrape time."""

    def __init__(self, stats: WorkerStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        yield CounterMetricFamily(
            "metering_records_in",
            "Records read from usage.recorded (batch elements one by one).",
            value=stats.records_in,
        )
        yield CounterMetricFamily(
            "metering_records_accepted", "Records that passed intake and were routed.", value=stats.accepted
        )
        yield CounterMetricFamily(
            "metering_records_filtered",
            "Valid records their metric's filter left out: neither counted nor dead-lettered.",
            value=stats.filtered,
        )
        yield CounterMetricFamily("metering_records_counted", "New records folded into rollups.", value=stats.counted)
        yield CounterMetricFamily(
            "metering_records_duplicate",
            "Records whose identity was seen within the dedup window.",
            value=stats.duplicates,
        )
        dead_letters = CounterMetricFamily(
            "metering_dead_letters", "Records sent to usage.recorded.dlq, by reason.", labels=["reason"]
        )
        for reason, count in sorted(stats.dead_letters.items()):
            dead_letters.add_metric([reason], count)
        yield dead_letters
        yield CounterMetricFamily(
            "metering_alerts", "Threshold alerts committed to metering.alerts.", value=stats.alerts
        )
        yield CounterMetricFamily("metering_flushes", "Checkpoints written.", value=stats.flushes)
        lag = GaugeMetricFamily(
            "metering_consumer_lag", "Messages behind the partition's end, per stage.", labels=["stage", "partition"]
        )
        for name, behind in sorted(stats.lag.items()):
            lag.add_metric(name.split("/"), behind)
        yield lag
        gauges = stats.rollup_gauges() if stats.rollup_gauges else RollupGauges(0, 0, 0, 0)
        yield GaugeMetricFamily(
            "metering_buffered_records",
            "Counted records not yet committed with their rollups in ClickHouse (consumption pauses at "
            "METERING_MAX_BUFFERED_RECORDS).",
            value=gauges.buffered_records,
        )
        yield GaugeMetricFamily(
            "metering_paused_partitions", "Routed partitions paused by backpressure.", value=gauges.paused_partitions
        )
        yield GaugeMetricFamily(
            "metering_router_holding",
            "1 while the router reads nothing because backpressure has paused the rollup stage for 5 s or more (usage "
            "waits in usage.recorded), else 0.",
            value=1 if gauges.router_holding else 0,
        )
        yield GaugeMetricFamily(
            "metering_owned_partitions",
            "Routed partitions whose rollups this worker owns.",
            value=gauges.owned_partitions,
        )
        yield GaugeMetricFamily(
            "metering_state_restoring_partitions",
            "Routed partitions assigned to this worker whose state is still being restored (their input paused).",
            value=gauges.restoring_partitions,
        )
        yield CounterMetricFamily(
            "metering_state_restored_entries",
            "Changelog entries replayed into this worker's state stores (a restart on its own state dir replays only "
            "the tail).",
            value=gauges.restored_entries,
        )
        yield GaugeMetricFamily(
            "metering_writer_failing",
            "1 while a partition writer's ClickHouse writes keep failing (retried) or its checkpoint failed, else 0.",
            value=1 if gauges.failing_writers else 0,
        )
