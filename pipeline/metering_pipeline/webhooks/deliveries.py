"""A delivery: one event on its way to one endpoint, and what each attempt makes of it.

Pure: the dispatcher keeps deliveries on a compacted topic and attempts them; this module decides what an attempt's
outcome means (delivered, the next attempt's time, or failed) and which endpoints an event goes to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec

from metering_pipeline.webhooks.schedule import next_attempt_at
from metering_pipeline.webhooks.signing import message_id
from metering_schemas.webhook import WebhookAttempt, WebhookDeliveryStatus, WebhookEndpoint, WebhookEventType

EVENT_TYPES = frozenset(event_type.value for event_type in WebhookEventType)


class Delivery(msgspec.Struct, frozen=True, rename="camel"):
    """The value of a `webhook-deliveries` entry, keyed `key`: a delivery still to attempt."""

    id: str  # the webhook-id header
    endpoint_id: str
    event_id: str
    event_type: str
    body: str  # the event exactly as on its topic
    attempts: int  # attempts made so far
    due_ms: int  # when the next is due (epoch milliseconds)
    resend: bool = False  # asked through the API: sent even if an earlier attempt delivered it
    resent_after: int = 0  # the attempts made before the resend: the schedule starts again after them

    @property
    def key(self) -> str:
        return delivery_key(self.endpoint_id, self.id)

    @property
    def due(self) -> datetime:
        return datetime.fromtimestamp(self.due_ms / 1000, tz=UTC)


def delivery_key(endpoint_id: str, delivery_id: str) -> str:
    return f"{endpoint_id}/{delivery_id}"


ENCODE = msgspec.json.Encoder().encode
DECODE = msgspec.json.Decoder(Delivery).decode


@dataclass(frozen=True)
class Outcome:
    """What one POST came to: the receiver's status (None when none came) and why it failed, if it did."""

    status_code: int | None
    latency_ms: int
    error: str = ""

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300 and not self.error


def fan_out(
    endpoints: Iterable[WebhookEndpoint], event_id: str, event_type: str, body: bytes, published: datetime
) -> list[Delivery]:
    """The deliveries of one event: one per endpoint subscribed to its type that existed when it was published (an
    endpoint receives events from its creation on, never the topic's history)."""
    due_ms = int(published.timestamp() * 1000)
    text = body.decode()
    return [
        Delivery(message_id(event_id), endpoint.id, event_id, event_type, text, 0, due_ms)
        for endpoint in endpoints
        if event_type in endpoint.event_types and endpoint.created_at <= published
    ]


def after_attempt(
    delivery: Delivery, outcome: Outcome, delays: tuple[timedelta, ...], at: datetime
) -> tuple[WebhookAttempt, Delivery | None]:
    """The attempt's log row, and the delivery as it stands after it (None: delivered or failed, nothing left to do)."""
    attempts = delivery.attempts + 1
    next_at = None if outcome.delivered else next_attempt_at(delays, attempts - delivery.resent_after, at)
    if outcome.delivered:
        status = WebhookDeliveryStatus.DELIVERED
    elif next_at is None:
        status = WebhookDeliveryStatus.FAILED
    else:
        status = WebhookDeliveryStatus.RETRYING
    row = attempt_row(delivery, attempts, status, outcome, at, next_at)
    if next_at is None:
        return row, None
    return row, msgspec.structs.replace(delivery, attempts=attempts, due_ms=int(next_at.timestamp() * 1000))


def given_up(delivery: Delivery, reason: str, at: datetime) -> WebhookAttempt:
    """The row of a delivery that ends without a request (its endpoint deleted, its body too large)."""
    return attempt_row(
        delivery, delivery.attempts + 1, WebhookDeliveryStatus.FAILED, Outcome(None, 0, reason), at, None
    )


def attempt_row(
    delivery: Delivery,
    attempt: int,
    status: WebhookDeliveryStatus,
    outcome: Outcome,
    at: datetime,
    next_at: datetime | None,
) -> WebhookAttempt:
    return WebhookAttempt(
        delivery_id=delivery.id,
        endpoint_id=delivery.endpoint_id,
        event_id=delivery.event_id,
        event_type=WebhookEventType(delivery.event_type),
        attempt=attempt,
        status=status,
        status_code=outcome.status_code,
        latency_ms=outcome.latency_ms,
        error=outcome.error[:1000],
        attempted_at=at,
        next_attempt_at=next_at,
    )


def secrets_in_force(endpoint: WebhookEndpoint, at: datetime) -> list[str]:
    """The secrets a delivery at `at` is signed with: the endpoint's, and the one it replaced while that is still in
    its overlap."""
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and expires is not None and at < expires:
        return [endpoint.secret, endpoint.previous_secret]
    return [endpoint.secret]
