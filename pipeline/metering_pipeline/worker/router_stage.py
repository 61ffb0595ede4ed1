"""The router stage: read `usage.recorded`, admit or dead-letter each record, route by subject.

Stateless and at-least-once: offsets are committed after the routed batches and dead
letters are acknowledged. A replay re-sends records with the same identities (a record's
id, or its deterministic source position), which the rollup stage de-duplicates.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from metering_pipeline.logs import get_logger
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics, router_group
from metering_pipeline.usage.intake import IntakeRules, Message, read_message
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.routed_record import AcceptedRecord
from metering_pipeline.usage.subject_zones import SubjectZones
from metering_pipeline.worker import routing
from metering_pipeline.worker.stats import WorkerStats

log = get_logger(__name__)
ROUTER_FETCH_BYTES = 4 << 20
# Records decoded per poll. Fetch bytes do not bound them: a producer's compressed batch envelopes carry ten times
# their size in records, and a poll's records are all in RAM (decoded, then routed) until it is sent.
ROUTER_POLL_RECORDS = 25_000


class RouterStage:
    def __init__(
        self,
        settings: Settings,
        catalog: MetricCatalog,
        zones: SubjectZones,
        stats: WorkerStats,
        held: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.zones = zones  # each record's zone is decided here, once: the routed record carries it
        # While this is true (the worker's rollup stage has stayed paused by backpressure) the router reads nothing: the
        # backlog waits in usage.recorded, whose retention the operator sizes, not in the routed topic's 7 days.
        self.held = held
        self.catalog = catalog
        self.stats = stats
        self.rules = IntakeRules(settings.allowed_lateness, settings.future_skew)
        self.topics = Topics.of(settings)
        self.consumer = AIOKafkaConsumer(
            self.topics.usage_recorded,
            **settings.kafka_client_options(),
            group_id=router_group(settings),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.max_poll_records,
            # What one fetch holds, compressed as the producer sent it (Kafka's 50 MiB would be millions of records);
            # the records decoded per poll are bounded apart from it (PollSize).
            fetch_max_bytes=ROUTER_FETCH_BYTES,
            **settings.kafka_group_options(),
        )
        self.producer = AIOKafkaProducer(
            **settings.kafka_client_options(),
            acks="all",
            linger_ms=5,
            max_batch_size=1024 * 1024,
            enable_idempotence=settings.processing_guarantee == "exactly_once",
        )

    async def run(self, stopping: asyncio.Event) -> None:
        """Routes one poll while the previous one is acknowledged and committed (at most one in flight, committed in
        order): waiting for the broker's acks before reading on left the router idle for a round trip per poll."""
        await self.producer.start()
        await self.consumer.start()
        in_flight: asyncio.Task[None] | None = None
        poll = PollSize(self.settings.max_poll_records)
        try:
            partitions = await self._routed_partitions()
            holding = False
            while not stopping.is_set():
                if self.held():
                    self.consumer.pause(*self.consumer.assignment())  # again each time: a rebalance may add some
                    if not holding:
                        log.warning("router holding: new usage waits in its topic until ClickHouse catches up")
                    holding = True
                elif holding:
                    self.consumer.resume(*self.consumer.assignment())
                    log.info("router routing again")
                    holding = False
                batches = await self.consumer.getmany(timeout_ms=100, max_records=poll.messages)
                if batches:
                    sends, offsets, records = await self._route(batches, partitions)
                    poll.observe(sum(len(messages) for messages in batches.values()), records)
                    if in_flight is not None:
                        await in_flight
                    in_flight = asyncio.create_task(self._acknowledge(sends, offsets))
            if in_flight is not None:
                await in_flight
        finally:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()
            await self.consumer.stop()
            await self.producer.stop()

    async def _routed_partitions(self) -> routing.SubjectPartitions:
        return routing.SubjectPartitions(len(await self.producer.partitions_for(self.topics.routed)))

    async def _route(
        self, batches: dict[TopicPartition, list[ConsumerRecord]], partitions: routing.SubjectPartitions
    ) -> tuple[list[asyncio.Future[Any]], dict[TopicPartition, int], int]:
        """Sends the poll's routed batches and dead letters; returns their acknowledgements, the offsets to commit
        once they are all acknowledged, and how many records the poll held."""
        by_partition: dict[int, list[AcceptedRecord]] = defaultdict(list)
        sends: list[asyncio.Future[Any]] = []
        offsets: dict[TopicPartition, int] = {}
        # Record age and alert latency are measured from the oldest message of the poll (one header per routed message).
        published = routing.published_headers(min(m.timestamp for messages in batches.values() for m in messages))
        times: dict[int, datetime] = {}  # a poll's messages share few distinct milliseconds
        accepted_count = rejected_count = filtered_count = 0
        catalog, rules, assign = self.catalog, self.rules, partitions.of
        stamp = self.zones.stamp if self.zones.any_zoned else None
        for tp, messages in batches.items():
            topic, source_partition = tp.topic, tp.partition
            for kafka_message in messages:
                at = times.get(kafka_message.timestamp)
                if at is None:
                    at = times[kafka_message.timestamp] = datetime.fromtimestamp(kafka_message.timestamp / 1000, tz=UTC)
                message = Message(
                    topic, source_partition, kafka_message.offset, at, kafka_message.key, kafka_message.value
                )
                accepted, rejected, filtered = read_message(message, catalog, rules)
                accepted_count += len(accepted)
                filtered_count += filtered
                if stamp is not None:
                    stamp(accepted)
                for record in accepted:
                    by_partition[assign(record.subject_type, record.subject_id)].append(record)
                for dead_letter in rejected:
                    rejected_count += 1
                    self.stats.dead_letters[dead_letter.reason.value] += 1
                    sends.append(
                        await self.producer.send(self.topics.dead_letters, dead_letter.to_json(), key=kafka_message.key)
                    )
            offsets[TopicPartition(tp.topic, tp.partition)] = messages[-1].offset + 1
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                self.stats.lag[f"router/{tp.partition}"] = highwater - messages[-1].offset - 1
        self.stats.records_in += accepted_count + rejected_count + filtered_count
        self.stats.accepted += accepted_count
        self.stats.filtered += filtered_count
        for partition, records in by_partition.items():
            for chunk in routing.batches(records):
                sends.append(
                    await self.producer.send(
                        self.topics.routed, routing.encode(chunk), partition=partition, headers=published
                    )
                )
        return sends, offsets, accepted_count + rejected_count + filtered_count

    async def _acknowledge(self, sends: list[asyncio.Future[Any]], offsets: dict[TopicPartition, int]) -> None:
        await asyncio.gather(*sends)
        await self._commit(offsets)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Commit what was routed, for the partitions still ours. A partition lost to a rebalance
        meanwhile is replayed by its new owner from the last commit: the rollup stage drops the
        re-routed copies by identity, so this costs time, not exactness."""
        owned = self.consumer.assignment()
        mine = {tp: offset for tp, offset in offsets.items() if tp in owned}
        if len(mine) < len(offsets):
            log.info(
                "partitions revoked while routing; their new owner replays them",
                partitions=sorted(tp.partition for tp in offsets.keys() - mine.keys()),
            )
        if not mine:
            return
        try:
            await self.consumer.commit(mine)
        except (CommitFailedError, IllegalStateError) as error:
            log.warning("router commit refused by a rebalance; the new owner replays", error=str(error))


class PollSize:
    """Messages to ask for per poll so that a poll holds about ROUTER_POLL_RECORDS records, from the records per
    message of the last poll: producers send one record per message or envelopes of thousands."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.messages = most

    def observe(self, messages: int, records: int) -> None:
        per_message = max(1, -(-records // max(1, messages)))
        self.messages = max(1, min(self.most, ROUTER_POLL_RECORDS // per_message))
