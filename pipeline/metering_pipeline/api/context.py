"""What the API's handlers share: the followed catalogs, the producers, ClickHouse, the key ring.

The Kafka topics stay the source of truth: the API follows `metering.metrics`, `metering.thresholds`,
`metering.plans`, `metering.subscriptions`, `metering.subjects` and `metering.webhooks` like a worker does, writes
through them, and applies its own acknowledged writes locally at once so a client reads what it just wrote.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from clickhouse_connect.driver.client import Client
from fastapi import FastAPI, Request
from pydantic import BaseModel

from metering_pipeline import logs
from metering_pipeline.api.keys import KeyRing
from metering_pipeline.definitions import Catalog, DefinitionFeed, DefinitionWriter, feed_into
from metering_pipeline.logs import get_logger
from metering_pipeline.producer import UsageProducer
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.periods import subject_zone
from metering_pipeline.usage.subject_zones import zone_rollups_from
from metering_pipeline.warehouse.client import connect
from metering_schemas import MetricDefinition, Plan, SubjectSettings, Subscription, UsageThreshold
from metering_schemas.webhook import WebhookEndpoint

log = get_logger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

READ_BACK_TIMEOUT = 10.0  # seconds a write waits for the API's own feed to read it back


@dataclass
class ApiContext:
    settings: Settings
    keys: KeyRing
    metrics: MetricCatalog = field(default_factory=MetricCatalog)
    thresholds: Catalog[UsageThreshold] = field(default_factory=Catalog)
    plans: Catalog[Plan] = field(default_factory=lambda: Catalog("key"))
    subscriptions: Catalog[Subscription] = field(default_factory=Catalog)
    subjects: Catalog[SubjectSettings] = field(default_factory=lambda: Catalog("key"))  # by `type:id`
    webhooks: Catalog[WebhookEndpoint] = field(default_factory=Catalog)
    producer: UsageProducer | None = None
    writers: dict[str, DefinitionWriter] = field(default_factory=dict)  # by topic
    clickhouse: Client | None = None
    clickhouse_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _catalogs: dict[str, Catalog[Any] | MetricCatalog] = field(default_factory=dict, init=False)  # by topic
    _feeds: dict[str, DefinitionFeed[Any]] = field(default_factory=dict, init=False)  # by topic

    @property
    def topics(self) -> Topics:
        return Topics.of(self.settings)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ApiContext]:
        topics = self.topics
        stopping = asyncio.Event()
        self._catalogs = {
            topics.metrics: self.metrics,
            topics.thresholds: self.thresholds,
            topics.plans: self.plans,
            topics.subscriptions: self.subscriptions,
            topics.subjects: self.subjects,
            topics.webhooks: self.webhooks,
        }
        models: dict[str, type[BaseModel]] = {
            topics.metrics: MetricDefinition,
            topics.thresholds: UsageThreshold,
            topics.plans: Plan,
            topics.subscriptions: Subscription,
            topics.subjects: SubjectSettings,
            topics.webhooks: WebhookEndpoint,
        }
        self._feeds = {
            topic: feed_into(self.settings, topic, models[topic], catalog.put, catalog.delete)
            for topic, catalog in self._catalogs.items()
        }
        feeds = list(self._feeds.values())
        async with AsyncExitStack() as stack:
            tasks = [feed.start(stopping) for feed in feeds]

            async def stop_feeds() -> None:
                stopping.set()
                await asyncio.gather(*tasks, return_exceptions=True)

            stack.push_async_callback(stop_feeds)
            outage_watch = asyncio.create_task(logs.KAFKA_RETRIES.watch())
            stack.callback(outage_watch.cancel)
            self.producer = await stack.enter_async_context(UsageProducer(self.settings))
            for topic in [*self._catalogs, topics.webhook_deliveries]:  # and resends to `metering webhooks`
                self.writers[topic] = await stack.enter_async_context(DefinitionWriter(self.settings, topic))
            self.clickhouse = stack.enter_context(connect(self.settings))
            for feed in feeds:
                await feed.loaded()
            yield self

    async def publish(
        self, catalog: Catalog[Any] | MetricCatalog, definition_id: str, definition: BaseModel | None
    ) -> None:
        """Through the catalog's topic (acknowledged), then read back by the catalog's feed, so the caller reads its
        own write and the catalog takes every entry in topic order (applying this one here while the feed still had
        an older entry of the same id to apply would let that older entry undo it)."""
        topic = next(topic for topic, known in self._catalogs.items() if known is catalog)
        writer = self.writers[topic]
        written = await (writer.delete(definition_id) if definition is None else writer.put(definition_id, definition))
        if await self._feeds[topic].has_applied(written.partition, written.offset, READ_BACK_TIMEOUT):
            return
        log.warning("definitions feed behind its topic; applying the write here", topic=topic, id=definition_id)
        if definition is None:
            catalog.delete(definition_id)
        else:
            catalog.put(definition)  # type: ignore[arg-type]  # of the catalog's model: callers pass the two together

    def zone_of(self, subject_type: str, subject_id: str) -> str:
        """The subject's time zone: its own, else METERING_DEFAULT_TIME_ZONE."""
        return subject_zone(self.subjects, subject_type, subject_id, self.settings.default_time_zone)

    def zone_rollups_from(self, subject_type: str, subject_id: str, zone_name: str) -> datetime | None:
        return zone_rollups_from(self.subjects, subject_type, subject_id, zone_name, self.settings.default_time_zone)

    async def query(self, function: Callable[Concatenate[Client, P], R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Runs a blocking ClickHouse call off the event loop, one at a time on the shared client."""
        async with self.clickhouse_lock:
            # The client is there once `running` has started, before any request.
            return await asyncio.to_thread(function, cast(Client, self.clickhouse), *args, **kwargs)


def context_of(request: Request) -> ApiContext:
    """What the handlers share, as `lifespan` left it on the app."""
    context: ApiContext = request.app.state.context
    return context


def lifespan(context: ApiContext) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        async with context.running():
            app.state.context = context
            yield

    return run
