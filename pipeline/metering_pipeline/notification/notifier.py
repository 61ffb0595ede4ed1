"""`metering notifier`: one e-mail per alert per address, never twice across restarts.

A consumer group of its own on `metering.alerts`. Before sending, it asks the delivery log
which addresses already have this alert (a replay after a crash, or a second notifier);
after each send it records the outcome; offsets are committed once a batch is fully
handled. The one gap left: a crash between the SMTP server's acceptance and the log write
re-sends that single message, with the same Message-ID, so mail systems can drop it.
An alert's address that is not a valid e-mail address (an alert written before addresses were checked, or by
another producer) is logged and skipped: nothing is ever sent to it, so nothing reaches an SMTP header unchecked.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from metering_pipeline.logs import get_logger
from metering_pipeline.notification.messages import alert_email
from metering_pipeline.notification.smtp import SmtpSender
from metering_pipeline.retry import RetriesExhausted, any_error, until_success
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics, event_reader
from metering_pipeline.warehouse.deliveries import FAILED, SENT, DeliveryLog
from metering_pipeline.warehouse.errors import is_transient
from metering_schemas.threshold import checked_addresses

log = get_logger(__name__)


class Notifier:
    def __init__(self, settings: Settings, deliveries: DeliveryLog, sender: SmtpSender) -> None:
        self.settings = settings
        self.deliveries = deliveries
        self.sender = sender
        self.sent = 0
        self.failed = 0

    async def run(self, stopping: asyncio.Event) -> None:
        consumer = event_reader(
            self.settings, f"{self.settings.consumer_group_prefix}-notifier", Topics.of(self.settings).alerts
        )
        await consumer.start()
        try:
            while not stopping.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=500)
                for messages in batches.values():
                    for message in messages:
                        await self.handle(message.value)
                if batches:
                    await consumer.commit()
        finally:
            await consumer.stop()

    async def handle(self, value: bytes | None) -> None:
        try:
            alert = orjson.loads(value or b"null")
            emails = alert.get("notifyEmails") or []
            if not isinstance(emails, list):  # a string would be read as one address per character
                raise TypeError(f"notifyEmails is a {type(emails).__name__}, not a list")
            addresses, bad = checked_addresses(emails)
            addresses = list(dict.fromkeys(addresses))
            alert_id = alert["id"]
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as error:
            log.error("unreadable alert skipped", error=str(error))
            return
        for address, reason in bad:
            log.error(
                "invalid e-mail address skipped: nothing is sent to it",
                alert_id=alert_id,
                address=repr(address)[:300],
                reason=reason,
            )
        if not addresses:
            return
        done = await until_success(
            lambda: self.deliveries.sent(alert_id, addresses), "read notification_deliveries", transient=is_transient
        )
        for address in addresses:
            if address not in done:
                await self._deliver(alert, address)

    async def _deliver(self, alert: dict[str, Any], address: str) -> None:
        attempts = 0

        async def send() -> None:
            nonlocal attempts
            attempts += 1
            await self.sender.send(alert_email(alert, address, self.settings.smtp_from))

        try:
            # Every SMTP failure gets the attempts (a refused address may be a full mailbox); then it is recorded
            # failed.
            await until_success(
                send,
                f"e-mail {alert['id']} to {address}",
                max_attempts=self.settings.notify_max_attempts,
                transient=any_error,
            )
        except RetriesExhausted as gave_up:
            self.failed += 1
            # Not `gave_up` in the lambda: an except clause's name is unbound at its end, a closure's call may be later.
            last_error = str(gave_up.error)
            log.error(
                "alert e-mail failed",
                alert_id=alert["id"],
                email=address,
                attempts=gave_up.attempts,
                error=last_error,
            )
            await until_success(
                lambda: self.deliveries.record(alert["id"], address, FAILED, attempts, last_error[:1000]),
                "write notification_deliveries",
                transient=is_transient,
            )
            return
        self.sent += 1
        log.info("alert e-mailed", alert_id=alert["id"], email=address, attempts=attempts)
        await until_success(
            lambda: self.deliveries.record(alert["id"], address, SENT, attempts),
            "write notification_deliveries",
            transient=is_transient,
        )
