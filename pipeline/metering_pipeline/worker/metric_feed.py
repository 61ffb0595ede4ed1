"""Metric definitions from the compacted `metering.metrics` topic.

Every worker process follows the whole topic into its own MetricCatalog (the router needs
every definition, whichever partitions it owns) and is `ready` once it has read what the
topic held at start-up. Separately, one member of a small consumer group mirrors each
definition into ClickHouse and announces it with the seed's `metric.defined` event.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import ValidationError

from metering_pipeline.logs import get_logger
from metering_pipeline.retry import until_success
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.warehouse.sink import ClickHouseSink
from metering_schemas import MetricDefinition

log = get_logger(__name__)


def parse_definition(key: bytes | None, value: bytes | None) -> tuple[str, MetricDefinition | None] | None:
    """(id, definition or None for a tombstone), or None when the entry is unusable (logged)."""
    if key is None:
        log.warning("metric definition without a key ignored")
        return None
    definition_id = key.decode(errors="replace")
    if value is None:
        return definition_id, None
    try:
        definition = MetricDefinition.model_validate_json(value)
    except ValidationError as error:
        log.warning("invalid metric definition ignored", id=definition_id, error=str(error))
        return None
    if definition.id != definition_id:
        definition = definition.model_copy(update={"id": definition_id})
    return definition_id, definition


class MetricFeed:
    def __init__(self, settings: Settings, catalog: MetricCatalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.ready = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        consumer = AIOKafkaConsumer(**self.settings.kafka_client_options(), enable_auto_commit=False)
        await consumer.start()
        try:
            await consumer.topics()  # loads cluster metadata, so the topic's partitions are known
            topic = Topics.of(self.settings).metrics
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            end = await consumer.end_offsets(partitions)
            while not stopping.is_set():
                batches = await consumer.getmany(timeout_ms=200)
                for messages in batches.values():
                    for message in messages:
                        self._apply(message.key, message.value)
                if not self.ready.is_set() and all([await consumer.position(tp) >= end[tp] for tp in partitions]):
                    self.ready.set()
                    log.info("metric definitions loaded", count=len(self.catalog))
        finally:
            await consumer.stop()

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        parsed = parse_definition(key, value)
        if parsed is None:
            return
        definition_id, definition = parsed
        if definition is None:
            self.catalog.delete(definition_id)
        else:
            self.catalog.put(definition)


class DefinitionAnnouncer:
    """Mirrors definitions to ClickHouse and emits `metric.defined` (at least once; the event id is deterministic).

    Driven by a Faust agent on `metering.metrics`, so exactly one worker of the group handles each entry.
    """

    def __init__(self, sink: ClickHouseSink, producer: AIOKafkaProducer, events_topic: str) -> None:
        self.sink = sink
        self.producer = producer
        self.events_topic = events_topic

    async def announce(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        parsed = parse_definition(key, value)
        if parsed is None:
            return
        definition_id, definition = parsed
        await until_success(lambda: self.sink.write_definition(definition, definition_id, offset), "write metric_definitions")
        if definition is not None:
            event = {
                "id": f"metric.defined:{definition_id}:{offset}",
                "type": "metric.defined",
                "occurredAt": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                "metric": orjson.loads(definition.to_json()),
            }
            await self.producer.send_and_wait(self.events_topic, orjson.dumps(event), key=definition_id.encode())
