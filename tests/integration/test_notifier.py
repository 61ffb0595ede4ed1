"""`metering notifier` end to end: alerts from a real worker, e-mail through a real SMTP server
(aiosmtpd on loopback), delivery status in ClickHouse, no second e-mail after a restart."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import signal
import subprocess
import sys

import pytest
from aiosmtpd.controller import Controller

from metering_pipeline.warehouse.client import connect
from support import define, eventually, free_port, metric, publish, set_thresholds, settings_env, threshold, usage

pytestmark = pytest.mark.integration


class Inbox:
    """aiosmtpd handler: keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], email.message.Message]] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(
            (list(envelope.rcpt_tos), email.message_from_bytes(envelope.content, policy=email.policy.default))
        )
        return "250 OK"

    def wait_for(self, count: int, timeout: float = 60) -> list[tuple[list[str], email.message.Message]]:
        eventually(
            lambda: len(self.messages) >= count,
            timeout,
            interval=0.2,
            message=lambda: f"{len(self.messages)} of {count} e-mails arrived",
        )
        return list(self.messages)


def start_notifier(env: dict[str, str], log_path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "metering_pipeline.cli", "notifier"],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def deliveries(settings) -> set[tuple[str, str, str]]:
    with connect(settings) as client:
        return set(client.query("SELECT alert_id, email, status FROM notification_deliveries FINAL").result_rows)


async def test_each_alert_is_mailed_once_per_address_and_never_again_after_a_restart(pipeline, tmp_path):
    settings, new_worker = pipeline
    inbox = Inbox()
    smtp = Controller(inbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    env = settings_env(settings) | {
        "METERING_SMTP_HOST": "127.0.0.1",
        "METERING_SMTP_PORT": str(smtp.port),
        "METERING_SMTP_FROM": "metering@example.com",
    }
    notifier = start_notifier(env, tmp_path / "notifier-1.log")
    try:
        await define(settings, metric("tokens", "SUM"))
        # An address that is not one (written before addresses were checked): the threshold applies without it, and it
        # is never mailed (no e-mail, no delivery row for it below).
        await set_thresholds(
            settings,
            threshold(
                "t1", "tokens", "org:*", "100", emails=("ops@example.com", "a@b.c\r\nBcc: x@y.z", "cfo@example.com")
            ),
        )
        worker = new_worker().start()
        worker.wait_healthy()
        await publish(settings, [usage("a1", "tokens", "org:acme", "120")])  # approaching and exceeded

        received = await asyncio.to_thread(inbox.wait_for, 4)
        by_alert: dict[str, set[str]] = {}
        for recipients, message in received:
            by_alert.setdefault(message["X-Metering-Alert-Id"], set()).update(recipients)
            assert message["From"] == "metering@example.com"
            assert "org:acme" in message["Subject"] and "tokens" in message["Subject"]
        assert len(by_alert) == 2 and all(r == {"ops@example.com", "cfo@example.com"} for r in by_alert.values())
        assert len({m["Message-ID"] for _, m in received}) == 4
        assert any("exceeded" in m["Subject"] for _, m in received) and any(
            "approaching" in m["Subject"] for _, m in received
        )

        expected = {
            (alert_id, address, "sent") for alert_id in by_alert for address in ("ops@example.com", "cfo@example.com")
        }

        def delivered() -> bool:
            found = deliveries(settings)
            assert found == expected, f"delivery status: {found} != {expected}"
            return True

        await asyncio.to_thread(eventually, delivered, 30)

        # A restarted notifier in a fresh consumer group re-reads every alert from the start: the
        # delivery log stops it from mailing anyone twice, and it still mails what is new.
        stop(notifier)
        notifier = start_notifier(
            env | {"METERING_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix + "-again"},
            tmp_path / "notifier-2.log",
        )
        await publish(settings, [usage("b1", "tokens", "org:globex", "101")])
        await asyncio.to_thread(inbox.wait_for, 8)
        await asyncio.sleep(5)
        assert len(inbox.messages) == 8
        assert len({m["X-Metering-Alert-Id"] for _, m in inbox.messages}) == 4
    finally:
        if notifier.poll() is None:
            stop(notifier)
        smtp.stop()
