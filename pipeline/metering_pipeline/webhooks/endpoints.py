"""Creating, changing and rotating webhook endpoints, and resending a delivery: what the API and the CLI share."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime

from metering_pipeline.settings import Settings
from metering_pipeline.webhooks.deliveries import Delivery
from metering_pipeline.webhooks.destinations import check_url
from metering_pipeline.webhooks.signing import new_secret
from metering_schemas.webhook import (
    WebhookAttempt,
    WebhookEndpoint,
    WebhookEndpointInfo,
    WebhookEndpointSecret,
    WebhookEventType,
)


def new_endpoint(
    settings: Settings, url: str, event_types: Sequence[WebhookEventType], description: str, now: datetime
) -> WebhookEndpoint:
    """An endpoint with a new id and secret; RefusedDestination when the settings do not allow its URL."""
    check_url(url, settings.webhook_allow_http, settings.webhook_allow_private)
    return WebhookEndpoint(
        id="we_" + secrets.token_hex(12),
        url=url,
        event_types=list(dict.fromkeys(event_types)),
        description=description,
        secret=new_secret(),
        created_at=now,
        updated_at=now,
    )


def changed_endpoint(
    settings: Settings,
    current: WebhookEndpoint,
    now: datetime,
    url: str | None = None,
    event_types: Sequence[WebhookEventType] | None = None,
    description: str | None = None,
) -> WebhookEndpoint:
    """The endpoint with the given fields changed (its pending deliveries go to the new URL)."""
    if url is not None:
        check_url(url, settings.webhook_allow_http, settings.webhook_allow_private)
    changes: dict[str, object] = {"updated_at": now}
    if url is not None:
        changes["url"] = url
    if event_types is not None:
        changes["event_types"] = list(dict.fromkeys(event_types))
    if description is not None:
        changes["description"] = description
    return WebhookEndpoint.model_validate(current.model_dump() | changes)


def rotated(settings: Settings, current: WebhookEndpoint, now: datetime) -> WebhookEndpoint:
    """A new secret; the old one keeps signing too for METERING_WEBHOOK_ROTATION_OVERLAP (a second rotation within
    it retires the first old secret at once)."""
    return WebhookEndpoint.model_validate(
        current.model_dump()
        | {
            "secret": new_secret(),
            "previous_secret": current.secret,
            "previous_secret_expires_at": now + settings.webhook_rotation_overlap,
            "updated_at": now,
        }
    )


def shown(endpoint: WebhookEndpoint) -> WebhookEndpointInfo:
    return WebhookEndpointInfo.model_validate(endpoint.model_dump(include=set(WebhookEndpointInfo.model_fields)))


def with_secret(endpoint: WebhookEndpoint) -> WebhookEndpointSecret:
    return WebhookEndpointSecret.model_validate(endpoint.model_dump(include=set(WebhookEndpointSecret.model_fields)))


def resend(last: WebhookAttempt, payload: str, now: datetime) -> Delivery:
    """A delivery attempted again from now on, through the whole schedule, as it was first sent (same webhook-id)."""
    return Delivery(
        last.delivery_id,
        last.endpoint_id,
        last.event_id,
        last.event_type.value,
        payload,
        last.attempt,
        int(now.timestamp() * 1000),
        resend=True,
        resent_after=last.attempt,
    )
