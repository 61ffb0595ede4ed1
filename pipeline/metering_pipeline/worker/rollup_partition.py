"""One routed partition as the rollup stage owns it: its state, store, producers and checkpoints.

A checkpoint of partition p, every `flush_interval` seconds, is written behind the loop by
p's `PartitionWriter` (see `checkpoints`):
1. the new usage records go to ClickHouse (idempotent: same identity, same row);
2. one Kafka transaction, by a producer whose transactional id names p (so a stale owner of
   p is fenced), carries p's changed rollups and new identities to the changelog, the
   `usage.aggregated` events, and p's consumer offset (`commit`);
3. after the commit, the changed rollups go to ClickHouse as absolute values with a version;
4. meanwhile the loop puts the committed checkpoint into p's state store on local disk
   (`store_committed`), with the changelog offset a restart replays from, and the one before
   which every rollup is in ClickHouse (a restart replays from the earlier of the two, and
   writes the rollups it replays from the second again).
A crash anywhere replays from the committed offset onto the state restored from the store and
the changelog's tail, which reproduces the same rows; the rollups of that tail are written to
ClickHouse again, since their checkpoints may not have reached it.

Alerts do not wait for checkpoints or ClickHouse: as soon as records cross a threshold, a
transaction of p's alert producer (a second transactional id naming p, so that an alert never
waits for a checkpoint's transaction to end) publishes the alerts with the markers that say they
fired, so a replay of the records does not fire them again. On tansu (no transactions)
`processing_guarantee=at_least_once` commits offsets after the changelog is written instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from metering_pipeline.logs import get_logger
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.periods import local_period_start_text
from metering_pipeline.usage.rollups import (
    WIRE_NAME,
    ZONE_NAME,
    CardinalityLimits,
    Checkpoint,
    PartitionRollups,
    RollupChange,
    RollupKey,
)
from metering_pipeline.usage.routed_record import CountedRecord
from metering_pipeline.usage.subject_zones import SubjectZones
from metering_pipeline.usage.thresholds import Alert, Marker, MarkerKey, PartitionThresholds, ThresholdBook
from metering_pipeline.warehouse.sink import TOTAL_ROW, ClickHouseSink, dimension_map
from metering_pipeline.worker import changelog, routing
from metering_pipeline.worker.batches import KeyPartitions, PartitionBatches
from metering_pipeline.worker.checkpoints import Committed, PartitionWriter, Snapshot
from metering_pipeline.worker.restoration import Restoration, restore
from metering_pipeline.worker.state_store import PartitionStore, StoreResources
from metering_pipeline.worker.stats import WorkerStats
from metering_schemas import DeadLetter, RejectReason, ResetPeriod, SourcePosition

log = get_logger(__name__)
Produce = Callable[[PartitionBatches], Awaitable[None]]  # adds a transaction's messages

EVICTION_INTERVAL = 60.0  # seconds
# Seconds between a partition's state store writes: each writes the checkpoints committed meanwhile, every
# changed rollup once however many of them changed it. Longer: less to write, more held in RAM and replayed on a crash.
STORE_INTERVAL = 1.0
REFRESH_INTERVAL = 3600.0  # seconds between writes of a store with nothing new (see state_store.STALE_AFTER)
MAX_BATCH_BYTES = 900_000  # under the broker's default message.max.bytes (1 MiB)
# RAM taken by one cached rollup with its key (measured with tracemalloc in tests/unit/test_state_store.py's sizing
# test); the cache's capacity is the share of METERING_STATE_CACHE_MB it gets, divided by this.
CACHED_ROLLUP_BYTES = 500
_PERIOD_LENGTH = [ResetPeriod.HOURLY, ResetPeriod.DAILY, ResetPeriod.MONTHLY, ResetPeriod.NEVER]


class ProducerDied(KafkaError):
    """The producer's background sender stopped with an error: every send and transaction of that producer would
    then wait forever. aiokafka lets it die on some connection errors during a broker restart
    (aio-libs/aiokafka#907)."""


@dataclass
class StageContext:
    """What every partition of the stage shares."""

    settings: Settings
    sink: ClickHouseSink
    stats: WorkerStats
    catalog: MetricCatalog
    book: ThresholdBook
    consumer: AIOKafkaConsumer  # of the routed topic (offsets are committed through it on at_least_once)
    group_id: str
    resources: StoreResources
    key_partitions: KeyPartitions = field(default_factory=KeyPartitions)  # of usage.aggregated and alert keys
    zones: SubjectZones | None = None  # subjects' time zones: their thresholds' windows are local

    @property
    def topics(self) -> Topics:
        return Topics.of(self.settings)

    @property
    def transactional(self) -> bool:
        return self.settings.processing_guarantee == "exactly_once"

    def store_path(self, partition: int) -> Path:
        return self.settings.state_dir / f"{self.topics.rollup_changelog}-{partition}"


class RollupPartition:
    def __init__(
        self,
        ctx: StageContext,
        partition: int,
        store: PartitionStore,
        producers: tuple[AIOKafkaProducer, AIOKafkaProducer],
        cache_capacity: int,
    ) -> None:
        self.ctx = ctx
        self.partition = partition
        self.topics = ctx.topics
        self.store = store
        self.producer, self.alert_producer = producers  # checkpoints; alerts and their markers
        limits = CardinalityLimits(ctx.settings.max_dimension_combinations, ctx.settings.max_distinct_values)
        self.state = PartitionRollups(ctx.settings.dedup_window, limits, store, cache_capacity)
        # seen_changes starts at 0: every threshold in force is checked against the restored state.
        self.thresholds = PartitionThresholds(
            self.state, ctx.book, ctx.catalog, ctx.settings.threshold_approaching_fraction, ctx.zones
        )
        self.thresholds.watch.restore(store.markers())
        stored = store.rollups(limit=cache_capacity)
        if stored is not None:  # they fit in the cache: all in RAM, and no lookups in the store until they do not
            self.state.warm(stored)
        self.writer = PartitionWriter(ctx.sink, self, ctx.stats)
        self.alerts: list[Alert] = []  # decided, not yet published
        self.next_offset: int | None = None
        self.checkpoint_due = False
        self.last_eviction = 0.0
        self._markers: dict[MarkerKey, Marker | None] = {}  # committed by alert transactions, not stored yet
        self._leaving: set[bytes] = set()  # changelog keys tombstoned, not yet gone from the store
        self._committed: list[Committed] = []  # committed checkpoints not stored yet
        self._stored_at = time.monotonic()

    @classmethod
    async def start(
        cls, ctx: StageContext, partition: int, progress: Restoration, cache_capacity: int
    ) -> RollupPartition:
        """Fence the previous owner (its producers' transactional ids are these), then bring the store up to the
        changelog's end: the partition's input stays paused meanwhile."""
        changes_id, alerts_id = transactional_ids(ctx.group_id, ctx.topics.routed, partition)
        producer = await _start_producer(ctx, changes_id)
        try:
            alert_producer = await _start_producer(ctx, alerts_id)
        except BaseException:
            await producer.stop()
            raise
        try:
            owner = f"{ctx.topics.rollup_changelog}/{partition}"
            path = ctx.store_path(partition)
            existed = path.exists()
            store, why = PartitionStore.open(path, owner, ctx.resources)
            if why is not None:
                log.warning("state store rebuilt from the changelog", partition=partition, reason=why)
            elif not existed:
                log.info(
                    "state store built from the changelog", partition=partition, reason=f"there was none at {path}"
                )
            try:
                tp = TopicPartition(ctx.topics.rollup_changelog, partition)
                store = await restore(ctx.settings, store, owner, ctx.resources, tp, progress)
                owned = cls(ctx, partition, store, (producer, alert_producer), cache_capacity)
            except BaseException:
                store.close()
                raise
        except BaseException:
            for each in (producer, alert_producer):
                with contextlib.suppress(KafkaError):
                    await each.stop()
            raise
        # The tail's checkpoints may not have reached ClickHouse before the last owner stopped.
        tail = [changelog.decode_rollup_key(key[len(changelog.ROLLUP_PREFIX) :]) for key in progress.unsunk()]
        owned.writer.resink(
            [RollupChange.of(key, rollup) for key in tail if (rollup := owned.state.get(key)) is not None], progress.end
        )
        return owned

    # The loop's side

    def apply(
        self, messages: Iterable[ConsumerRecord], now: datetime, closed_before: datetime, room: int
    ) -> tuple[int, int | None]:
        """Counts messages until `room` records have been; returns the room left and the offset of the first message
        not read (None: all were)."""
        stats = self.ctx.stats
        touched: set[RollupKey] = set()
        oldest = now.timestamp()  # publish time of the batch's oldest usage (a clock ahead of this one counts as now)
        unread = read = None
        for message in messages:
            if room <= 0:
                unread = message.offset
                break
            read = message.offset
            counted, duplicates = self.state.apply(
                routing.decode(message.value), message.offset, now, touched, closed_before
            )
            room -= counted
            stats.counted += counted
            stats.duplicates += duplicates
            self.next_offset = message.offset + 1
            oldest = min(oldest, routing.published_at(message))
        if read is not None:
            stats.record_age_seconds.observe(now.timestamp() - oldest)
        self.alerts += [
            replace(alert, usage_published_at=oldest) for alert in self.thresholds.after_records(touched, now)
        ]
        return room, unread

    def take_checkpoint(self) -> None:
        """Due checkpoints wait for the writer to finish the last one, growing meanwhile instead of queueing: under
        load (or while ClickHouse is down) checkpoints get fewer and larger as writes get slower."""
        self.checkpoint_due = False
        checkpoint = self.state.checkpoint()
        expired = self._expired_identity_entries()
        expired += self._evicted_rollup_entries(checkpoint)
        if self.next_offset is not None and (not checkpoint.is_empty() or expired):
            self.writer.submit(Snapshot(self.next_offset, checkpoint, expired))

    def store_committed(self, now: float, force: bool = False) -> None:
        """Committed checkpoints, and the markers committed since the last write, into the store in one batch, every
        STORE_INTERVAL seconds (a rollup changed by many checkpoints meanwhile is written once). Called by the loop
        between alert transactions: every marker committed so far is in the batch, so the replay offset (after the
        last checkpoint's last changelog entry) skips no committed entry: later checkpoints' entries come after it,
        and alert transactions are either in the batch or not begun."""
        if self.writer.committed:
            self._committed += self.writer.committed
            self.writer.committed = []
        idle = not (self._committed or self._markers or self.writer.busy or self.writer.unsunk)
        if idle and now - self._stored_at >= REFRESH_INTERVAL:
            force = True  # all committed is stored: the store says it is current, or a restart would think it stale
        elif not (self._committed or self._markers) or (not force and now - self._stored_at < STORE_INTERVAL):
            return
        committed, self._committed = self._committed, []
        latest: dict[bytes, bytes | None] = dict(changelog.marker_entry(key, m) for key, m in self._markers.items())
        for checkpoint in committed:
            latest.update(checkpoint.entries)  # later entries of a key replace earlier ones, as in the changelog
        replay_from = max((c.end_offset for c in committed if c.end_offset is not None), default=None)
        self.store.write(latest.items(), replay_from, self.writer.sunk_before)
        self._stored_at = now
        self._markers = {}
        self._leaving.difference_update(key for key, value in latest.items() if value is None)
        if committed:
            self.state.stored_through(committed[-1].generation)

    async def publish_alerts(self) -> None:
        """Alerts go out at once, with the markers that stop a replay from firing them again."""
        if self.thresholds.pending_changes():
            self.alerts += self.thresholds.after_threshold_changes(datetime.now(UTC))
        if not (self.alerts or self.thresholds.watch.has_changes()):
            return
        markers = self.thresholds.watch.checkpoint()
        alerts, self.alerts = self.alerts, []

        async def produce(batches: PartitionBatches) -> None:
            for marker_key, marker in markers:
                await batches.add(
                    self.topics.rollup_changelog, *changelog.marker_entry(marker_key, marker), self.partition
                )
            for alert in alerts:
                await batches.add(
                    self.topics.alerts, f"{alert.subject_type}:{alert.subject_id}".encode(), alert.to_event().to_json()
                )

        await self._in_transaction(self.alert_producer, produce)
        self._markers.update(markers)
        stats = self.ctx.stats
        stats.alerts += len(alerts)
        committed = time.time()
        for alert in alerts:
            if alert.usage_published_at is not None:
                stats.alert_latency_seconds.observe(committed - alert.usage_published_at)

    # The writer's side

    async def commit(self, snapshot: Snapshot) -> Committed:
        checkpoint, partition, topics = snapshot.changes, self.partition, self.topics
        entries: list[tuple[bytes, bytes | None]] = [changelog.rollup_entry(change) for change in checkpoint.rollups]
        if checkpoint.distinct:
            entries += changelog.distinct_entries(checkpoint.distinct)
        if checkpoint.identities:
            entries += changelog.identities_entries(snapshot.offset, checkpoint.identities)
        entries += ((key, None) for key in snapshot.expired)
        if self.writer.sunk_before is not None:
            entries.append(changelog.sunk_entry(self.writer.sunk_before))

        async def produce(batches: PartitionBatches) -> None:
            await batches.add_all(topics.rollup_changelog, entries, partition)
            if self.ctx.settings.publish_usage_aggregated:
                await batches.add_all(
                    topics.usage_aggregated,
                    (
                        (_subject_key(change), aggregated_event(change))
                        for change in checkpoint.rollups
                        if change.reported
                    ),
                )
            letters = [
                *(self._closed_dead_letter(offset, record) for offset, record in checkpoint.closed),
                *(
                    self._dead_letter(RejectReason.CARDINALITY_LIMIT, why, offset, record)
                    for offset, record, why in checkpoint.limited
                ),
            ]
            if letters:
                await batches.add_all(
                    topics.dead_letters,
                    (
                        (f"{letter.record['subjectType']}:{letter.record['subjectId']}".encode(), letter.to_json())
                        for letter in letters
                    ),
                )

        batches = await self._in_transaction(self.producer, produce, snapshot.offset)
        stats = self.ctx.stats
        stats.dead_letters[RejectReason.TOO_LATE.value] += len(checkpoint.closed)
        stats.dead_letters[RejectReason.CARDINALITY_LIMIT.value] += len(checkpoint.limited)
        end = await batches.end_offset(topics.rollup_changelog, partition)
        return Committed(entries, end, checkpoint.generation)

    async def _in_transaction(
        self, producer: AIOKafkaProducer, produce: Produce, offset: int | None = None
    ) -> PartitionBatches:
        """Produce with one of the partition's producers, atomically with its consumer offset when one is given."""
        batches = PartitionBatches(producer, self.ctx.key_partitions)
        await _unless_producer_died(producer, self._produce_and_commit(producer, batches, produce, offset))
        return batches

    async def _produce_and_commit(
        self, producer: AIOKafkaProducer, batches: PartitionBatches, produce: Produce, offset: int | None
    ) -> None:
        ctx = self.ctx
        offsets = {} if offset is None else {TopicPartition(self.topics.routed, self.partition): offset}
        if ctx.transactional:
            async with producer.transaction():
                await produce(batches)
                await batches.flush()
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, ctx.group_id)
        else:
            await produce(batches)
            await batches.flush()
            await producer.flush()
            if offsets:
                await ctx.consumer.commit(offsets)

    # Expiry

    def _evicted_rollup_entries(self, checkpoint: Checkpoint) -> list[bytes]:
        """Once a minute: rollups past the allowed lateness leave the state and the changelog (they can no longer
        change); the changelog keeps those not yet in ClickHouse, so that a restart writes them again."""
        if time.monotonic() - self.last_eviction < EVICTION_INTERVAL:
            return []
        self.last_eviction = time.monotonic()
        horizon = eviction_horizon(self.ctx.settings, datetime.now(UTC))
        self.thresholds.watch.evict_before(horizon, self._threshold_period)
        unsettled = self.writer.unsettled_keys().union(change.key for change in checkpoint.rollups)
        return [
            entry
            for key, rollup in self.state.evict_before(horizon, unsettled)
            for entry in changelog.evicted_entries(key, rollup)
        ]

    def _threshold_period(self, threshold_id: str) -> ResetPeriod | None:
        threshold = self.ctx.book.get(threshold_id)
        definitions = [d for d in self.ctx.catalog.definitions() if threshold and d.key == threshold.metric_key]
        return max(
            (d.reset_period for d in definitions), key=_PERIOD_LENGTH.index, default=None
        )  # the longest: never too early

    def _expired_identity_entries(self) -> list[bytes]:
        """Identity entries whose newest identity left the dedup window: tombstoned in the changelog, and so deleted
        from the store once the checkpoint is stored."""
        now = datetime.now(UTC)
        self.state.dedup.expire(now)
        expired = [
            key
            for key in self.store.identity_entries_before(now - self.ctx.settings.dedup_window)
            if key not in self._leaving
        ]
        self._leaving.update(expired)
        return expired

    # Dead letters

    def _closed_dead_letter(self, offset: int, record: CountedRecord) -> DeadLetter:
        horizon = eviction_horizon(self.ctx.settings, datetime.now(UTC))
        return self._dead_letter(
            RejectReason.TOO_LATE,
            f"timestamp {record.timestamp.isoformat()} is in a period that closed (before {horizon.isoformat()}: "
            f"now - allowed lateness {self.ctx.settings.allowed_lateness} - 1h) before the worker processed it",
            offset,
            record,
        )

    def _dead_letter(self, reason: RejectReason, why: str, offset: int, record: CountedRecord) -> DeadLetter:
        """A routed record the rollup stage refuses, as routed (its quantity is the one its metric read)."""
        return DeadLetter(
            reason=reason,
            message=why,
            source=SourcePosition(topic=self.topics.routed, partition=self.partition, offset=offset),
            record={
                "id": record.record_id,
                "metricKey": record.metric_key,
                "subjectType": record.subject_type,
                "subjectId": record.subject_id,
                "quantity": str(record.quantity),
                "timestamp": record.timestamp.isoformat(),
                "metadata": orjson.loads(record.metadata_json or "{}"),
            },
            occurred_at=datetime.now(UTC),
        )

    async def close(self) -> None:
        await self.writer.stop()
        for producer in (self.producer, self.alert_producer):
            with contextlib.suppress(KafkaError):
                await producer.stop()
        self.store.close()


