"""What the API's handlers share: the followed catalogs, the producers, ClickHouse, the key ring.

The Kafka topics stay the source of truth: the API follows `metering.metrics` and
`metering.thresholds` like a worker does, writes through them, and applies its own
acknowledged writes locally at once so a client reads what it just wrote.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from clickhouse_connect.driver.client import Client
from fastapi import FastAPI

from metering_pipeline.api.keys import KeyRing
from metering_pipeline.definitions import DefinitionWriter, feed_into
from metering_pipeline.producer import UsageProducer
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.warehouse.client import connect
from metering_schemas import MetricDefinition, UsageThreshold


class ThresholdCatalog(dict[str, UsageThreshold]):
    def put(self, threshold: UsageThreshold) -> None:
        self[threshold.id] = threshold

    def delete(self, threshold_id: str) -> None:
        self.pop(threshold_id, None)


@dataclass
class ApiContext:
    settings: Settings
    keys: KeyRing
    metrics: MetricCatalog = field(default_factory=MetricCatalog)
    thresholds: ThresholdCatalog = field(default_factory=ThresholdCatalog)
    producer: UsageProducer | None = None
    metric_writer: DefinitionWriter | None = None
    threshold_writer: DefinitionWriter | None = None
    clickhouse: Client | None = None
    clickhouse_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ApiContext]:
        topics = Topics.of(self.settings)
        stopping = asyncio.Event()
        feeds = [
            feed_into(self.settings, topics.metrics, MetricDefinition, self.metrics.put, self.metrics.delete),
            feed_into(self.settings, topics.thresholds, UsageThreshold, self.thresholds.put, self.thresholds.delete),
        ]
        async with AsyncExitStack() as stack:
            tasks = [asyncio.create_task(feed.run(stopping)) for feed in feeds]

            async def stop_feeds() -> None:
                stopping.set()
                await asyncio.gather(*tasks, return_exceptions=True)

            stack.push_async_callback(stop_feeds)
            self.producer = await stack.enter_async_context(UsageProducer(self.settings))
            self.metric_writer = await stack.enter_async_context(DefinitionWriter(self.settings, topics.metrics))
            self.threshold_writer = await stack.enter_async_context(DefinitionWriter(self.settings, topics.thresholds))
            self.clickhouse = stack.enter_context(connect(self.settings))
            for feed in feeds:
                await feed.ready.wait()
            yield self

    async def publish_metric(self, definition_id: str, definition: MetricDefinition | None) -> None:
        assert self.metric_writer is not None
        await _publish(self.metric_writer, self.metrics, definition_id, definition)

    async def publish_threshold(self, threshold_id: str, threshold: UsageThreshold | None) -> None:
        assert self.threshold_writer is not None
        await _publish(self.threshold_writer, self.thresholds, threshold_id, threshold)

    async def query(self, function, *args, **kwargs):
        """Runs a blocking ClickHouse call off the event loop, one at a time on the shared client."""
        async with self.clickhouse_lock:
            return await asyncio.to_thread(function, self.clickhouse, *args, **kwargs)


async def _publish(writer: DefinitionWriter, catalog: MetricCatalog | ThresholdCatalog, definition_id: str,
                   definition: MetricDefinition | UsageThreshold | None) -> None:
    """Through the topic first (acknowledged), then into the local catalog so the caller reads its own write."""
    if definition is None:
        await writer.delete(definition_id)
        catalog.delete(definition_id)
    else:
        await writer.put(definition_id, definition)
        catalog.put(definition)  # type: ignore[arg-type]


def lifespan(context: ApiContext):
    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        async with context.running():
            app.state.context = context
            yield

    return run
