"""`metering notifier`: e-mail the addresses of threshold alerts (SMTP settings: METERING_SMTP_*)."""

from __future__ import annotations

import asyncio
import signal

import click

from metering_pipeline.settings import Settings


@click.command()
@click.pass_obj
def notifier(settings: Settings) -> None:
    """Consume metering.alerts and send one e-mail per alert per notifyEmails address."""
    from metering_pipeline.notification.notifier import Notifier
    from metering_pipeline.notification.smtp import SmtpSender
    from metering_pipeline.warehouse.client import connect
    from metering_pipeline.warehouse.deliveries import DeliveryLog

    async def run() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        with connect(settings) as client:
            await Notifier(settings, DeliveryLog(client), SmtpSender(settings)).run(stopping)

    asyncio.run(run())
