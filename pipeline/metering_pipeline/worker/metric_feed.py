"""Metric definitions into ClickHouse and the seed's `metric.defined` event.

Every worker process follows the whole `metering.metrics` topic into its own MetricCatalog
(see `definitions.feed_into`); separately, one member of a consumer group mirrors each
definition into ClickHouse and announces it, which is what this module does.
"""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
from aiokafka import AIOKafkaProducer

from metering_pipeline.definitions import parse_entry
from metering_pipeline.retry import until_success
from metering_pipeline.warehouse.sink import ClickHouseSink
from metering_schemas import MetricDefinition


class DefinitionAnnouncer:
    """Mirrors definitions to ClickHouse and emits `metric.defined` (at least once; the event id is deterministic).

    Driven by a Faust agent on `metering.metrics`, so exactly one worker of the group handles each entry.
    """

    def __init__(self, sink: ClickHouseSink, producer: AIOKafkaProducer, events_topic: str) -> None:
        self.sink = sink
        self.producer = producer
        self.events_topic = events_topic

    async def announce(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        parsed = parse_entry(MetricDefinition, key, value)
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
