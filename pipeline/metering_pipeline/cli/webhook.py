"""`metering webhook create | list | update | delete | rotate-secret | deliveries | resend` (endpoints on the compacted
`metering.webhooks` topic, the log in ClickHouse) and `metering webhooks`, the process that delivers."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime

import click
from pydantic import TypeAdapter, ValidationError

from metering_pipeline import tables
from metering_pipeline.cli import catalog
from metering_pipeline.cli.params import field_errors
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics
from metering_pipeline.webhooks.destinations import RefusedDestination
from metering_schemas.webhook import WebhookDeliveryStatus, WebhookEndpoint, WebhookEventType, WebhookUrl

_EVENT_TYPES = click.Choice([event_type.value for event_type in WebhookEventType])
_URL: TypeAdapter[str] = TypeAdapter(WebhookUrl)


@click.group()
def webhook() -> None:
    """Webhook endpoints (topic metering.webhooks) and their deliveries; `metering webhooks` delivers."""


def _endpoints(settings: Settings) -> dict[str, WebhookEndpoint]:
    return catalog.read(settings, Topics.of(settings).webhooks, WebhookEndpoint)


def _endpoint(settings: Settings, webhook_id: str) -> WebhookEndpoint:
    found = _endpoints(settings).get(webhook_id)
    if found is None:
        raise click.ClickException(f"no webhook endpoint {webhook_id!r}")
    return found


def _url(url: str) -> str:
    try:
        return _URL.validate_python(url)
    except ValidationError as error:
        raise click.UsageError(f"--url: {field_errors(error)}") from None


def _table(endpoints: list[WebhookEndpoint]) -> str:
    rows = [
        (e.id, e.url, ", ".join(t.value for t in e.event_types), e.description, e.created_at.strftime("%Y-%m-%d %H:%M"))
        for e in endpoints
    ]
    return tables.render(["id", "url", "event types", "description", "created (UTC)"], rows)


def _save(settings: Settings, endpoint: WebhookEndpoint, show_secret: bool) -> None:
    catalog.write(settings, Topics.of(settings).webhooks, endpoint.id, endpoint)
    click.echo(_table([endpoint]))
    if show_secret:
        click.echo(f"signing secret (shown once): {endpoint.secret}")


@webhook.command("create")
@click.option("--url", required=True, help="Where events are POSTed (https://…).")
@click.option("--event-type", "event_types", type=_EVENT_TYPES, multiple=True, required=True, help="Repeatable.")
@click.option("--description", default="", help="What the endpoint is for.")
@click.pass_obj
def create(settings: Settings, url: str, event_types: tuple[str, ...], description: str) -> None:
    """Create an endpoint; its signing secret is printed once."""
    from metering_pipeline.webhooks.endpoints import new_endpoint

    try:
        endpoint = new_endpoint(
            settings, _url(url), [WebhookEventType(t) for t in event_types], description, datetime.now(UTC)
        )
    except RefusedDestination as refused:
        raise click.UsageError(f"--url: {refused}") from None
    _save(settings, endpoint, show_secret=True)


@webhook.command("list")
@click.pass_obj
def list_endpoints(settings: Settings) -> None:
    """The endpoints (never their secrets)."""
    click.echo(_table(sorted(_endpoints(settings).values(), key=lambda endpoint: endpoint.created_at)))


@webhook.command("update")
@click.argument("webhook_id")
@click.option("--url", default=None, help="A new URL: pending deliveries go there.")
@click.option("--event-type", "event_types", type=_EVENT_TYPES, multiple=True, help="Replaces the event types.")
@click.option("--description", default=None)
@click.pass_obj
def update(
    settings: Settings, webhook_id: str, url: str | None, event_types: tuple[str, ...], description: str | None
) -> None:
    """Change an endpoint's URL, event types or description."""
    from metering_pipeline.webhooks.endpoints import changed_endpoint

    current = _endpoint(settings, webhook_id)
    types = [WebhookEventType(t) for t in event_types] or None
    try:
        endpoint = changed_endpoint(
            settings, current, datetime.now(UTC), None if url is None else _url(url), types, description
        )
    except RefusedDestination as refused:
        raise click.UsageError(f"--url: {refused}") from None
    _save(settings, endpoint, show_secret=False)


@webhook.command("delete")
@click.argument("webhook_id")
@click.pass_obj
def delete(settings: Settings, webhook_id: str) -> None:
    """Delete an endpoint: its pending deliveries stop."""
    _endpoint(settings, webhook_id)
    catalog.write(settings, Topics.of(settings).webhooks, webhook_id, None)
    click.echo(f"deleted {webhook_id}")


@webhook.command("rotate-secret")
@click.argument("webhook_id")
@click.pass_obj
def rotate_secret(settings: Settings, webhook_id: str) -> None:
    """A new signing secret (printed once); the old one signs too for METERING_WEBHOOK_ROTATION_OVERLAP."""
    from metering_pipeline.webhooks.endpoints import rotated

    _save(settings, rotated(settings, _endpoint(settings, webhook_id), datetime.now(UTC)), show_secret=True)


@webhook.command("deliveries")
@click.argument("webhook_id")
@click.option("--status", type=click.Choice([s.value for s in WebhookDeliveryStatus]), default=None)
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.pass_obj
def deliveries(settings: Settings, webhook_id: str, status: str | None, limit: int) -> None:
    """An endpoint's delivery attempts, newest first."""
    from metering_pipeline.warehouse.client import connect
    from metering_pipeline.warehouse.webhook_deliveries import endpoint_attempts

    with connect(settings) as client:
        attempts = endpoint_attempts(client, webhook_id, WebhookDeliveryStatus(status) if status else None, limit, 0)
    rows = [
        (
            a.attempted_at.strftime("%Y-%m-%d %H:%M:%S"),
            a.delivery_id,
            a.event_type.value,
            a.attempt,
            a.status.value,
            "" if a.status_code is None else a.status_code,
            a.latency_ms,
            a.error,
        )
        for a in attempts
    ]
    click.echo(tables.render(["at (UTC)", "delivery", "event type", "attempt", "status", "HTTP", "ms", "error"], rows))


@webhook.command("resend")
@click.argument("webhook_id")
@click.argument("delivery_id")
@click.pass_obj
def resend_delivery(settings: Settings, webhook_id: str, delivery_id: str) -> None:
    """Send a delivery again as it was first sent, through the whole retry schedule."""
    from metering_pipeline.warehouse.client import connect
    from metering_pipeline.warehouse.webhook_deliveries import last_attempt
    from metering_pipeline.webhooks.deliveries import ENCODE
    from metering_pipeline.webhooks.endpoints import resend

    _endpoint(settings, webhook_id)
    with connect(settings) as client:
        found = last_attempt(client, webhook_id, delivery_id)
    if found is None:
        raise click.ClickException(f"no delivery {delivery_id!r} of webhook endpoint {webhook_id!r}")
    delivery = resend(*found, datetime.now(UTC))
    catalog.write(settings, Topics.of(settings).webhook_deliveries, delivery.key, ENCODE(delivery))
    click.echo(f"resending {delivery_id} to {webhook_id}")


@click.command()
@click.option("--web-port", type=click.IntRange(0, 65535), default=6068, show_default=True, help="/metrics, /health.")
@click.pass_obj
def webhooks(settings: Settings, web_port: int) -> None:
    """Deliver events to the webhook endpoints (run as many as the deliveries topic has partitions)."""
    from metering_pipeline.webhooks.service import serve

    async def run() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await serve(settings, web_port, stopping)

    asyncio.run(run())
