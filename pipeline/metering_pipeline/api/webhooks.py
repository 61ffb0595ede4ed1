"""Webhook endpoints (create, read, update, delete, rotate their secret) and their delivery log (list, resend).

Endpoints receive every subject's events, so they are managed with keys that act for every org (a key scoped to
one org is refused with 403).
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Query, Request, Response

from metering_pipeline.api.context import ApiContext, context_of
from metering_pipeline.api.errors import ERROR_RESPONSES, ApiError, FieldProblem
from metering_pipeline.api.security import AuthenticatedRoute, Caller, reader, writer
from metering_pipeline.warehouse.webhook_deliveries import MAX_PAGE, endpoint_attempts, last_attempt
from metering_pipeline.webhooks.deliveries import ENCODE
from metering_pipeline.webhooks.destinations import RefusedDestination
from metering_pipeline.webhooks.endpoints import changed_endpoint, new_endpoint, resend, rotated, shown, with_secret
from metering_schemas._base import WireModel
from metering_schemas.webhook import (
    Description,
    EventTypes,
    WebhookAttempt,
    WebhookDeliveryStatus,
    WebhookEndpoint,
    WebhookEndpointInfo,
    WebhookEndpointSecret,
    WebhookUrl,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], route_class=AuthenticatedRoute, responses=ERROR_RESPONSES)


class WebhookInput(WireModel):
    """The body of `POST /v1/webhooks`."""

    url: WebhookUrl
    event_types: EventTypes
    description: Description = ""


class WebhookChange(WireModel):
    """The body of `PUT /v1/webhooks/{id}`: the fields to change."""

    url: WebhookUrl | None = None
    event_types: EventTypes | None = None
    description: Description | None = None


class WebhookList(WireModel):
    webhooks: list[WebhookEndpointInfo]


class WebhookDeliveryList(WireModel):
    deliveries: list[WebhookAttempt] = []


class Resent(WireModel):
    delivery_id: str
    endpoint_id: str


def _admin(who: Caller) -> None:
    if who.org_id is not None:
        raise ApiError(
            403, "forbidden_org", "webhooks receive every org's events: manage them with a key for every org"
        )


def _endpoint(context: ApiContext, webhook_id: str) -> WebhookEndpoint:
    found = context.webhooks.get(webhook_id)
    if found is None:
        raise ApiError(404, "not_found", f"no webhook endpoint {webhook_id!r}")
    return found


def _refused(refused: RefusedDestination) -> ApiError:
    return ApiError(422, "refused_url", str(refused), [FieldProblem(field="body.url", message=str(refused))])


@router.post("", status_code=201, response_model=WebhookEndpointSecret, summary="webhook.create")
async def create_webhook(body: WebhookInput, request: Request, who: Caller = Depends(writer)) -> WebhookEndpointSecret:
    """A new endpoint. Its signing secret is in this answer only (and in rotate-secret's)."""
    _admin(who)
    context = context_of(request)
    try:
        endpoint = new_endpoint(context.settings, body.url, body.event_types, body.description, datetime.now(UTC))
    except RefusedDestination as refused:
        raise _refused(refused) from None
    await context.publish(context.webhooks, endpoint.id, endpoint)
    return with_secret(endpoint)


@router.get("", response_model=WebhookList, summary="webhook.list")
async def list_webhooks(request: Request, who: Caller = Depends(reader)) -> WebhookList:
    _admin(who)
    endpoints = sorted(context_of(request).webhooks.values(), key=lambda endpoint: endpoint.created_at)
    return WebhookList(webhooks=[shown(endpoint) for endpoint in endpoints])


@router.get("/{webhook_id}", response_model=WebhookEndpointInfo, summary="webhook.get")
async def get_webhook(webhook_id: str, request: Request, who: Caller = Depends(reader)) -> WebhookEndpointInfo:
    _admin(who)
    return shown(_endpoint(context_of(request), webhook_id))


@router.put("/{webhook_id}", response_model=WebhookEndpointInfo, summary="webhook.update")
async def update_webhook(
    webhook_id: str, body: WebhookChange, request: Request, who: Caller = Depends(writer)
) -> WebhookEndpointInfo:
    """Deliveries still pending go to the new URL."""
    _admin(who)
    context = context_of(request)
    current = _endpoint(context, webhook_id)
    try:
        endpoint = changed_endpoint(
            context.settings, current, datetime.now(UTC), body.url, body.event_types, body.description
        )
    except RefusedDestination as refused:
        raise _refused(refused) from None
    await context.publish(context.webhooks, endpoint.id, endpoint)
    return shown(endpoint)


@router.delete("/{webhook_id}", status_code=204, summary="webhook.delete")
async def delete_webhook(webhook_id: str, request: Request, who: Caller = Depends(writer)) -> Response:
    """Its pending deliveries stop: each is logged failed, unsent, when it falls due."""
    _admin(who)
    context = context_of(request)
    _endpoint(context, webhook_id)
    await context.publish(context.webhooks, webhook_id, None)
    return Response(status_code=204)


@router.post("/{webhook_id}/rotate-secret", response_model=WebhookEndpointSecret, summary="webhook.rotateSecret")
async def rotate_secret(webhook_id: str, request: Request, who: Caller = Depends(writer)) -> WebhookEndpointSecret:
    """A new signing secret. Until `previousSecretExpiresAt` (METERING_WEBHOOK_ROTATION_OVERLAP, 24 h by default)
    deliveries carry a signature with each secret, so the receiver can move to the new one at any time within."""
    _admin(who)
    context = context_of(request)
    endpoint = rotated(context.settings, _endpoint(context, webhook_id), datetime.now(UTC))
    await context.publish(context.webhooks, endpoint.id, endpoint)
    return with_secret(endpoint)


@router.get("/{webhook_id}/deliveries", response_model=WebhookDeliveryList, summary="webhook.deliveries")
async def list_deliveries(
    webhook_id: str,
    request: Request,
    status: WebhookDeliveryStatus | None = Query(default=None, description="Only attempts with this outcome"),
    limit: int = Query(default=50, ge=1, le=MAX_PAGE),
    offset: int = Query(default=0, ge=0, description="Attempts to skip: the next page starts at offset + limit"),
    who: Caller = Depends(reader),
) -> WebhookDeliveryList:
    """The endpoint's delivery attempts, newest first (an endpoint deleted since keeps its log)."""
    _admin(who)
    context = context_of(request)
    return WebhookDeliveryList(deliveries=await context.query(endpoint_attempts, webhook_id, status, limit, offset))


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/resend", status_code=202, response_model=Resent, summary="webhook.resend"
)
async def resend_delivery(webhook_id: str, delivery_id: str, request: Request, who: Caller = Depends(writer)) -> Resent:
    """Sends the delivery again as it was first sent (same body and `webhook-id`), through the whole retry schedule:
    accepted here, attempted by `metering webhooks` at once."""
    _admin(who)
    context = context_of(request)
    _endpoint(context, webhook_id)
    found = await context.query(last_attempt, webhook_id, delivery_id)
    if found is None:
        raise ApiError(404, "not_found", f"no delivery {delivery_id!r} of webhook endpoint {webhook_id!r}")
    delivery = resend(*found, datetime.now(UTC))
    await context.writers[context.topics.webhook_deliveries].put(delivery.key, ENCODE(delivery))
    return Resent(delivery_id=delivery.id, endpoint_id=delivery.endpoint_id)