def eviction_horizon(settings: Settings, now: datetime) -> datetime:
    """Rollups of periods that ended before this are final (and leave the state); records for them are refused."""
    return now - settings.allowed_lateness - timedelta(hours=1)


def transactional_ids(group_id: str, routed_topic: str, partition: int) -> tuple[str, str]:
    """Partition p's two producers' transactional ids (its changes and offsets; its alerts): whoever starts a producer
    with one fences the previous owner's, and aborts the transaction that owner left open."""
    name = f"{group_id}-{routed_topic}-{partition}"
    return name, f"{name}-alerts"


async def _start_producer(ctx: StageContext, transactional_id: str) -> AIOKafkaProducer:
    """A producer of one partition's; its transactional id fences the one a previous owner of it still has."""
    producer = AIOKafkaProducer(
        **ctx.settings.kafka_client_options(),
        acks="all",
        linger_ms=5,
        max_batch_size=MAX_BATCH_BYTES,
        transactional_id=transactional_id if ctx.transactional else None,
        enable_idempotence=ctx.transactional,
    )
    try:
        await producer.start()
    except KafkaError as error:
        if ctx.transactional:
            raise RuntimeError(
                "this broker refused a transactional producer (tansu does); run with "
                "METERING_PROCESSING_GUARANTEE=at_least_once, or use Apache Kafka for exactly-once"
            ) from error
        raise
    return producer


