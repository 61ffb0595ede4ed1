"""Definitions kept on compacted Kafka topics: metrics, thresholds, plans and subscriptions.

The topic is the source of truth: key = definition id, value = the definition's JSON, a
tombstone (null value) deletes it. Writers wait for the broker's acks; readers replay the
topic from the beginning, so every worker and every CLI call sees the same catalog.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import jiter
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata
from pydantic import BaseModel, ValidationError

from metering_pipeline.logs import get_logger
from metering_pipeline.settings import Settings
from metering_pipeline.topics import ensure_topics, partitions_of, public_topics, webhook_topics
from metering_schemas.threshold import DROPPED_ADDRESSES

log = get_logger(__name__)

Definition = TypeVar("Definition", bound=BaseModel)


def parse_entry(
    model: type[Definition], key: bytes | None, value: bytes | None
) -> tuple[str, Definition | None] | None:
    """(id, definition or None for a tombstone), or None when the entry is unusable (logged).

    The key is authoritative: a value whose `id` disagrees with its key is stored under the key,
    because compaction keeps one value per key. An invalid definition is refused whole (logged, not dead-lettered),
    except bad e-mail addresses of a threshold: the threshold applies without them, and each is logged, never mailed.
    """
    if key is None:
        log.warning("definition without a key ignored", model=model.__name__)
        return None
    definition_id = key.decode(errors="replace")
    if value is None:
        return definition_id, None
    dropped: list[tuple[object, str]] = []
    try:
        # Decimal mode: a threshold or a price written as a JSON number keeps every digit (pydantic's own JSON
        # parsing reads numbers as floats first).
        definition = model.model_validate(
            jiter.from_json(value, float_mode="decimal"), context={DROPPED_ADDRESSES: dropped}
        )
    except (ValidationError, ValueError) as error:
        log.warning("invalid definition ignored", model=model.__name__, id=definition_id, error=str(error))
        return None
    for address, reason in dropped:
        log.warning(
            "invalid e-mail address dropped: nothing is sent to it",
            model=model.__name__,
            id=definition_id,
            address=repr(address)[:300],
            reason=reason,
        )
    if getattr(definition, "id", definition_id) != definition_id:
        definition = definition.model_copy(update={"id": definition_id})
    return definition_id, definition


PARTITION_CHECK_INTERVAL = 2.0  # seconds between looks for a created topic or added partitions


class DefinitionFeed(Generic[Definition]):
    """Follows every partition of a definitions topic into `apply(id, definition | None)`; `ready` once it
    has read everything the topic held when the feed started.

    The topic may have any number of partitions (an operator's or the broker's auto-create), may not
    exist yet, and may gain partitions later: the feed looks at the broker's metadata every
    `PARTITION_CHECK_INTERVAL` seconds and reads new partitions from their beginning.
    """

    def __init__(
        self, settings: Settings, topic: str, model: type[Definition], apply: Callable[[str, Definition | None], None]
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.model = model
        self.apply = apply
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._applied_to: dict[int, int] = {}  # partition -> next offset to apply
        self._read_to: dict[int, int] = {}  # partition -> its reader's position: every entry before it is applied

    async def has_applied(self, partition: int, offset: int, timeout: float) -> bool:
        """Waits until the entry at `offset` of `partition` is applied (a writer reading back its own write in
        topic order, so an older entry applied later cannot undo it); False after `timeout` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._applied_to.get(partition, 0) <= offset:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def has_read(self, ends: Mapping[int, int], timeout: float) -> bool:
        """Waits until every entry before `ends` (partition -> offset: the topic's end offsets at some instant) is
        applied, compacted gaps included; False after `timeout` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while any(self._read_to.get(partition, 0) < end for partition, end in ends.items()):
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def start(self, stopping: asyncio.Event) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(stopping))
        return self._task

    async def loaded(self) -> None:
        """Until `ready`; raises the feed's error instead of waiting forever when it stopped first."""
        assert self._task is not None, "start() the feed first"
        ready = asyncio.create_task(self.ready.wait())
        done, _ = await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            ready.cancel()
            self._task.result()  # the consumer's error
            raise RuntimeError(f"the {self.topic} feed stopped before it had loaded")

    async def run(self, stopping: asyncio.Event) -> None:
        # earliest: a topic deleted and re-created under the feed is read again from its start
        consumer = AIOKafkaConsumer(
            **self.settings.kafka_client_options(), enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            try:
                following = await self._follow(consumer, frozenset())
            except KafkaError as error:
                raise KafkaError(f"cannot read the partitions of {self.topic}: {error!r}") from error
            end = await consumer.end_offsets(sorted(following)) if following else {}
            checked = time.monotonic()
            while not stopping.is_set():
                if time.monotonic() - checked >= PARTITION_CHECK_INTERVAL:
                    checked = time.monotonic()
                    try:
                        following = await self._follow(consumer, following)
                    except (
                        KafkaError
                    ) as error:  # keep reading what is known; a broker outage is logged once (logs.KafkaRetries)
                        (log.debug if error.retriable else log.warning)(
                            "could not look for new partitions", topic=self.topic, error=repr(error)
                        )
                if not following:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stopping.wait(), 0.2)
                    batches = {}
                else:
                    batches = await consumer.getmany(timeout_ms=200)
                for tp, messages in batches.items():
                    for message in messages:
                        parsed = parse_entry(self.model, message.key, message.value)
                        if parsed is not None:
                            self.apply(*parsed)
                    self._applied_to[tp.partition] = messages[-1].offset + 1
                for tp in following:
                    self._read_to[tp.partition] = await consumer.position(tp)
                if not self.ready.is_set() and all([await consumer.position(tp) >= end[tp] for tp in end]):
                    self.ready.set()
                    log.info("definitions loaded", topic=self.topic, partitions=len(following))
        finally:
            await consumer.stop()

    async def _follow(
        self, consumer: AIOKafkaConsumer, following: frozenset[TopicPartition]
    ) -> frozenset[TopicPartition]:
        """Assigns the topic's current partitions: known ones keep their positions, new ones start at the beginning."""
        current = frozenset(TopicPartition(self.topic, p) for p in await partitions_of(consumer, self.topic) or ())
        if current == following:
            return following
        kept = {tp: await consumer.position(tp) for tp in following & current}
        consumer.assign(sorted(current))
        for tp, position in kept.items():
            consumer.seek(tp, position)
        if new := current - following:
            await consumer.seek_to_beginning(*new)
            log.info("following partitions", topic=self.topic, partitions=sorted(tp.partition for tp in new))
        return current


