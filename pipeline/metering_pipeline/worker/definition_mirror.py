"""Definitions (metrics, plans, subscriptions) into ClickHouse, and the seed's `metric.defined` event.

Every worker process follows the metrics and thresholds topics into its own catalogs (see
`definitions.feed_into`); separately, one member of a consumer group mirrors each definitions entry
into ClickHouse (and announces metrics), which is what this module does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Generic

from aiokafka import AIOKafkaProducer

from metering_pipeline.definitions import parse_entry
from metering_pipeline.retry import until_success
from metering_pipeline.warehouse.errors import is_transient
from metering_pipeline.warehouse.mirrors import D, Mirror
from metering_pipeline.warehouse.sink import ClickHouseSink
from metering_schemas import MetricDefined, MetricDefinition


class DefinitionMirror(Generic[D]):
    """Mirrors one definitions topic's entries to its table (at least once; rows are versioned by offset).

    Driven by a Faust agent on the topic, so exactly one worker of the group handles each entry.
    """

    def __init__(self, sink: ClickHouseSink, mirror: Mirror[D]) -> None:
        self.sink = sink
        self.mirror = mirror

    async def mirror_entry(self, key: bytes | None, value: bytes | None, offset: int) -> tuple[str, D | None] | None:
        parsed = parse_entry(self.mirror.model, key, value)
        if parsed is not None:
            definition_id, definition = parsed
            await until_success(
                lambda: self.sink.write_definition(self.mirror, definition_id, definition, offset),
                f"write {self.mirror.table}",
                transient=is_transient,
            )
        return parsed


class MetricAnnouncer(DefinitionMirror[MetricDefinition]):
    """Metrics are mirrored and announced as `metric.defined` (the event id is deterministic per entry)."""

    def __init__(
        self, sink: ClickHouseSink, mirror: Mirror[MetricDefinition], producer: AIOKafkaProducer, events_topic: str
    ) -> None:
        super().__init__(sink, mirror)
        self.producer = producer
        self.events_topic = events_topic

    async def mirror_entry(
        self, key: bytes | None, value: bytes | None, offset: int
    ) -> tuple[str, MetricDefinition | None] | None:
        parsed = await super().mirror_entry(key, value, offset)
        if parsed is not None and parsed[1] is not None:
            definition_id, definition = parsed[0], parsed[1]
            event = MetricDefined(
                id=f"metric.defined:{definition_id}:{offset}", occurred_at=datetime.now(UTC), metric=definition
            )
            await self.producer.send_and_wait(self.events_topic, event.to_json(), key=definition_id.encode())
        return parsed
