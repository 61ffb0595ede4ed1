"""The rollup stage: consumes the routed topic and runs each owned partition (see `rollup_partition`).

The stage owns the consumer loop, the rebalance listener and backpressure. A partition assigned
to this worker restores its state store in a task of its own with its input paused; the rebalance
callback only starts that task, so the group never waits on a restore, and the other partitions
go on counting and alerting meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalOperation, InvalidProducerEpoch, ProducerFenced

from metering_pipeline.logs import get_logger
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics, rollup_group
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.subject_zones import SubjectZones
from metering_pipeline.usage.thresholds import ThresholdBook
from metering_pipeline.warehouse.sink import ClickHouseSink
from metering_pipeline.worker import garbage
from metering_pipeline.worker.checkpoints import checkpoint_due
from metering_pipeline.worker.restoration import Restoration
from metering_pipeline.worker.rollup_partition import (
    CACHED_ROLLUP_BYTES,
    ProducerDied,
    RollupPartition,
    StageContext,
    eviction_horizon,
)
from metering_pipeline.worker.state_store import StoreResources
from metering_pipeline.worker.stats import RollupGauges, WorkerStats

log = get_logger(__name__)

# Seconds revoked partitions' writers may take to commit their last checkpoints (which need their records in
# ClickHouse first); after that the next owners replay from the last commit. Short: the whole group waits meanwhile.
SETTLE_ON_REVOKE = 2.0
SETTLE_ON_STOP = 30.0
# Shares of METERING_STATE_CACHE_MB: rollups cached in RAM, RocksDB's block cache, RocksDB's write buffers.
CACHE_SHARE, BLOCK_CACHE_SHARE, WRITE_BUFFER_SHARE = 0.5, 0.25, 0.25
# Seconds of continuous backpressure after which the router holds too: longer than the sub-second pauses of a
# backlog meeting a healthy ClickHouse, far shorter than the routed topic's retention.
ROUTER_HOLD_AFTER_SECONDS = 5.0

# The partition's producer can no longer commit for it: the partition is released, and a new owner (often this
# worker again, with a new producer) continues from the last commit.
_RELEASE = (ProducerFenced, InvalidProducerEpoch, IllegalOperation, CommitFailedError, ProducerDied)


class RollupStage:
    def __init__(
        self,
        settings: Settings,
        sink: ClickHouseSink,
        stats: WorkerStats,
        catalog: MetricCatalog,
        book: ThresholdBook,
        client_id: str | None = None,
        zones: SubjectZones | None = None,
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.group_id = rollup_group(settings)
        self.topic = Topics.of(settings).routed
        self.owned: dict[int, RollupPartition] = {}
        self.restoring: dict[int, Restoration] = {}  # assigned, state not yet restored
        self._restores: dict[int, asyncio.Task[RollupPartition]] = {}
        self._closing: dict[int, asyncio.Task[None]] = {}  # released partitions: their store is still open
        self._rejoin = False
        self._paused_since: float | None = None  # monotonic time backpressure paused consumption
        self._lock = asyncio.Lock()
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
        budget = settings.state_cache_mb << 20
        self.cache_entries = int(budget * CACHE_SHARE) // CACHED_ROLLUP_BYTES
        self.ctx = StageContext(
            settings,
            sink,
            stats,
            catalog,
            book,
            self.consumer,
            self.group_id,
            StoreResources.of_size(int(budget * BLOCK_CACHE_SHARE), int(budget * WRITE_BUFFER_SHARE)),
            zones=zones,
        )
        stats.rollup_gauges = self.gauges

    def gauges(self) -> RollupGauges:
        """What /metrics reports of this stage, read when it is scraped."""
        return RollupGauges(
            buffered_records=self._buffered_records(),
            paused_partitions=sum(1 for tp in self.consumer.paused() if tp.partition not in self.restoring),
            owned_partitions=len(self.owned),
            failing_writers=sum(
                1
                for owned in self.owned.values()
                if owned.writer.failing.since is not None or owned.writer.failure() is not None
            ),
            restoring_partitions=len(self.restoring),
            restored_entries=self.stats.restored_entries + sum(r.entries for r in self.restoring.values()),
            router_holding=self.backpressured(),
        )

    def _buffered_records(self) -> int:
        """Counted records not yet committed with their rollups in ClickHouse: waiting for the next checkpoint, or in
        the writer (what RAM holds until the state store has them)."""
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
                    await self._adopt_restored()
                    now = datetime.now(UTC)
                    closed_before = eviction_horizon(self.settings, now)
                    room = self.settings.max_buffered_records - self._buffered_records()
                    for tp, messages in batches.items():
                        room = self._apply(tp, messages, now, closed_before, room)
                    await self._publish_all_alerts()
                    for owned in self.owned.values():
                        owned.store_committed(time.monotonic())
                    # Of partitions that can take one now: a writer still busy would only make the others' tiny.
                    pending = sum(o.state.pending_records for o in self.owned.values() if not o.writer.busy)
                    if checkpoint_due(time.monotonic() - last_checkpoint, pending, self.settings):
                        for owned in self.owned.values():
                            owned.checkpoint_due = True
                        last_checkpoint = time.monotonic()
                    for owned in list(self.owned.values()):
                        if owned.checkpoint_due and not owned.writer.busy:
                            owned.take_checkpoint()
                    self._check_writers()
                    self._apply_backpressure()
            async with self._lock:
                for owned in list(self.owned.values()):
                    await self._publish_alerts(owned)
                    owned.take_checkpoint()
                await asyncio.gather(*(owned.writer.settle(SETTLE_ON_STOP) for owned in list(self.owned.values())))
                for owned in self.owned.values():
                    owned.store_committed(time.monotonic(), force=True)
        finally:
            for task in self._restores.values():
                task.cancel()
            for owned in list(self.owned.values()):
                await owned.close()
            self.owned.clear()
            await self.consumer.stop()

    def _apply(
        self, tp: TopicPartition, messages: list[ConsumerRecord], now: datetime, closed_before: datetime, room: int
    ) -> int:
        """Counts the messages while `room` (records under METERING_MAX_BUFFERED_RECORDS) lasts; returns what is left.
        One poll brings up to a fetch of every partition, hundreds of thousands of records when messages carry many:
        the messages past the bound are read again after the pause, so RAM holds the bound and one message more."""
        owned = self.owned.get(tp.partition)
        if owned is None:
            if tp.partition in self.restoring and messages:  # fetched before the pause: read again once restored
                self.consumer.seek(tp, messages[0].offset)
            return room  # or revoked while the batch was in flight
        room, unread = owned.apply(messages, now, closed_before, room)
        if unread is not None:
            self.consumer.seek(tp, unread)
        highwater = self.consumer.highwater(tp)
        if highwater is not None and owned.next_offset is not None:
            self.stats.lag[f"rollups/{tp.partition}"] = highwater - owned.next_offset
        return room

    async def _adopt_restored(self) -> None:
        """Partitions whose restore finished start consuming; a restore that failed stops the stage."""
        self._closing = {partition: task for partition, task in self._closing.items() if not task.done()}
        for partition, task in list(self._restores.items()):
            if not task.done():
                continue
            del self._restores[partition]
            progress = self.restoring.pop(partition)
            owned = task.result()  # a failed restore raises here: the process restarts and tries again
            self.stats.restored_entries += progress.entries
            self.owned[partition] = owned
            if self._paused_since is None:
                self.consumer.resume(TopicPartition(self.topic, partition))
            log.info("partition assigned", stage="rollups", partition=partition, restored_entries=progress.entries)
            garbage.freeze_survivors()

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

    def _release(self, owned: RollupPartition, error: BaseException) -> None:
        why = "its producer died" if isinstance(error, ProducerDied) else "taken over by another worker"
        log.warning(f"partition {why}; releasing it", partition=owned.partition, error=str(error))
        self.owned.pop(owned.partition, None)
        self._closing[owned.partition] = asyncio.create_task(owned.close())
        if TopicPartition(self.topic, owned.partition) in self.consumer.assignment():
            self._rejoin = True  # still assigned here: only a fresh rebalance settles who owns it

    def backpressured(self) -> bool:
        """Consumption has stayed paused for ROUTER_HOLD_AFTER_SECONDS: ClickHouse is down, not merely behind.
        Under a backlog the stage pauses and resumes many times a second; holding the router on each of those
        pauses would stop the routed topic from running ahead and slow the whole backlog down."""
        return self._paused_since is not None and time.monotonic() - self._paused_since >= ROUTER_HOLD_AFTER_SECONDS

    def _apply_backpressure(self) -> None:
        """Stop fetching while the writers hold too many records (ClickHouse slow or down); resume at half."""
        buffered = self._buffered_records()
        limit = self.settings.max_buffered_records
        paused = self._paused_since is not None
        if buffered >= limit or (paused and buffered >= limit // 2):
            self.consumer.pause(*self.consumer.assignment())  # again each time: a rebalance may have added partitions
            if not paused:
                log.warning("pausing consumption until ClickHouse catches up", buffered_records=buffered, limit=limit)
                self._paused_since = time.monotonic()
        elif paused:
            self.consumer.resume(*(tp for tp in self.consumer.assignment() if tp.partition not in self.restoring))
            log.info("resuming consumption", buffered_records=buffered)
            self._paused_since = None

    async def _publish_all_alerts(self) -> None:
        """Every partition's alerts at once: each partition has a producer (and transaction) of its own, and one
        transaction after another would make the last partition's alerts wait for all the others'."""
        await asyncio.gather(*(self._publish_alerts(owned) for owned in list(self.owned.values())))

    async def _publish_alerts(self, owned: RollupPartition) -> None:
        try:
            await owned.publish_alerts()
        except _RELEASE as error:
            self._release(owned, error)

    async def assign(self, partitions: Iterable[int]) -> None:
        """Only starts each new partition's restore, its input paused until it is done."""
        async with self._lock:
            assigned = list(partitions)
            capacity = self.cache_entries // max(1, len(self.consumer.assignment()), len(assigned))
            for partition in assigned:
                if partition in self.owned or partition in self._restores:
                    continue
                self.consumer.pause(TopicPartition(self.topic, partition))
                progress = self.restoring[partition] = Restoration(partition)
                self._restores[partition] = asyncio.create_task(self._start(partition, progress, capacity))

    async def _start(self, partition: int, progress: Restoration, capacity: int) -> RollupPartition:
        closing = self._closing.pop(partition, None)
        if closing is not None:  # released here a moment ago: its store must be closed before it opens again
            await closing
        return await RollupPartition.start(self.ctx, partition, progress, capacity)

    async def revoke(self, partitions: Iterable[int]) -> None:
        """The whole group waits until this worker gives its partitions up: they are handed over all at once, and
        their entitlement checks answered until they are gone."""
        async with self._lock:
            revoked = list(partitions)
            for partition in revoked:
                await self._abandon_restore(partition)
            handed = [owned for partition in revoked if (owned := self.owned.get(partition)) is not None]
            await asyncio.gather(*(self._hand_over(owned) for owned in handed))
            for owned in handed:
                self.owned.pop(owned.partition, None)
                await owned.close()
                log.info("partition revoked", stage="rollups", partition=owned.partition)

    async def _abandon_restore(self, partition: int) -> None:
        task = self._restores.pop(partition, None)
        self.restoring.pop(partition, None)
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(BaseException):
            owned = await task
            await owned.close()  # it finished just before it was cancelled

    async def _hand_over(self, owned: RollupPartition) -> None:
        """Alerts out, and the last checkpoint committed if its records reach ClickHouse within SETTLE_ON_REVOKE;
        never a wait for its rollups (the next owner restores them from the changelog and writes them again)."""
        try:
            await owned.publish_alerts()
            owned.take_checkpoint()
            if not await owned.writer.settle(SETTLE_ON_REVOKE, rollups=False):
                log.warning(
                    "checkpoint on revoke not written; the next owner replays",
                    partition=owned.partition,
                    error=str(owned.writer.failure() or "timed out"),
                )
            owned.store_committed(time.monotonic(), force=True)
        except Exception as error:  # noqa: BLE001 - the next owner replays from the last commit
            log.warning("checkpoint on revoke failed", partition=owned.partition, error=str(error))


class _Listener(ConsumerRebalanceListener):
    def __init__(self, stage: RollupStage) -> None:
        self.stage = stage

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.stage.revoke(tp.partition for tp in revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self.stage.assign(tp.partition for tp in assigned)
