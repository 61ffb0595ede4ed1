"""Many Kafka messages per produce call: per-partition record batches built directly.

`AIOKafkaProducer.send()` costs tens of microseconds per message (partitioning, a future, a
queue slot); a checkpoint writes one changelog entry and one `usage.aggregated` event per
changed rollup, tens of thousands per second under load. Appending to a BatchBuilder and
submitting whole batches costs a fraction of that, inside the same transaction. Keyed
topics get the producer's default partitioner, so consumers see the usual key → partition map.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner


class PartitionBatches:
    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self._open: dict[tuple[str, int], object] = {}
        self._partitions: dict[str, list[int]] = {}
        self._partitioner = DefaultPartitioner()
        self.acks: list[asyncio.Future] = []

    async def add(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> None:
        if partition is None:
            partition = await self._partition_for(topic, key)
        slot = (topic, partition)
        batch = self._open.get(slot)
        if batch is None:
            batch = self._open[slot] = self.producer.create_batch()
        if batch.append(timestamp=None, key=key, value=value) is None:  # full: submit it and start another
            await self._submit(slot)
            batch = self._open[slot] = self.producer.create_batch()
            if batch.append(timestamp=None, key=key, value=value) is None:
                raise ValueError(f"a message of {len(value or b'')} bytes does not fit in a batch for {topic}")

    async def flush(self) -> list[asyncio.Future]:
        """Submit every open batch; returns the futures of everything added since the last flush."""
        for slot in list(self._open):
            await self._submit(slot)
        acks, self.acks = self.acks, []
        return acks

    async def _submit(self, slot: tuple[str, int]) -> None:
        batch = self._open.pop(slot)
        batch.close()
        self.acks.append(await self.producer.send_batch(batch, slot[0], partition=slot[1]))

    async def _partition_for(self, topic: str, key: bytes | None) -> int:
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = self._partitions[topic] = sorted(await self.producer.partitions_for(topic))
        return self._partitioner(key, partitions, partitions)
