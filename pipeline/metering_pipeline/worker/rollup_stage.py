"""The rollup stage: per routed partition, de-duplicate, roll up, alert, checkpoint.

A checkpoint of partition p, every `flush_interval` seconds, is written behind the loop by
p's `PartitionWriter` (see `checkpoints`):
1. the new usage records go to ClickHouse (idempotent: same identity, same row);
2. one Kafka transaction, by a producer whose transactional id names p (so a stale owner of
   p is fenced), carries p's changed rollups and new identities to the changelog, the
   `usage.aggregated` events, and p's consumer offset;
3. after the commit, the changed rollups go to ClickHouse as absolute values with a version.
A crash anywhere replays from the committed offset onto the state rebuilt from the
changelog, which reproduces the same rows; ClickHouse is never ahead of committed state for
rollups, and a restart re-sinks every restored rollup, so it is never behind for long either.

Alerts do not wait for checkpoints or ClickHouse: as soon as records cross a threshold, a
transaction of p's alert producer (a second transactional id naming p, so that an alert never
waits for a checkpoint's transaction to end) publishes the alerts with the markers that say they
fired, so a replay of the records does not fire them again; the loop takes its next checkpoint
only after that transaction, so no committed offset passes an alert that is not out. `alert_archive`
copies them into ClickHouse. On tansu (no transactions) `processing_guarantee=at_least_once` commits offsets
after the changelog is written instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalOperation, InvalidProducerEpoch, KafkaError, ProducerFenced

from metering_pipeline.logs import get_logger
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.rollups import (
    WIRE_NAME,
    CardinalityLimits,
    Checkpoint,
    CountedRecord,
    PartitionRollups,
    RollupChange,
    RollupKey,
)
from metering_pipeline.usage.thresholds import Alert, PartitionThresholds, ThresholdBook
from metering_pipeline.warehouse.sink import TOTAL_ROW, ClickHouseSink, dimension_map
from metering_pipeline.worker import changelog, garbage, routing
from metering_pipeline.worker.batches import KeyPartitions, PartitionBatches
from metering_pipeline.worker.checkpoints import PartitionWriter, Snapshot
from metering_pipeline.worker.stats import RollupGauges, WorkerStats
from metering_schemas import DeadLetter, RejectReason, ResetPeriod, SourcePosition

log = get_logger(__name__)
Produce = Callable[[PartitionBatches], Awaitable[None]]  # adds a transaction's messages

EVICTION_INTERVAL = 60.0  # seconds
MAX_BATCH_BYTES = 900_000  # under the broker's default message.max.bytes (1 MiB)
# Seconds revoked partitions' writers may take to commit their last checkpoints (which need their records in
# ClickHouse first); after that the next owners replay from the last commit. Short: the whole group waits meanwhile.
SETTLE_ON_REVOKE = 2.0
SETTLE_ON_STOP = 30.0


class ProducerDied(KafkaError):
    """The producer's background sender stopped with an error: every send and transaction of that producer would
    then wait forever. aiokafka lets it die on some connection errors during a broker restart
    (aio-libs/aiokafka#907)."""


# The partition's producer can no longer commit for it: the partition is released, and a new owner (often this
# worker again, with a new producer) continues from the last commit.
_RELEASE = (ProducerFenced, InvalidProducerEpoch, IllegalOperation, CommitFailedError, ProducerDied)
_PERIOD_LENGTH = [ResetPeriod.HOURLY, ResetPeriod.DAILY, ResetPeriod.MONTHLY, ResetPeriod.NEVER]


@dataclass
class OwnedPartition:
    partition: int
    state: PartitionRollups
    thresholds: PartitionThresholds
    producer: AIOKafkaProducer  # checkpoints: changelog, usage.aggregated and the consumer offset
    alert_producer: AIOKafkaProducer  # alerts and their markers
    writer: PartitionWriter
    alerts: list[Alert] = field(default_factory=list)  # decided, not yet published
    next_offset: int | None = None
    checkpoint_due: bool = False
    identity_entries: dict[bytes, datetime] = field(default_factory=dict)
    last_eviction: float = 0.0


class RollupStage:
    def __init__(
        self,
        settings: Settings,
        sink: ClickHouseSink,
        stats: WorkerStats,
        catalog: MetricCatalog,
        book: ThresholdBook,
        client_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.stats = stats
        self.catalog = catalog
        self.book = book
        self.group_id = f"{settings.consumer_group_prefix}-rollups"
        self.topics = Topics.of(settings)
        self.topic = self.topics.routed
        self.changelog_topic = self.topics.rollup_changelog
        self.transactional = settings.processing_guarantee == "exactly_once"
        self.owned: dict[int, OwnedPartition] = {}
        self.limits = CardinalityLimits(settings.max_dimension_combinations, settings.max_distinct_values)
        self._rejoin = False
        self._paused = False
        self._lock = asyncio.Lock()
        # Of usage.aggregated and alert keys, shared by the partitions' producers.
        self._key_partitions = KeyPartitions()
        self.consumer = AIOKafkaConsumer(
            **settings.kafka_client_options(),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=settings.max_poll_records,
            **settings.kafka_group_options(),
            **({"client_id": client_id} if client_id else {}),
        )
        stats.rollup_gauges = self.gauges

    def gauges(self) -> RollupGauges:
        """What /metrics reports of this stage, read when it is scraped."""
        return RollupGauges(
            buffered_records=self._buffered_records(),
            paused_partitions=len(self.consumer.paused()),
            owned_partitions=len(self.owned),
            failing_writers=sum(
                1
                for owned in self.owned.values()
                if owned.writer.failing.since is not None or owned.writer.failure() is not None
            ),
        )

    def _buffered_records(self) -> int:
        """Counted records not yet in a committed checkpoint: waiting for the writer, or for the next checkpoint."""
        return sum(owned.writer.buffered + owned.state.pending_records for owned in self.owned.values())

    def partition_count(self) -> int | None:
        """Of the routed topic, once known (subjects map to partitions by it)."""
        partitions = self.consumer.partitions_for_topic(self.topic)
        return len(partitions) if partitions else None

    async def run(self, stopping: asyncio.Event) -> None:
        await self.consumer.start()
        self.consumer.subscribe([self.topic], listener=_Listener(self))
        last_checkpoint = time.monotonic()
        try:
            while not stopping.is_set():
                if self._rejoin:
                    self._rejoin = False
                    self.consumer.unsubscribe()
                    self.consumer.subscribe([self.topic], listener=_Listener(self))
                batches = await self.consumer.getmany(timeout_ms=100, max_records=self.settings.max_poll_records)
                async with self._lock:
                    for tp, messages in batches.items():
                        self._apply(tp.partition, messages)
                    await self._publish_all_alerts()
                    if time.monotonic() - last_checkpoint >= self.settings.flush_interval:
                        for owned in self.owned.values():
                            owned.checkpoint_due = True
                        last_checkpoint = time.monotonic()
                    for owned in list(self.owned.values()):
                        if owned.checkpoint_due and not owned.writer.busy:
                            self._take_checkpoint(owned)
                    self._check_writers()
                    self._apply_backpressure()
            async with self._lock:
                for owned in list(self.owned.values()):
                    await self._publish_alerts(owned)
                    self._take_checkpoint(owned)
                await asyncio.gather(*(owned.writer.settle(SETTLE_ON_STOP) for owned in list(self.owned.values())))
        finally:
            for owned in list(self.owned.values()):
                await owned.writer.stop()
                await owned.producer.stop()
                await owned.alert_producer.stop()
            self.owned.clear()
            await self.consumer.stop()

    def _apply(self, partition: int, messages: Iterable[ConsumerRecord]) -> None:
        owned = self.owned.get(partition)
        if owned is None:  # revoked while the batch was in flight
            return
        now = datetime.now(UTC)
        touched: set[RollupKey] = set()
        closed_before = self._eviction_horizon(now)
        oldest = now.timestamp()  # publish time of the batch's oldest usage (a clock ahead of this one counts as now)
        for message in messages:
            counted, duplicates = owned.state.apply(
                routing.decode(message.value), message.offset, now, touched, closed_before
            )
            self.stats.counted += counted
            self.stats.duplicates += duplicates
            owned.next_offset = message.offset + 1
            oldest = min(oldest, routing.published_at(message))
        self.stats.record_age_seconds.observe(now.timestamp() - oldest)
        owned.alerts += [
            replace(alert, usage_published_at=oldest) for alert in owned.thresholds.after_records(touched, now)
        ]
        highwater = self.consumer.highwater(TopicPartition(self.topic, partition))
        if highwater is not None and owned.next_offset is not None:
            self.stats.lag[f"rollups/{partition}"] = highwater - owned.next_offset

    def _take_checkpoint(self, owned: OwnedPartition) -> None:
        """Due checkpoints wait for the writer to finish the last one, growing meanwhile instead of queueing: under
        load (or while ClickHouse is down) checkpoints get fewer and larger as writes get slower."""
        owned.checkpoint_due = False
        checkpoint = owned.state.checkpoint()
        expired = self._expired_identity_entries(owned)
        expired += self._evicted_rollup_entries(owned, checkpoint)
        if owned.next_offset is not None and (not checkpoint.is_empty() or expired):
            owned.writer.submit(Snapshot(owned.next_offset, checkpoint, expired))

    def _check_writers(self) -> None:
        """A writer fenced by another worker (this one was slow to notice a rebalance), or whose producer died,
        releases its partition: its uncommitted checkpoints are dropped, never written, and the new owner
        continues from the last commit. Any other failure stops the stage (the process restarts and replays)."""
        for owned in list(self.owned.values()):
            error = owned.writer.failure()
            if error is None:
                continue
            if not isinstance(error, _RELEASE):
                raise error
            self._release(owned, error)

    def _release(self, owned: OwnedPartition, error: BaseException) -> None:
        why = "its producer died" if isinstance(error, ProducerDied) else "taken over by another worker"
        log.warning(f"partition {why}; releasing it", partition=owned.partition, error=str(error))
        self.owned.pop(owned.partition, None)
        asyncio.create_task(self._close(owned))
        if TopicPartition(self.topic, owned.partition) in self.consumer.assignment():
            self._rejoin = True  # still assigned here: only a fresh rebalance settles who owns it

    @staticmethod
    async def _close(owned: OwnedPartition) -> None:
        await owned.writer.stop()
        for producer in (owned.producer, owned.alert_producer):
            with contextlib.suppress(KafkaError):
                await producer.stop()

    def _apply_backpressure(self) -> None:
        """Stop fetching while the writers hold too many records (ClickHouse slow or down); resume at half."""
        buffered = self._buffered_records()
        limit = self.settings.max_buffered_records
        pause = buffered >= limit or (self._paused and buffered >= limit // 2)
        if pause:
            self.consumer.pause(*self.consumer.assignment())  # again each time: a rebalance may have added partitions
            if not self._paused:
                log.warning("pausing consumption until ClickHouse catches up", buffered_records=buffered, limit=limit)
        elif self._paused:
            self.consumer.resume(*self.consumer.assignment())
            log.info("resuming consumption", buffered_records=buffered)
        self._paused = pause

    async def _publish_all_alerts(self) -> None:
        """Every partition's alerts at once: each partition has a producer (and transaction) of its own, and one
        transaction after another would make the last partition's alerts wait for all the others'."""
        await asyncio.gather(*(self._publish_alerts(owned) for owned in list(self.owned.values())))

    async def _publish_alerts(self, owned: OwnedPartition) -> None:
        """Alerts go out at once, with the markers that stop a replay from firing them again."""
        if owned.thresholds.pending_changes():
            owned.alerts += owned.thresholds.after_threshold_changes(datetime.now(UTC))
        if not (owned.alerts or owned.thresholds.watch.has_changes()):
            return
        markers = owned.thresholds.watch.checkpoint()
        alerts, owned.alerts = owned.alerts, []

        async def produce(batches: PartitionBatches) -> None:
            for marker_key, marker in markers:
                await batches.add(self.changelog_topic, *changelog.marker_entry(marker_key, marker), owned.partition)
            for alert in alerts:
                await batches.add(
                    self.topics.alerts, f"{alert.subject_type}:{alert.subject_id}".encode(), alert.to_event().to_json()
                )

        try:
            await self._in_transaction(owned.alert_producer, owned.partition, produce)
        except _RELEASE as error:
            self._release(owned, error)
            return
        self.stats.alerts += len(alerts)
        committed = time.time()
        for alert in alerts:
            if alert.usage_published_at is not None:
                self.stats.alert_latency_seconds.observe(committed - alert.usage_published_at)

    async def _in_transaction(
        self, producer: AIOKafkaProducer, partition: int, produce: Produce, offset: int | None = None
    ) -> None:
        """Produce with one of p's producers, atomically with p's consumer offset when one is given."""
        await _unless_producer_died(producer, self._produce_and_commit(producer, partition, produce, offset))

    async def _produce_and_commit(
        self, producer: AIOKafkaProducer, partition: int, produce: Produce, offset: int | None
    ) -> None:
        batches = PartitionBatches(producer, self._key_partitions)
        offsets = {} if offset is None else {TopicPartition(self.topic, partition): offset}
        if self.transactional:
            async with producer.transaction():
                await produce(batches)
                await batches.flush()
                if offsets:
                    await producer.send_offsets_to_transaction(offsets, self.group_id)
        else:
            await produce(batches)
            await batches.flush()
            await producer.flush()
            if offsets:
                await self.consumer.commit(offsets)

    async def _commit(self, owned: OwnedPartition, snapshot: Snapshot) -> None:
        checkpoint, partition = snapshot.changes, owned.partition

        async def produce(batches: PartitionBatches) -> None:
            rollups = checkpoint.rollups
            await batches.add_all(self.changelog_topic, map(changelog.rollup_entry, rollups), partition)
            if checkpoint.distinct:
                await batches.add_all(self.changelog_topic, changelog.distinct_entries(checkpoint.distinct), partition)
            await batches.add_all(
                self.topics.usage_aggregated,
                ((_subject_key(change), aggregated_event(change)) for change in rollups if change.reported),
            )
            if checkpoint.identities:
                newest = max(at for _, at in checkpoint.identities)
                entries = changelog.identities_entries(snapshot.offset, checkpoint.identities)
                owned.identity_entries.update((key, newest) for key, _ in entries)
                await batches.add_all(self.changelog_topic, entries, partition)
            await batches.add_all(self.changelog_topic, ((key, None) for key in snapshot.expired), partition)
            letters = [
                *(self._closed_dead_letter(offset, record, partition) for offset, record in checkpoint.closed),
                *(
                    self._dead_letter(RejectReason.CARDINALITY_LIMIT, why, offset, record, partition)
                    for offset, record, why in checkpoint.limited
                ),
            ]
            if letters:
                await batches.add_all(
                    self.topics.dead_letters,
                    (
                        (f"{letter.record['subjectType']}:{letter.record['subjectId']}".encode(), letter.to_json())
                        for letter in letters
                    ),
                )

        await self._in_transaction(owned.producer, partition, produce, snapshot.offset)
        self.stats.dead_letters[RejectReason.TOO_LATE.value] += len(checkpoint.closed)
        self.stats.dead_letters[RejectReason.CARDINALITY_LIMIT.value] += len(checkpoint.limited)

    def _evicted_rollup_entries(self, owned: OwnedPartition, checkpoint: Checkpoint) -> list[bytes]:
        """Once a minute: rollups past the allowed lateness leave memory and the changelog (they can no longer
        change); the changelog keeps those not yet in ClickHouse, so that a restart writes them again."""
        if time.monotonic() - owned.last_eviction < EVICTION_INTERVAL:
            return []
        owned.last_eviction = time.monotonic()
        horizon = self._eviction_horizon(datetime.now(UTC))
        owned.thresholds.watch.evict_before(horizon, self._threshold_period)
        unsettled = owned.writer.unsettled_keys().union(change.key for change in checkpoint.rollups)
        return [
            entry
            for key, rollup in owned.state.evict_before(horizon)
            if key not in unsettled
            for entry in changelog.evicted_entries(key, rollup)
        ]

    def _eviction_horizon(self, now: datetime) -> datetime:
        """Rollups of periods that ended before this are final (and leave memory); records for them are refused."""
        return now - self.settings.allowed_lateness - timedelta(hours=1)

    def _threshold_period(self, threshold_id: str) -> ResetPeriod | None:
        threshold = self.book.get(threshold_id)
        definitions = [d for d in self.catalog.definitions() if threshold and d.key == threshold.metric_key]
        return max(
            (d.reset_period for d in definitions), key=_PERIOD_LENGTH.index, default=None
        )  # the longest: never too early

    def _expired_identity_entries(self, owned: OwnedPartition) -> list[bytes]:
        horizon = datetime.now(UTC) - self.settings.dedup_window
        owned.state.dedup.expire(datetime.now(UTC))
        expired = [key for key, newest in owned.identity_entries.items() if newest < horizon]
        for key in expired:
            del owned.identity_entries[key]
        return expired

    def _closed_dead_letter(self, offset: int, record: CountedRecord, partition: int) -> DeadLetter:
        horizon = self._eviction_horizon(datetime.now(UTC))
        return self._dead_letter(
            RejectReason.TOO_LATE,
            f"timestamp {record.timestamp.isoformat()} is in a period that closed (before {horizon.isoformat()}: "
            f"now - allowed lateness {self.settings.allowed_lateness} - 1h) before the worker processed it",
            offset,
            record,
            partition,
        )

    def _dead_letter(
        self, reason: RejectReason, why: str, offset: int, record: CountedRecord, partition: int
    ) -> DeadLetter:
        """A routed record the rollup stage refuses, as routed (its quantity is the one its metric read)."""
        timestamp = record.timestamp
        return DeadLetter(
            reason=reason,
            message=why,
            source=SourcePosition(topic=self.topic, partition=partition, offset=offset),
            record={
                "id": record.record_id,
                "metricKey": record.metric_key,
                "subjectType": record.subject_type,
                "subjectId": record.subject_id,
                "quantity": str(record.quantity),
                "timestamp": timestamp.isoformat(),
                "metadata": orjson.loads(record.metadata_json or "{}"),
            },
            occurred_at=datetime.now(UTC),
        )

    async def assign(self, partitions: Iterable[int]) -> None:
        async with self._lock:
            for partition in partitions:
                if partition in self.owned:
                    continue
                producer = await self._start_producer(f"{self.group_id}-{self.topic}-{partition}")
                try:
                    alert_producer = await self._start_producer(f"{self.group_id}-{self.topic}-{partition}-alerts")
                except BaseException:
                    await producer.stop()
                    raise
                restored = await self._restore(partition)
                state = PartitionRollups(self.settings.dedup_window, self.limits)
                state.restore(restored.rollups.items(), restored.identities)
                # seen_changes starts at 0: every threshold in force is checked against the restored state.
                thresholds = PartitionThresholds(
                    state, self.book, self.catalog, self.settings.threshold_approaching_fraction
                )
                thresholds.watch.restore(restored.markers.items())
                owned = self._own(partition, state, thresholds, (producer, alert_producer), restored.identity_entries)
                owned.writer.resink([RollupChange.of(key, rollup) for key, rollup in restored.rollups.items()])
                log.info(
                    "partition assigned",
                    stage="rollups",
                    partition=partition,
                    rollups=len(restored.rollups),
                    identities=len(restored.identities),
                )
            garbage.freeze_survivors()

    async def _start_producer(self, transactional_id: str) -> AIOKafkaProducer:
        """A producer of one partition's; its transactional id fences the one a previous owner of it still has."""
        producer = AIOKafkaProducer(
            **self.settings.kafka_client_options(),
            acks="all",
            linger_ms=5,
            max_batch_size=MAX_BATCH_BYTES,
            transactional_id=transactional_id if self.transactional else None,
            enable_idempotence=self.transactional,
        )
        try:
            await producer.start()
        except KafkaError as error:
            if self.transactional:
                raise RuntimeError(
                    "this broker refused a transactional producer (tansu does); run with "
                    "METERING_PROCESSING_GUARANTEE=at_least_once, or use Apache Kafka for exactly-once"
                ) from error
            raise
        return producer

    def _own(
        self,
        partition: int,
        state: PartitionRollups,
        thresholds: PartitionThresholds,
        producers: tuple[AIOKafkaProducer, AIOKafkaProducer],
        identity_entries: dict[bytes, datetime],
    ) -> OwnedPartition:
        async def commit(snapshot: Snapshot) -> None:
            await self._commit(owned, snapshot)

        owned = OwnedPartition(
            partition,
            state,
            thresholds,
            *producers,
            PartitionWriter(self.sink, commit, self.stats),
            identity_entries=identity_entries,
        )
        self.owned[partition] = owned
        return owned

    async def revoke(self, partitions: Iterable[int]) -> None:
        """The whole group waits until this worker gives its partitions up: they are handed over all at once, and
        their entitlement checks answered until they are gone."""
        async with self._lock:
            revoked = [owned for partition in partitions if (owned := self.owned.get(partition)) is not None]
            await asyncio.gather(*(self._hand_over(owned) for owned in revoked))
            for owned in revoked:
                self.owned.pop(owned.partition, None)
                await self._close(owned)
                log.info("partition revoked", stage="rollups", partition=owned.partition)

    async def _hand_over(self, owned: OwnedPartition) -> None:
        """Alerts out, and the last checkpoint committed if its records reach ClickHouse within SETTLE_ON_REVOKE;
        never a wait for its rollups (the next owner restores them from the changelog and writes them again)."""
        try:
            await self._publish_alerts(owned)
            self._take_checkpoint(owned)
            if not await owned.writer.settle(SETTLE_ON_REVOKE, rollups=False):
                log.warning(
                    "checkpoint on revoke not written; the next owner replays",
                    partition=owned.partition,
                    error=str(owned.writer.failure() or "timed out"),
                )
        except Exception as error:  # noqa: BLE001 - the next owner replays from the last commit
            log.warning("checkpoint on revoke failed", partition=owned.partition, error=str(error))

    async def _restore(self, partition: int) -> changelog.RestoredState:
        """Read partition `partition` of the changelog from its start to its current end."""
        reader = AIOKafkaConsumer(
            **self.settings.kafka_client_options(), enable_auto_commit=False, isolation_level="read_committed"
        )
        await reader.start()
        try:
            tp = TopicPartition(self.changelog_topic, partition)
            reader.assign([tp])
            await reader.seek_to_beginning(tp)
            end = (await reader.end_offsets([tp]))[tp]
            entries: list[tuple[bytes, bytes | None]] = []
            while await reader.position(tp) < end:
                batch = await reader.getmany(tp, timeout_ms=500, max_records=50_000)
                entries.extend((m.key, m.value) for m in batch.get(tp, []))
            return changelog.restore(entries)
        finally:
            await reader.stop()


class _Listener(ConsumerRebalanceListener):
    def __init__(self, stage: RollupStage) -> None:
        self.stage = stage

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.stage.revoke(tp.partition for tp in revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.stage.assign(tp.partition for tp in assigned)


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
        }
    )


@lru_cache(maxsize=8192)
def _zulu(at: datetime) -> str:
    """A UTC period bound as pydantic writes it (`…Z`, fractions only when there are some)."""
    return at.isoformat().replace("+00:00", "Z")
