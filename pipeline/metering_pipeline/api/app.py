"""The FastAPI application: routers per concern, one error shape, OpenAPI at /openapi.json."""

from __future__ import annotations

from pathlib import Path

from aiokafka.errors import KafkaError
from clickhouse_connect.driver.exceptions import OperationalError
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from metering_pipeline.api import billing, metrics, subjects, thresholds, usage
from metering_pipeline.api.context import ApiContext, lifespan
from metering_pipeline.api.errors import ApiError, on_api_error, on_unavailable, on_validation_error
from metering_pipeline.api.keys import KeyRing
from metering_pipeline.api.request_metrics import RequestMetrics, RequestMetricsMiddleware
from metering_pipeline.settings import Settings

DASHBOARD = Path(__file__).resolve().parent / "ui" / "index.html"

DESCRIPTION = """The usage-metering module's commands and queries over HTTP.

Writes go to the Kafka topics the pipeline consumes and are acknowledged by the broker before
the API answers. Authenticate with `Authorization: Bearer <API key>` (`metering api-key create`);
keys have `read` and/or `write` scopes and may be limited to one org.

| seed contract | HTTP |
|---|---|
| metric.define / metric.update / metric.delete | `POST /v1/metrics`, `PUT /v1/metrics/{key}`, `DELETE /v1/metrics/{key}` |
| metric.get / metric.list | `GET /v1/metrics/{key}`, `GET /v1/metrics` |
| usage.record / usage.recordBatch | `POST /v1/usage`, `POST /v1/usage/batch` |
| usage.get / usage.getSummary / usage.export | `GET /v1/usage`, `GET /v1/usage/summary`, `GET /v1/usage/export` |
| threshold.create / threshold.update / threshold.delete / threshold.list | `POST /v1/thresholds`, `PUT /v1/thresholds/{id}`, `DELETE /v1/thresholds/{id}`, `GET /v1/thresholds` |
| billing: plans, subscriptions | `POST /v1/plans`, `PUT`/`DELETE`/`GET /v1/plans/{key}`, `GET /v1/plans`; the same under `/v1/subscriptions` |
| billing: invoice preview | `GET /v1/subjects/{subjectType}/{subjectId}/invoice?period=2026-11` |
"""


def create_app(settings: Settings) -> FastAPI:
    context = ApiContext(settings, KeyRing(settings.api_keys_file))
    app = FastAPI(title="usage-metering", version="0.1.0", description=DESCRIPTION, lifespan=lifespan(context))
    request_metrics = RequestMetrics()
    app.add_middleware(RequestMetricsMiddleware, metrics=request_metrics)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(KafkaError, on_unavailable)
    app.add_exception_handler(OperationalError, on_unavailable)  # clickhouse-connect: the server cannot be reached
    for router in (metrics.router, usage.router, thresholds.router, billing.router, subjects.router):
        app.include_router(router)

    @app.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        """One static page that reads the API in the browser with the user's API key."""
        return HTMLResponse(DASHBOARD.read_text())

    @app.get("/health", tags=["operations"], summary="Liveness: the API has loaded the catalogs")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics: requests by route and status, the process",
             response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(request_metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
