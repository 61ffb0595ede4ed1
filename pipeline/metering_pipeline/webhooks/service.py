"""The `metering webhooks` process: the dispatcher, with `/metrics` and `/health` on its web port."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from metering_pipeline import logs
from metering_pipeline.logs import get_logger
from metering_pipeline.observability import process_registry
from metering_pipeline.settings import Settings
from metering_pipeline.warehouse.client import connect
from metering_pipeline.webhooks.dispatcher import WebhookDispatcher

log = get_logger(__name__)


async def serve(settings: Settings, web_port: int, stopping: asyncio.Event) -> None:
    registry = process_registry()
    with connect(settings) as clickhouse:
        dispatcher = WebhookDispatcher(settings, clickhouse, registry)

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def health(_: web.Request) -> web.Response:
            return web.json_response({"healthy": True, "pendingDeliveries": dispatcher.pending})

        app = web.Application()
        app.add_routes([web.get("/metrics", metrics), web.get("/health", health)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", web_port).start()
        log.info("webhooks delivering", web_port=web_port)
        outage_watch = asyncio.create_task(logs.KAFKA_RETRIES.watch())
        try:
            await dispatcher.run(stopping)
        finally:
            outage_watch.cancel()
            await runner.cleanup()
