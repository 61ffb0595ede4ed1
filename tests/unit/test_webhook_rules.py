"""Webhooks' pure rules: signatures (checked with the Standard Webhooks reference library), the retry schedule, what
an attempt's outcome makes of a delivery, which endpoints an event goes to, rotation, and refused destinations."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from metering_pipeline.settings import Settings
from metering_pipeline.webhooks.deliveries import (
    DECODE,
    ENCODE,
    Delivery,
    Outcome,
    after_attempt,
    fan_out,
    given_up,
    secrets_in_force,
)
from metering_pipeline.webhooks.destinations import PublicResolver, RefusedDestination, check_url, refused_address
from metering_pipeline.webhooks.dispatcher import _Owned
from metering_pipeline.webhooks.endpoints import new_endpoint, resend, rotated, shown
from metering_pipeline.webhooks.schedule import DEFAULT_SCHEDULE, next_attempt_at, parse_schedule
from metering_pipeline.webhooks.sender import WebhookSender
from metering_pipeline.webhooks.signing import message_id, new_secret, signature_header, signing_key
from metering_schemas.webhook import WebhookDeliveryStatus, WebhookEventType

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
EXCEEDED = WebhookEventType.THRESHOLD_EXCEEDED
SETTINGS = Settings(webhook_allow_http=True, webhook_allow_private=True)


def _delivery(attempts: int = 0, **changes: object) -> Delivery:
    fields: dict[str, object] = {
        "id": message_id("alert-1"),
        "endpoint_id": "we_1",
        "event_id": "alert-1",
        "event_type": "threshold.exceeded",
        "body": '{"id":"alert-1"}',
        "attempts": attempts,
        "due_ms": 0,
    }
    return Delivery(**(fields | changes))  # type: ignore[arg-type]


def test_a_signature_verifies_with_the_reference_library_and_not_once_the_body_changes():
    secret = new_secret()
    assert secret.startswith("whsec_") and len(signing_key(secret)) >= 24
    body, timestamp = b'{"type":"threshold.exceeded","value":"10.5"}', int(NOW.timestamp())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header([secret], "msg_1", timestamp, body),
    }
    reference = Webhook(secret)
    assert reference.sign("msg_1", NOW, body) == headers["webhook-signature"]
    with pytest.raises(WebhookVerificationError):  # too old for the reference library's 5-minute tolerance
        reference.verify(body, headers)
    now = int(datetime.now(UTC).timestamp())
    fresh = headers | {
        "webhook-timestamp": str(now),
        "webhook-signature": signature_header([secret], "msg_1", now, body),
    }
    assert reference.verify(body, fresh) == {"type": "threshold.exceeded", "value": "10.5"}
    with pytest.raises(WebhookVerificationError):
        reference.verify(body.replace(b"10.5", b"11.5"), fresh)


def test_during_a_rotation_either_secret_verifies():
    old, new = new_secret(), new_secret()
    now = int(datetime.now(UTC).timestamp())
    header = signature_header([new, old], "msg_1", now, b"{}")
    assert len(header.split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(
            b"{}", {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": header}
        )
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(
            b"{}", {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": header}
        )


def test_the_message_id_is_stable_per_event_and_a_header_value():
    assert message_id("t/org:acme/DAILY/2026-12-07/threshold.exceeded@100") == message_id(
        "t/org:acme/DAILY/2026-12-07/threshold.exceeded@100"
    )
    assert message_id("a") != message_id("b")
    assert message_id("ünïcode\nnew line").isascii() and "\n" not in message_id("x\ny")


def test_the_default_schedule_is_standard_webhooks_and_ends_in_failure():
    delays = parse_schedule(DEFAULT_SCHEDULE)
    assert [d.total_seconds() for d in delays] == [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
    assert parse_schedule("0, 200ms, 1.5") == (timedelta(0), timedelta(milliseconds=200), timedelta(seconds=1.5))
    assert next_attempt_at(delays, 1, NOW) == NOW + timedelta(seconds=5)
    assert next_attempt_at(delays, 8, NOW) is None
    with pytest.raises(ValueError, match="'5 minutes' is not a delay"):
        parse_schedule("5s,5 minutes")
    with pytest.raises(ValueError, match="'soon' is not a delay"):
        Settings(webhook_retry_schedule="soon")


def test_an_attempt_delivers_retries_or_fails():
    delays = parse_schedule("0,5s,1m")
    row, following = after_attempt(_delivery(), Outcome(204, 12), delays, NOW)
    assert (row.status, row.attempt, row.status_code, following) == (WebhookDeliveryStatus.DELIVERED, 1, 204, None)
    row, following = after_attempt(_delivery(), Outcome(500, 30, "HTTP 500: oops"), delays, NOW)
    assert row.status is WebhookDeliveryStatus.RETRYING and row.next_attempt_at == NOW + timedelta(seconds=5)
    assert following is not None and (following.attempts, following.due) == (1, NOW + timedelta(seconds=5))
    row, following = after_attempt(_delivery(2), Outcome(None, 15000, "no answer within 15 s"), delays, NOW)
    assert (row.status, row.attempt, row.next_attempt_at, following) == (WebhookDeliveryStatus.FAILED, 3, None, None)
    # A redirect is not a delivery.
    assert after_attempt(_delivery(), Outcome(302, 5, "redirect not followed"), delays, NOW)[0].status == "retrying"


def test_a_resend_goes_through_the_whole_schedule_again_and_keeps_counting_attempts():
    delays = parse_schedule("0,5s")
    failed = given_up(_delivery(7), "endpoint deleted: not sent", NOW)
    again = resend(failed, '{"id":"alert-1"}', NOW)
    assert (again.id, again.attempts, again.resend, again.due) == (failed.delivery_id, 8, True, NOW)
    row, following = after_attempt(again, Outcome(503, 3, "HTTP 503"), delays, NOW)
    assert row.attempt == 9 and following is not None and following.due == NOW + timedelta(seconds=5)
    assert DECODE(ENCODE(again)) == again


def test_an_event_goes_to_the_endpoints_subscribed_to_its_type_that_existed_when_it_was_published():
    exceeded = new_endpoint(SETTINGS, "http://127.0.0.1:9/a", [EXCEEDED], "", NOW)
    defined = new_endpoint(SETTINGS, "http://127.0.0.1:9/b", [WebhookEventType.METRIC_DEFINED], "", NOW)
    later = new_endpoint(SETTINGS, "http://127.0.0.1:9/c", [EXCEEDED], "", NOW + timedelta(seconds=1))
    found = fan_out([exceeded, defined, later], "alert-1", "threshold.exceeded", b'{"id":"alert-1"}', NOW)
    assert [(d.endpoint_id, d.id, d.body, d.due) for d in found] == [
        (exceeded.id, message_id("alert-1"), '{"id":"alert-1"}', NOW)
    ]


def test_a_rotated_secret_signs_beside_the_new_one_for_the_overlap_only():
    endpoint = new_endpoint(SETTINGS, "http://127.0.0.1:9/a", [EXCEEDED], "", NOW)
    turned = rotated(SETTINGS, endpoint, NOW)
    assert turned.secret != endpoint.secret and turned.previous_secret == endpoint.secret
    assert secrets_in_force(turned, NOW + timedelta(hours=23)) == [turned.secret, endpoint.secret]
    assert secrets_in_force(turned, NOW + timedelta(hours=24)) == [turned.secret]
    answer = shown(turned).model_dump_json()
    assert endpoint.secret not in answer and turned.secret not in answer and '"secret"' not in answer


def test_http_and_private_addresses_are_refused_unless_allowed():
    strict = Settings()
    with pytest.raises(RefusedDestination, match="https"):
        check_url("http://example.com/hook", strict.webhook_allow_http, strict.webhook_allow_private)
    for address in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "[::1]", "[::ffff:127.0.0.1]"):
        with pytest.raises(RefusedDestination, match="METERING_WEBHOOK_ALLOW_PRIVATE"):
            check_url(f"https://{address}/hook", False, False)
        check_url(f"https://{address}/hook", False, True)
    check_url("https://example.com/hook", False, False)  # a name: its addresses are checked when it is resolved
    assert refused_address("93.184.215.14") is None and refused_address("172.16.0.1") is not None
    with pytest.raises(RefusedDestination):
        new_endpoint(strict, "https://127.0.0.1/x", [EXCEEDED], "", NOW)


def test_deliveries_are_attempted_once_due_never_twice_at_a_time_nor_before_their_partition_is_read():
    owned = _Owned()
    first, second = _delivery(due_ms=1000), _delivery(endpoint_id="we_2", due_ms=2000)
    owned.put(0, first)
    owned.put(1, second)
    owned.restoring[1] = 5
    assert owned.take_due(500) == []
    assert owned.take_due(3000) == [first]  # partition 1 still being read
    owned.in_flight.add(first.key)
    owned.put(0, first)
    del owned.restoring[1]
    assert owned.take_due(3000) == [second]
    owned.in_flight.clear()
    assert owned.take_due(3000) == [first]
    owned.put(0, rescheduled := _delivery(1, due_ms=9000))
    assert owned.take_due(5000) == [] and owned.take_due(9000) == [rescheduled]
    owned.release([0])
    assert list(owned.pending) == [second.key]


def test_a_name_that_resolves_to_loopback_is_refused_when_the_request_is_made():
    """The address check runs on every resolution, inside aiohttp's connector: no request leaves."""

    async def attempt() -> Outcome:
        async with WebhookSender(Settings(webhook_allow_http=True)) as sender:
            return await sender.post("http://localhost:9/hook", _delivery(), [new_secret()], NOW)

    outcome = asyncio.run(attempt())
    assert outcome.status_code is None and not outcome.delivered
    assert outcome.error.startswith("refused: localhost resolves to no public address"), outcome.error

    async def resolve() -> None:
        await PublicResolver().resolve("localhost", 443)

    with pytest.raises(RefusedDestination, match="loopback"):
        asyncio.run(resolve())
