"""The API's `/metrics`: requests by method, route template and status, and the process's own metrics.

Requests are labelled with the route's template (`/v1/metrics/{key}`), never the raw path, so a
client walking through ids cannot grow the number of series: a path no route matches is
`unmatched`, a method outside HTTP's usual ones `other`. Measured as plain ASGI middleware, until the last byte
of the response is sent (exports stream).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metering_pipeline.observability import process_registry

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # any other is "other"
LABELS = ("method", "route", "status")
# Seconds: reads of the followed catalogs take milliseconds, ClickHouse queries and acknowledged Kafka writes up to
# seconds, a streamed export longer.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RequestMetrics:
    """One API instance's registry and request instruments."""

    def __init__(self) -> None:
        self.registry = process_registry()
        self.requests = Counter(
            "metering_api_requests",
            "HTTP requests answered, by method, route template and status.",
            LABELS,
            registry=self.registry,
        )
        self.seconds = Histogram(
            "metering_api_request_seconds",
            "From a request's arrival to the last byte of its response, by method, route template and status.",
            LABELS,
            buckets=BUCKETS,
            registry=self.registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method if method in METHODS else "other", route, str(status))
        self.requests.labels(*labels).inc()
        self.seconds.labels(*labels).observe(seconds)


class RequestMetricsMiddleware:
    """Counts and times every HTTP request into a RequestMetrics."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers when the app raises before responding

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")  # set by the router on a (full or method-mismatch) match
            template = getattr(route, "path", None) or UNMATCHED
            self.metrics.observe(scope["method"], template, status, time.perf_counter() - started)
