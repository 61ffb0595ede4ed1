"""notifyEmails end up in SMTP headers: only e-mail addresses get in, wherever they enter (issue 23).

The API and the CLI validate with `UsageThreshold` (and the API's own input models, which use the same type) and
refuse a bad address; a threshold already on `metering.thresholds` keeps applying without its bad addresses, each
logged; the notifier, the last step before SMTP, skips and logs any address that is not one.
"""

from __future__ import annotations

import json
import socket
from email.message import EmailMessage
from typing import NoReturn

import pytest
from click.testing import CliRunner
from pydantic import ValidationError
from structlog.testing import CapturingLogger

from metering_pipeline import definitions
from metering_pipeline.cli.threshold import threshold as threshold_command
from metering_pipeline.definitions import parse_entry
from metering_pipeline.notification import notifier as notifier_module
from metering_pipeline.notification.notifier import Notifier
from metering_pipeline.settings import Settings
from metering_schemas import ThresholdAction, UsageThreshold
from metering_schemas.threshold import MAX_NOTIFY_EMAILS

INJECTION = "a@b.c\r\nBcc: x@y.z"
BAD_ADDRESSES = [
    INJECTION,
    "a@b.c\nBcc: x@y.z",
    "a@b.c\rx",
    "ops@example.com, x@y.z",
    "ops@example.com x@y.z",
    "ops",
    "",
    "@example.com",
    "ops@",
    "ops@localhost",
    "ops@exa mple.com",
    "ops@example.com\x00",
    "a" * 64 + "@" + ("b" * 62 + ".") * 3 + "com",
    "x" * 100 * 1024,
]
THRESHOLD = {
    "id": "t1",
    "metricKey": "tokens",
    "subjectType": "org",
    "subjectId": "*",
    "threshold": "100",
    "action": "BLOCK",
}


@pytest.mark.parametrize("address", BAD_ADDRESSES, ids=lambda a: repr(a)[:40])
def test_a_threshold_refuses_anything_but_e_mail_addresses(address: str) -> None:
    with pytest.raises(ValidationError) as error:
        UsageThreshold.model_validate({**THRESHOLD, "notifyEmails": ["ops@example.com", address]})
    assert [e["loc"] for e in error.value.errors()] == [("notifyEmails", 1)]


def test_a_threshold_takes_up_to_fifty_addresses() -> None:
    addresses = [f"ops{n}@example.com" for n in range(MAX_NOTIFY_EMAILS)]
    assert UsageThreshold.model_validate({**THRESHOLD, "notifyEmails": addresses}).notify_emails == addresses
    with pytest.raises(ValidationError) as error:
        UsageThreshold.model_validate({**THRESHOLD, "notifyEmails": [*addresses, "one@more.com"]})
    assert [(e["loc"], e["type"]) for e in error.value.errors()] == [(("notifyEmails",), "too_long")]


