"""Has the pipeline processed every usage record that can still land in a closed period?

An invoice may turn FINAL only when no record it should count is still on its way: every message on
`usage.recorded` with a Kafka time before the period's close (end + allowed lateness) has been routed
by the worker group's router, and everything routed so far has been flushed by its rollup stage (whose
commit is transactional with the ClickHouse write). Read straight from the consumer groups' committed
offsets, so it holds for any number of workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics, partitions_of, rollup_group, router_group


async def processed_through(settings: Settings, close: datetime, wait: float = 5.0) -> bool:
    """True once both groups have consumed what they must; waits up to `wait` seconds for their next commits
    (workers commit every flush interval), so it also answers True under steady traffic."""
    topics = Topics.of(settings)
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    consumer = AIOKafkaConsumer(
        **settings.kafka_client_options(),
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await admin.start()
    await consumer.start()
    try:
        close_ms = int(close.timestamp() * 1000)
        router = _Group(admin, consumer, topics.usage_recorded, router_group(settings))
        rollups = _Group(admin, consumer, topics.routed, rollup_group(settings))
        deadline = asyncio.get_running_loop().time() + wait
        for group, counts in ((router, lambda timestamp: timestamp < close_ms), (rollups, lambda timestamp: True)):
            targets = await group.end_offsets()  # what was routed by now: the rollups must get that far
            while await group.pending(targets, counts):
                if asyncio.get_running_loop().time() >= deadline:
                    return False
                await asyncio.sleep(0.5)
        return True
    finally:
        await consumer.stop()
        await admin.close()


class _Group:
    def __init__(self, admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer, topic: str, group: str) -> None:
        self.admin = admin
        self.consumer = consumer
        self.topic = topic
        self.group = group

    async def end_offsets(self) -> dict[TopicPartition, int]:
        ids = await partitions_of(self.consumer, self.topic)
        partitions = [TopicPartition(self.topic, p) for p in sorted(ids or ())]
        return await self.consumer.end_offsets(partitions) if partitions else {}

    async def pending(self, targets: dict[TopicPartition, int], counts: Callable[[int], bool]) -> bool:
        """Whether a message below `targets` that `counts` (by its timestamp) is not yet consumed by the group.

        Reads from the committed offsets up to the targets: offsets alone cannot tell data from the
        transaction markers that follow it.
        """
        if not targets:
            return False
        committed = await self.admin.list_consumer_group_offsets(self.group, partitions=list(targets))
        starts = {tp: committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0 for tp in targets}
        remaining = {tp for tp, target in targets.items() if starts[tp] < target}
        if not remaining:
            return False
        # Only partitions with a position of their own: an assigned partition left without one makes aiokafka's
        # fetcher wait for a committed offset this group-less consumer never gets, and consumer.stop() then hangs.
        self.consumer.assign(sorted(remaining))
        for tp in remaining:
            self.consumer.seek(tp, starts[tp])
        idle_rounds = 0
        while remaining and idle_rounds < 3:  # three empty fetches: only transaction markers are left
            batches = await self.consumer.getmany(*remaining, timeout_ms=300)
            if any(counts(m.timestamp) for tp, messages in batches.items() for m in messages if m.offset < targets[tp]):
                return True
            idle_rounds = 0 if batches else idle_rounds + 1
            for tp in list(remaining):
                if await self.consumer.position(tp) >= targets[tp]:
                    remaining.discard(tp)
        return False
