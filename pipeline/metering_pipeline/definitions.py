"""Definitions kept on compacted Kafka topics: metrics, thresholds, plans and subscriptions.

The topic is the source of truth: key = definition id, value = the definition's JSON, a
tombstone (null value) deletes it. Writers wait for the broker's acks; readers replay the
topic from the beginning, so every worker and every CLI call sees the same catalog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import BaseModel, ValidationError

from metering_pipeline.logs import get_logger
from metering_pipeline.settings import Settings

log = get_logger(__name__)

Definition = TypeVar("Definition", bound=BaseModel)


def parse_entry(model: type[Definition], key: bytes | None, value: bytes | None) -> tuple[str, Definition | None] | None:
    """(id, definition or None for a tombstone), or None when the entry is unusable (logged).

    The key is authoritative: a value whose `id` disagrees with its key is stored under the key,
    because compaction keeps one value per key.
    """
    if key is None:
        log.warning("definition without a key ignored", model=model.__name__)
        return None
    definition_id = key.decode(errors="replace")
    if value is None:
        return definition_id, None
    try:
        definition = model.model_validate_json(value)
    except ValidationError as error:
        log.warning("invalid definition ignored", model=model.__name__, id=definition_id, error=str(error))
        return None
    if getattr(definition, "id", definition_id) != definition_id:
        definition = definition.model_copy(update={"id": definition_id})
    return definition_id, definition


class DefinitionFeed(Generic[Definition]):
    """Follows a definitions topic into `apply(id, definition | None)`; `ready` once it has read
    everything the topic held when the feed started."""

    def __init__(self, settings: Settings, topic: str, model: type[Definition],
                 apply: Callable[[str, Definition | None], None]) -> None:
        self.settings = settings
        self.topic = topic
        self.model = model
        self.apply = apply
        self.ready = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(**self.settings.kafka_client_options(), enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer.topics()  # loads cluster metadata, so the topic's partitions are known
            partitions = [TopicPartition(self.topic, p) for p in sorted(consumer.partitions_for_topic(self.topic) or {0})]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            end = await consumer.end_offsets(partitions)
            while not stopping.is_set():
                for messages in (await consumer.getmany(timeout_ms=200)).values():
                    for message in messages:
                        parsed = parse_entry(self.model, message.key, message.value)
                        if parsed is not None:
                            self.apply(*parsed)
                if not self.ready.is_set() and all([await consumer.position(tp) >= end[tp] for tp in partitions]):
                    self.ready.set()
                    log.info("definitions loaded", topic=self.topic)
        finally:
            await consumer.stop()


def feed_into(settings: Settings, topic: str, model: type[Definition], put: Callable[[Definition], object],
              delete: Callable[[str], object]) -> DefinitionFeed[Definition]:
    """A feed that keeps a catalog (anything with put(definition) and delete(id)) equal to the topic."""

    def apply(definition_id: str, definition: Definition | None) -> None:
        if definition is None:
            delete(definition_id)
        else:
            put(definition)

    return DefinitionFeed(settings, topic, model, apply)


async def read_all(settings: Settings, topic: str, model: type[Definition], timeout: float = 30) -> dict[str, Definition]:
    """The topic's current definitions by id (a replay up to the end offsets at call time)."""
    found: dict[str, Definition] = {}

    def apply(definition_id: str, definition: Definition | None) -> None:
        if definition is None:
            found.pop(definition_id, None)
        else:
            found[definition_id] = definition

    feed = DefinitionFeed(settings, topic, model, apply)
    stopping = asyncio.Event()
    task = asyncio.create_task(feed.run(stopping))
    try:
        async with asyncio.timeout(timeout):
            ready = asyncio.create_task(feed.ready.wait())
            done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                task.result()  # surfaces the consumer's error
    finally:
        stopping.set()
        await task
    return found


class DefinitionWriter:
    """Puts and deletes definitions, each acknowledged by the broker before the call returns."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> DefinitionWriter:
        self._producer = AIOKafkaProducer(**self.settings.kafka_client_options(), acks="all")
        try:
            await self._producer.start()
        except BaseException:  # e.g. refused credentials: close it, or asyncio reports an unclosed producer
            await self._producer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._producer is not None
        await self._producer.stop()

    async def put(self, definition_id: str, definition: BaseModel) -> None:
        assert self._producer is not None
        await self._producer.send_and_wait(self.topic, definition.model_dump_json(by_alias=True).encode(),
                                           key=definition_id.encode())

    async def delete(self, definition_id: str) -> None:
        assert self._producer is not None
        await self._producer.send_and_wait(self.topic, None, key=definition_id.encode())
