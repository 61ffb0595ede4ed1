"""The FastAPI application: routers per concern, one error shape, OpenAPI at /openapi.json."""

from __future__ import annotations

from pathlib import Path

from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError
from clickhouse_connect.driver.exceptions import OperationalError
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from metering_pipeline.api import billing, metrics, subjects, thresholds, usage, webhooks
from metering_pipeline.api.context import ApiContext, lifespan
from metering_pipeline.api.errors import (
    ApiError,
    on_api_error,
    on_http_error,
    on_too_large,
    on_unavailable,
    on_validation_error,
)
from metering_pipeline.api.keys import KeyRing
from metering_pipeline.api.request_metrics import RequestMetrics, RequestMetricsMiddleware
from metering_pipeline.settings import Settings
from metering_pipeline.topics import KAFKA_UNREACHABLE
from metering_pipeline.usage.intake import IntakeRules
from metering_schemas._base import MAX_DESCRIPTION, MAX_IDENTIFIER, MAX_NAME
from metering_schemas.billing import MAX_PRICES, MAX_TIERS
from metering_schemas.metric import (
    MAX_DIMENSION_NAME,
    MAX_DIMENSION_VALUE,
    MAX_FILTER_PATHS,
    MAX_FILTER_VALUES,
    MAX_GROUP_BY,
    MAX_UNIT,
)
from metering_schemas.threshold import MAX_EMAIL_LENGTH, MAX_NOTIFY_EMAILS

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
"""  # noqa: E501 - markdown table rows: a row is one line

_RULES = IntakeRules()
_DEFAULTS = Settings.model_fields
LIMITS = f"""
Every error answer is `{{"error": code, "message": text, "errors": [{{"field", "message"}}]}}`: 400 `invalid_cursor`,
401 `unauthenticated` (checked before the body is read), 403 `forbidden_scope` / `forbidden_org`, 404 `not_found`,
405 `method_not_allowed`, 409, 413 `request_too_large` / `batch_too_large` / `message_too_large`, 422
`validation_error` / `invalid_records` (one entry per field), and 503 `kafka_unavailable` / `clickhouse_unavailable`
with `Retry-After` (the only answer worth retrying as it is).

| limit | value | past it |
|---|---|---|
| request body | {_DEFAULTS["api_max_request_bytes"].default // 2**20} MiB by default (`METERING_API_MAX_REQUEST_BYTES`) | 413 `request_too_large` |
| records per `POST /v1/usage/batch` | {_DEFAULTS["api_max_batch_records"].default} by default (`METERING_API_MAX_BATCH_RECORDS`); a batch travels in as many Kafka messages as it needs | 413 `batch_too_large` |
| ids, keys, subject types and ids, `orgId` | 1 to {MAX_IDENTIFIER} characters | 422 |
| a record's `metadata` | {_RULES.max_metadata_bytes // 1024} KiB as JSON | 422 `too_large` |
| `quantity`, prices, thresholds | a JSON number, or a string in JSON number form (`"12"`, `"-0.5"`, `"1e3"`); at most 38 digits, 18 after the point | 422 |
| `name` | 1 to {MAX_NAME} characters | 422 |
| `description` (metrics, plans) | {MAX_DESCRIPTION} characters | 422 |
| a metric's `unit` | {MAX_UNIT} characters | 422 |
| `groupBy` dimensions; a threshold's or price's `dimensions` | {MAX_GROUP_BY}; names 1 to {MAX_DIMENSION_NAME} characters of `A-Za-z0-9_.:-`, values {MAX_DIMENSION_VALUE} characters | 422 |
| a metric's `filter` | {MAX_FILTER_PATHS} paths of at most 512 characters, {MAX_FILTER_VALUES} values each | 422 |
| a threshold's `notifyEmails` | {MAX_NOTIFY_EMAILS} addresses, each one valid mailbox of at most {MAX_EMAIL_LENGTH} characters | 422 |
| a plan's `prices` / a price's `tiers` | {MAX_PRICES} / {MAX_TIERS} | 422 |
| `Idempotency-Key` | 200 characters | 422 |
| a write's Kafka message | what the broker takes (1 MiB by default) | 413 `message_too_large`, nothing published |
"""  # noqa: E501 - markdown table rows: a row is one line


def create_app(settings: Settings) -> FastAPI:
    context = ApiContext(settings, KeyRing(settings.api_keys_file))
    app = FastAPI(title="usage-metering", version="0.1.0", description=DESCRIPTION + LIMITS, lifespan=lifespan(context))
    request_metrics = RequestMetrics()
    app.add_middleware(RequestMetricsMiddleware, metrics=request_metrics)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(KafkaError, on_unavailable)
    for too_large in (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError):
        app.add_exception_handler(too_large, on_too_large)
    app.add_exception_handler(OperationalError, on_unavailable)  # clickhouse-connect: the server cannot be reached
    for router in (metrics.router, usage.router, thresholds.router, billing.router, subjects.router, webhooks.router):
        app.include_router(router)

    @app.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        """One static page that reads the API in the browser with the user's API key."""
        return HTMLResponse(DASHBOARD.read_text())

    @app.get("/health", tags=["operations"], summary="Liveness: the API runs (it serves once its catalogs loaded)")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    @app.get(
        "/ready",
        tags=["operations"],
        summary="Readiness: the catalogs are loaded and a Kafka broker answers; 503 with the reason otherwise",
        responses={503: {"description": "Not ready: `reason` says why"}},
    )
    async def ready() -> JSONResponse:
        producer = context.producer
        if producer is None or not await producer.kafka_answers():
            return JSONResponse({"ready": False, "reason": KAFKA_UNREACHABLE}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics: requests by route and status, the process",
        response_class=PlainTextResponse,
    )
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(request_metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
