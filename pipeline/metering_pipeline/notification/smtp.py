"""Sends e-mail through the configured SMTP server (aiosmtplib)."""

from __future__ import annotations

from email.message import EmailMessage

import aiosmtplib

from metering_pipeline.settings import Settings


class SmtpSender:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def send(self, message: EmailMessage) -> None:
        """Sends the message as its own policy renders it (aiosmtplib would re-fold long headers)."""
        s = self.settings
        await aiosmtplib.send(
            message.as_bytes(),
            sender=message["From"],
            recipients=[message["To"]],
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
            use_tls=s.smtp_security == "tls",
            start_tls=True if s.smtp_security == "starttls" else False,
            timeout=s.smtp_timeout,
        )
