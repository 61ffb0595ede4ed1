"""UsageThreshold: a limit on one metric for one subject (or every subject of a type)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, cast

from pydantic import (
    EmailStr,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from metering_schemas._base import CaseInsensitiveEnum, Identifier, Quantity, WireModel
from metering_schemas.metric import DimensionValues

MAX_NOTIFY_EMAILS = 50
MAX_EMAIL_LENGTH = 254  # characters: the longest address an SMTP path carries (RFC 5321, 4.5.3.1.3)
# An address ends up in an e-mail's To header: it must be one mailbox as email-validator reads it (pydantic calls it
# without any DNS lookup), so no CR/LF, no second address, no header smuggled in. "Name <a@b.com>" is kept as a@b.com.
EmailAddress = Annotated[EmailStr, Field(max_length=MAX_EMAIL_LENGTH)]
NotifyEmails = Annotated[list[EmailAddress], Field(max_length=MAX_NOTIFY_EMAILS)]
_EMAIL_ADDRESS: TypeAdapter[str] = TypeAdapter(EmailAddress)

DROPPED_ADDRESSES = "droppedAddresses"
"""Validation context key for readers of `metering.thresholds`: with a list under it, a threshold whose notifyEmails
holds bad addresses is read without them, each appended to the list with its reason, instead of being refused."""


def checked_addresses(values: Iterable[Any]) -> tuple[list[str], list[tuple[Any, str]]]:
    """The valid addresses (normalized, in order) and (value, reason) for each other value: what may be mailed, and
    what must be reported instead."""
    valid: list[str] = []
    bad: list[tuple[Any, str]] = []
    for value in values:
        try:
            valid.append(_EMAIL_ADDRESS.validate_python(value))
        except ValidationError as error:
            bad.append((value, error.errors(include_url=False)[0]["msg"]))
    return valid, bad


class ThresholdAction(CaseInsensitiveEnum):
    ALERT = "ALERT"
    BLOCK = "BLOCK"
    NONE = "NONE"


class UsageThreshold(WireModel):
    """Value of the compacted `metering.thresholds` topic, keyed by `id`."""

    id: Identifier
    metric_key: Identifier
    subject_type: Identifier
    subject_id: Identifier = Field(description='Subject id, or "*" for every subject of the type')
    threshold: Quantity
    action: ThresholdAction = ThresholdAction.ALERT
    notify_emails: NotifyEmails = Field(default_factory=list)
    org_id: Identifier | None = Field(
        default=None, description="Organization that owns it (set by org-scoped API keys)"
    )
    dimensions: DimensionValues = Field(
        default_factory=dict,
        description="Every groupBy dimension of the metric with a value: the threshold watches that "
        "dimension row instead of the total (empty: the total)",
    )

    @field_validator("notify_emails", mode="wrap")
    @classmethod
    def _without_bad_addresses_when_read(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> list[str]:
        """A threshold already on the topic keeps its limit and action (a BLOCK still blocks) when an address of it is
        bad, e.g. one written before addresses were checked: its readers drop the address and report it (context
        DROPPED_ADDRESSES). Without that context (the API, the CLI) a bad address refuses the threshold."""
        dropped = info.context.get(DROPPED_ADDRESSES) if isinstance(info.context, dict) else None
        if dropped is None or not isinstance(value, list):
            return cast(list[str], handler(value))
        valid, bad = checked_addresses(value)
        dropped.extend(bad)
        return cast(list[str], handler(valid))