def test_checking_an_address_looks_nothing_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DNS (email-validator's deliverability check): the API, the CLI and the notifier must not wait on one."""
    import email_validator.deliverability

    def lookup(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("an e-mail address check looked something up")

    monkeypatch.setattr(email_validator.deliverability, "validate_email_deliverability", lookup)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    addresses = ["ops@example.com", "cfo@mail.example.org"]
    assert UsageThreshold.model_validate({**THRESHOLD, "notifyEmails": addresses}).notify_emails == addresses


def test_the_cli_refuses_a_bad_address_before_it_writes_anything() -> None:
    result = CliRunner().invoke(
        threshold_command,
        [
            "create",
            "--metric",
            "tokens",
            "--subject",
            "org:*",
            "--threshold",
            "100",
            "--notify",
            "ops@example.com",
            "--notify",
            INJECTION,
        ],
        obj=Settings(),
    )
    assert result.exit_code == 2, result.output
    assert "notifyEmails.1: value is not a valid email address" in result.output
    assert "Bcc" not in result.output  # the refused value is not echoed


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> CapturingLogger:
    """What definitions and the notifier log (a stand-in logger: structlog's capture depends on its configuration)."""
    logger = CapturingLogger()
    monkeypatch.setattr(definitions, "log", logger)
    monkeypatch.setattr(notifier_module, "log", logger)
    return logger


def test_a_threshold_on_the_topic_applies_without_its_bad_addresses_each_reported(logged: CapturingLogger) -> None:
    """Written before addresses were checked (or by another producer): the limit and its BLOCK still apply; the bad
    addresses are dropped, so no alert carries them, and each is logged with its reason."""
    value = json.dumps({**THRESHOLD, "notifyEmails": ["ops@example.com", INJECTION, 5, "cfo@example.com"]}).encode()
    threshold_id, threshold = parse_entry(UsageThreshold, b"t1", value)
    assert (threshold_id, threshold.action, threshold.notify_emails) == (
        "t1",
        ThresholdAction.BLOCK,
        ["ops@example.com", "cfo@example.com"],
    )
    reports = [call.kwargs for call in logged.calls if call.method_name == "warning"]
    assert [(r["id"], r["address"]) for r in reports] == [("t1", repr(INJECTION)), ("t1", "5")]
    assert "Carriage return and line feed" in reports[0]["reason"]


def test_a_threshold_on_the_topic_invalid_otherwise_is_still_refused_whole(logged: CapturingLogger) -> None:
    too_many = [f"ops{n}@example.com" for n in range(MAX_NOTIFY_EMAILS + 1)]
    assert parse_entry(UsageThreshold, b"t1", json.dumps({**THRESHOLD, "notifyEmails": too_many}).encode()) is None
    assert parse_entry(UsageThreshold, b"t1", json.dumps({**THRESHOLD, "threshold": "1_000"}).encode()) is None
    assert [call.args[0] for call in logged.calls] == ["invalid definition ignored"] * 2


class _Deliveries:
    """The delivery log, in memory."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, str]] = []

    async def sent(self, alert_id: str, addresses: list[str]) -> set[str]:
        return set()

    async def record(self, alert_id: str, address: str, status: str, attempts: int, error: str = "") -> None:
        self.recorded.append((alert_id, address, status))


class _Outbox:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def send(self, message: EmailMessage) -> None:
        self.messages.append(message)


ALERT = {
    "id": "a1",
    "type": "threshold.exceeded",
    "thresholdId": "t1",
    "metricKey": "tokens",
    "subjectType": "org",
    "subjectId": "acme",
    "threshold": "100",
    "value": "120",
    "periodType": "MONTHLY",
    "periodStart": "2026-11-01T00:00:00Z",
    "periodEnd": "2026-12-01T00:00:00Z",
    "action": "ALERT",
    "occurredAt": "2026-11-24T12:30:00Z",
    "dimensions": {},
}


async def test_the_notifier_never_mails_an_address_that_is_not_one(logged: CapturingLogger) -> None:
    """The last step before SMTP: an alert written before addresses were checked may still carry a bad one."""
    deliveries, outbox = _Deliveries(), _Outbox()
    notifier = Notifier(Settings(notify_max_attempts=1), deliveries, outbox)  # type: ignore[arg-type]
    emails = ["ops@example.com", INJECTION, "ops", "ops@example.com", {"to": "x@y.z"}]
    await notifier.handle(json.dumps({**ALERT, "notifyEmails": emails}).encode())
    assert [(m["To"], m["X-Metering-Alert-Id"]) for m in outbox.messages] == [("ops@example.com", "a1")]
    assert deliveries.recorded == [("a1", "ops@example.com", "sent")]
    skipped = [call.kwargs for call in logged.calls if call.method_name == "error"]
    assert [s["address"] for s in skipped] == [repr(INJECTION), "'ops'", "{'to': 'x@y.z'}"]
    assert all(s["alert_id"] == "a1" and s["reason"] for s in skipped)


async def test_the_notifier_skips_an_alert_whose_addresses_are_not_a_list(logged: CapturingLogger) -> None:
    """A string would otherwise be read as one address per character."""
    outbox = _Outbox()
    await Notifier(Settings(), _Deliveries(), outbox).handle(  # type: ignore[arg-type]
        json.dumps({**ALERT, "notifyEmails": "ops@example.com"}).encode()
    )
    assert outbox.messages == [] and [call.args[0] for call in logged.calls] == ["unreadable alert skipped"]