async def _unless_producer_died(producer: AIOKafkaProducer, work: Awaitable[None]) -> None:
    """Awaits `work`, or raises ProducerDied as soon as the producer's sender task has ended (then `work`,
    waiting on that producer, could never finish)."""
    sender = producer._sender.sender_task  # aiokafka keeps the sender private; its task is what we must watch
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({task, sender}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.done():
        # A cancelled transaction's abort would wait on the dead sender too: left to end with the producer.
        task.cancel()
        cause = None if sender.cancelled() else sender.exception()
        raise ProducerDied(f"the partition's Kafka producer stopped: {cause!r}") from cause
    task.result()


def _subject_key(change: RollupChange) -> bytes:
    return f"{change.key[1]}:{change.key[2]}".encode()


def aggregated_event(change: RollupChange) -> bytes:
    """The seed's usage.aggregated event: the UsageSummary as it now stands.

    The bytes `UsageAggregated(...).to_json()` writes, built without the model: this is the hot path (one per
    changed rollup per checkpoint) and validation adds nothing to values the rollups already hold exactly
    (tests/unit/test_schemas.py holds the two byte-equal over many values; the integration tests check every
    emitted event against the JSON Schema file).
    """
    metric_key, subject_type, subject_id, period, start, dimensions = change.key
    zone = ZONE_NAME[period]
    return orjson.dumps(
        {
            "type": "usage.aggregated",
            "metricKey": metric_key,
            "subjectType": subject_type,
            "subjectId": subject_id,
            "periodType": WIRE_NAME[period],
            "periodStart": _zulu(start),
            "periodEnd": _zulu(change.period_end),
            "totalQuantity": change.total_text,
            "recordCount": change.count,
            "version": change.version,
            "dimensions": dimension_map(dimensions) if dimensions else TOTAL_ROW,
            "timeZone": zone,
            "localPeriodStart": _local_start(start, zone),
        }
    )


@lru_cache(maxsize=8192)
def _local_start(start: datetime, zone_name: str) -> str:
    """`localPeriodStart`, once per period start and zone (a checkpoint's events share few)."""
    return local_period_start_text(start, zone_name)


@lru_cache(maxsize=8192)
def _zulu(at: datetime) -> str:
    """A UTC period bound as pydantic writes it (`…Z`, fractions only when there are some)."""
    return at.isoformat().replace("+00:00", "Z")