class Catalog(dict[str, Definition]):
    """Definitions by their topic key (`id`; a plan's is its `key`), kept equal to their topic."""

    def __init__(self, key_field: str = "id") -> None:
        super().__init__()
        self.key_field = key_field

    def put(self, definition: Definition) -> None:
        self[getattr(definition, self.key_field)] = definition

    def delete(self, definition_id: str) -> None:
        self.pop(definition_id, None)


def feed_into(
    settings: Settings,
    topic: str,
    model: type[Definition],
    put: Callable[[Definition], object],
    delete: Callable[[str], object],
) -> DefinitionFeed[Definition]:
    """A feed that keeps a catalog (anything with put(definition) and delete(id)) equal to the topic."""

    def apply(definition_id: str, definition: Definition | None) -> None:
        if definition is None:
            delete(definition_id)
        else:
            put(definition)

    return DefinitionFeed(settings, topic, model, apply)


@asynccontextmanager
async def followed(
    settings: Settings, topic: str, model: type[Definition]
) -> AsyncIterator[tuple[DefinitionFeed[Definition], dict[str, Definition]]]:
    """A running feed of `topic` into a dict by id, stopped when the block ends."""
    found: dict[str, Definition] = {}

    def apply(definition_id: str, definition: Definition | None) -> None:
        if definition is None:
            found.pop(definition_id, None)
        else:
            found[definition_id] = definition

    feed = DefinitionFeed(settings, topic, model, apply)
    stopping = asyncio.Event()
    task = feed.start(stopping)
    try:
        yield feed, found
    finally:
        stopping.set()
        await task


async def read_all(
    settings: Settings, topic: str, model: type[Definition], timeout: float = 30
) -> dict[str, Definition]:
    """The topic's current definitions by id (a replay up to the end offsets at call time)."""
    async with followed(settings, topic, model) as (feed, found):
        async with asyncio.timeout(timeout):
            await feed.loaded()
    return found


class DefinitionWriter:
    """Puts and deletes definitions, each acknowledged by the broker before the call returns."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> DefinitionWriter:
        # Created compacted if missing: the broker's auto-create would make it with a retention time
        specs = public_topics(self.settings) + webhook_topics(self.settings)
        await ensure_topics(self.settings, [spec for spec in specs if spec.name == self.topic])
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

    async def put(self, definition_id: str, definition: BaseModel | bytes) -> RecordMetadata:
        """A definition, or an entry already encoded (a webhook delivery to resend)."""
        assert self._producer is not None
        value = definition if isinstance(definition, bytes) else definition.model_dump_json(by_alias=True).encode()
        return await self._producer.send_and_wait(self.topic, value, key=definition_id.encode())

    async def delete(self, definition_id: str) -> RecordMetadata:
        assert self._producer is not None
        return await self._producer.send_and_wait(self.topic, None, key=definition_id.encode())
