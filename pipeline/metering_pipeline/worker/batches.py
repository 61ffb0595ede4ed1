"""Many Kafka messages per produce call: per-partition record batches built directly.

`AIOKafkaProducer.send()` costs tens of microseconds per message (partitioning, a future, a
queue slot); a checkpoint writes one changelog entry and one `usage.aggregated` event per
changed rollup, tens of thousands per second under load. Appending to a BatchBuilder and
submitting whole batches costs a fraction of that, inside the same transaction. Keyed
topics get the producer's default partitioner, so consumers see the usual key → partition map.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder


class PartitionBatches:
    def __init__(self, producer: AIOKafkaProducer, keys: KeyPartitions | None = None) -> None:
        self.producer = producer
        self._open: dict[tuple[str, int], BatchBuilder] = {}
        self._partitions: dict[str, list[int]] = {}
        self._keys = KeyPartitions() if keys is None else keys
        self.acks: list[asyncio.Future[Any]] = []
        self._sent: list[tuple[tuple[str, int], asyncio.Future[Any], int]] = []  # slot, ack, messages

    async def add(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None) -> None:
        await self.add_all(topic, ((key, value),), partition)

    async def add_all(
        self, topic: str, entries: Iterable[tuple[bytes | None, bytes | None]], partition: int | None = None
    ) -> None:
        """Append every (key, value) to `partition`, or to its key's partition; awaits only to submit a full batch
        (a checkpoint adds tens of thousands of entries: one coroutine per entry would cost more than the entry)."""
        partitions = None if partition is not None else await self._partitions_of(topic)
        fixed = cast(int, partition)  # an int whenever `partitions` is None
        chosen = self._keys.partition
        for key, value in entries:
            slot = (topic, fixed if partitions is None else chosen(key, partitions))
            batch = self._open.get(slot)
            if batch is None:
                batch = self._open[slot] = self.producer.create_batch()
            if batch.append(timestamp=None, key=key, value=value) is None:  # full: submit it and start another
                await self._submit(slot)
                batch = self._open[slot] = self.producer.create_batch()
                if batch.append(timestamp=None, key=key, value=value) is None:
                    raise ValueError(f"a message of {len(value or b'')} bytes does not fit in a batch for {topic}")

    async def flush(self) -> list[asyncio.Future[Any]]:
        """Submit every open batch; returns the futures of everything added since the last flush."""
        for slot in list(self._open):
            await self._submit(slot)
        acks, self.acks = self.acks, []
        return acks

    async def _submit(self, slot: tuple[str, int]) -> None:
        batch = self._open.pop(slot)
        batch.close()
        ack = await self.producer.send_batch(batch, slot[0], partition=slot[1])
        self.acks.append(ack)
        self._sent.append((slot, ack, batch.record_count()))

    async def end_offset(self, topic: str, partition: int) -> int | None:
        """The offset after the last message added to (topic, partition), once sent (None: none was)."""
        ends = [(await ack).offset + count for slot, ack, count in self._sent if slot == (topic, partition)]
        return max(ends, default=None)

    async def _partitions_of(self, topic: str) -> list[int]:
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = self._partitions[topic] = sorted(await self.producer.partitions_for(topic))
        return partitions


class KeyPartitions:
    """The default partitioner's choice, remembered per key: its murmur2 runs in Python (microseconds per key) and a
    checkpoint sends one event per changed rollup, for the same subjects again and again."""

    LIMIT = 65_536  # keys remembered (~150 B each); then it starts over

    def __init__(self) -> None:
        self._partitioner = DefaultPartitioner()
        self._chosen: dict[tuple[bytes, int], int] = {}

    def partition(self, key: bytes | None, partitions: list[int]) -> int:
        if key is None:
            partition: int = self._partitioner(key, partitions, partitions)  # aiokafka has no types
            return partition
        slot = (key, len(partitions))  # a topic that grows gets new choices
        chosen = self._chosen.get(slot)
        if chosen is None:
            if len(self._chosen) >= self.LIMIT:
                self._chosen.clear()
            chosen = self._chosen[slot] = self._partitioner(key, partitions, partitions)
        return chosen
