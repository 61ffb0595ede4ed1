"""The e-mail an alert becomes (pure: no I/O)."""

from __future__ import annotations

import email.policy
import hashlib
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

# SMTP line endings; headers up to RFC 5322's 998 characters, so the alert id header stays on one line.
_POLICY = email.policy.SMTP.clone(max_line_length=998)


def message_id(alert_id: str, address: str, sender: str) -> str:
    """Deterministic, so a message re-sent after a crash is recognisably the same one."""
    digest = hashlib.sha256(f"{alert_id}\n{address}".encode()).hexdigest()[:32]
    domain = sender.rpartition("@")[2] or "metering.local"
    return f"<{digest}@{domain}>"


def alert_email(alert: dict[str, Any], address: str, sender: str) -> EmailMessage:
    verb = "has exceeded" if alert["type"] == "threshold.exceeded" else "is approaching"
    subject = f"{alert['subjectType']}:{alert['subjectId']}"
    message = EmailMessage(policy=_POLICY)
    message["From"] = sender
    message["To"] = address
    message["Subject"] = (
        f"[metering] {subject} {verb} its {alert['metricKey']} limit ({alert['value']} / {alert['threshold']})"
    )
    message["Message-ID"] = message_id(alert["id"], address, sender)
    message["Date"] = format_datetime(datetime.fromisoformat(alert["occurredAt"].replace("Z", "+00:00")))
    message["X-Metering-Alert-Id"] = alert["id"]
    message.set_content(
        f"{subject} {verb} its limit on {alert['metricKey']}.\n\n"
        f"  value:     {alert['value']}\n"
        f"  threshold: {alert['threshold']}\n"
        f"  action:    {alert['action']}\n"
        f"  period:    {alert['periodType']} {alert['periodStart']} to {alert['periodEnd']}\n"
        f"  threshold id: {alert['thresholdId']}\n"
        f"  alert id:     {alert['id']}\n"
    )
    return message
