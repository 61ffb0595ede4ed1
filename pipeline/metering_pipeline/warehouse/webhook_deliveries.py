"""Webhook delivery attempts in ClickHouse (`webhook_deliveries`): the delivery log the API pages through, and what a
resend sends again."""

from __future__ import annotations

from collections.abc import Sequence

from clickhouse_connect.driver.client import Client

from metering_schemas.webhook import WebhookAttempt, WebhookDeliveryStatus

_COLUMNS = [
    "endpoint_id",
    "delivery_id",
    "event_id",
    "event_type",
    "attempt",
    "status",
    "status_code",
    "latency_ms",
    "error",
    "attempted_at",
    "next_attempt_at",
    "payload",
]
_ATTEMPT = ", ".join(_COLUMNS[:-1])
MAX_PAGE = 500


def record_attempt(client: Client, attempt: WebhookAttempt, payload: str) -> None:
    row = [
        attempt.endpoint_id,
        attempt.delivery_id,
        attempt.event_id,
        attempt.event_type.value,
        attempt.attempt,
        attempt.status.value,
        attempt.status_code,
        attempt.latency_ms,
        attempt.error,
        attempt.attempted_at,
        attempt.next_attempt_at,
        payload,
    ]
    client.insert("webhook_deliveries", [row], column_names=_COLUMNS)


def was_delivered(client: Client, endpoint_id: str, delivery_id: str) -> bool:
    """Whether any attempt delivered it (a fan-out replayed after a crash is then not sent again)."""
    result = client.query(
        "SELECT count() FROM webhook_deliveries WHERE endpoint_id = {endpoint:String} "
        "AND delivery_id = {delivery:String} AND status = {delivered:String}",
        parameters={"endpoint": endpoint_id, "delivery": delivery_id, "delivered": WebhookDeliveryStatus.DELIVERED},
    )
    return bool(result.result_rows[0][0])


def endpoint_attempts(
    client: Client, endpoint_id: str, status: WebhookDeliveryStatus | None, limit: int, offset: int
) -> list[WebhookAttempt]:
    """An endpoint's attempts, newest first."""
    where = "endpoint_id = {endpoint:String}" + (" AND status = {status:String}" if status else "")
    result = client.query(
        f"SELECT {_ATTEMPT} FROM webhook_deliveries FINAL WHERE {where} "
        "ORDER BY attempted_at DESC, delivery_id, attempt DESC LIMIT {limit:UInt32} OFFSET {offset:UInt32}",
        parameters={
            "endpoint": endpoint_id,
            "status": status.value if status else "",
            "limit": limit,
            "offset": offset,
        },
    )
    return [_attempt(row) for row in result.result_rows]


def last_attempt(client: Client, endpoint_id: str, delivery_id: str) -> tuple[WebhookAttempt, str] | None:
    """A delivery's latest attempt and its payload (None: no such delivery)."""
    result = client.query(
        f"SELECT {_ATTEMPT}, payload FROM webhook_deliveries FINAL WHERE endpoint_id = {{endpoint:String}} "
        "AND delivery_id = {delivery:String} ORDER BY attempt DESC LIMIT 1",
        parameters={"endpoint": endpoint_id, "delivery": delivery_id},
    )
    if not result.result_rows:
        return None
    row = result.result_rows[0]
    return _attempt(row[:-1]), row[-1]


def _attempt(row: Sequence[object]) -> WebhookAttempt:
    return WebhookAttempt.model_validate(dict(zip(_COLUMNS, row, strict=False)))
