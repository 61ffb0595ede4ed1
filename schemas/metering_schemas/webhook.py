"""Webhook endpoints (the compacted `metering.webhooks` topic) and their delivery attempts.

An endpoint receives the events it subscribes to as HTTP POSTs signed to the Standard Webhooks scheme: the body is the
event exactly as on its Kafka topic.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, ConfigDict, Field

from metering_schemas._base import MAX_DESCRIPTION, Identifier, UtcDatetime, WireModel

MAX_URL = 2048  # characters


class WebhookEventType(str, Enum):
    """The events an endpoint can subscribe to: the alerts of `metering.alerts` and the definitions of
    `metering.events`. usage.aggregated is not one: one per changed rollup per checkpoint is a stream to consume from
    Kafka, not to POST."""

    THRESHOLD_APPROACHING = "threshold.approaching"
    THRESHOLD_EXCEEDED = "threshold.exceeded"
    METRIC_DEFINED = "metric.defined"


def http_url(url: str) -> str:
    """`url` if it is an absolute http(s) URL with a host (and a valid port), else ValueError saying what is wrong."""
    if any(character.isspace() or not character.isprintable() for character in url):
        raise ValueError(f"{url[:100]!r} contains white space or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as error:
        raise ValueError(f"{url[:100]!r} is not a URL: {error}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{url[:100]!r} is not an http(s) URL")
    if not parts.hostname:
        raise ValueError(f"{url[:100]!r} has no host")
    return url


WebhookUrl = Annotated[
    str,
    Field(
        min_length=8, max_length=MAX_URL, description="Where events are POSTed: `https://…` (http only when allowed)"
    ),
    AfterValidator(http_url),
]
EventTypes = Annotated[list[WebhookEventType], Field(min_length=1, description="The event types it receives")]
Description = Annotated[str, Field(max_length=MAX_DESCRIPTION)]


class WebhookEndpointInfo(WireModel):
    """A webhook endpoint as the API shows it: everything but its secrets."""

    id: Identifier
    url: WebhookUrl
    event_types: EventTypes
    description: Description = ""
    created_at: UtcDatetime = Field(description="Events published from then on are delivered to it")
    updated_at: UtcDatetime
    previous_secret_expires_at: UtcDatetime | None = Field(
        default=None,
        description="After a rotation: until then, deliveries carry a signature with the old secret as well",
    )


class WebhookEndpointSecret(WebhookEndpointInfo):
    """An endpoint with its signing secret: the answer of create and rotate-secret, the only ones that show it."""

    secret: str = Field(description="`whsec_` + base64 of the signing key: configure the receiver with it")


class WebhookEndpoint(WebhookEndpointSecret):
    """One entry of the compacted `metering.webhooks` topic, keyed by `id`. The topic holds the secrets: protect it
    as the API keys file is."""

    model_config = ConfigDict(hide_input_in_errors=True)  # an invalid entry is logged: never with its secrets

    previous_secret: str | None = Field(default=None, description="The secret before the last rotation")


class WebhookDeliveryStatus(str, Enum):
    """What an attempt led to: `delivered` (a 2xx in time), `retrying` (another attempt is due at nextAttemptAt),
    `failed` (the schedule is spent, or the endpoint was deleted; a resend starts it again)."""

    DELIVERED = "delivered"
    RETRYING = "retrying"
    FAILED = "failed"


class WebhookAttempt(WireModel):
    """One attempt to deliver one event to one endpoint: a row of ClickHouse's `webhook_deliveries`."""

    delivery_id: str = Field(description="The `webhook-id` header: one per event, the same for every attempt")
    endpoint_id: Identifier
    event_id: str
    event_type: WebhookEventType
    attempt: int = Field(ge=1, description="1 for the first attempt; a resend goes on counting")
    status: WebhookDeliveryStatus
    status_code: int | None = Field(default=None, description="The receiver's HTTP status; absent when none came")
    latency_ms: int = Field(ge=0)
    error: str = ""
    attempted_at: UtcDatetime
    next_attempt_at: UtcDatetime | None = None
