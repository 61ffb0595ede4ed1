"""A subject's own settings: the time zone its local periods are cut in."""

from __future__ import annotations

from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, Field

from metering_schemas._base import Identifier, UtcDatetime, WireModel


def known_zone(name: str) -> str:
    """`name` if the tz database knows it, else ValueError naming it."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):  # ValueError: not a zone name at all ("", "../x")
        raise ValueError(f"unknown time zone {name!r}: give an IANA name such as Europe/Berlin or UTC") from None
    return name


TimeZoneName = Annotated[
    str,
    Field(min_length=1, max_length=64, description="An IANA time zone name: `Asia/Kolkata`, `America/New_York`, `UTC`"),
    AfterValidator(known_zone),
]


class SubjectSettings(WireModel):
    """One entry of the compacted `metering.subjects` topic, keyed `subjectType:subjectId`."""

    subject_type: Identifier
    subject_id: Identifier
    time_zone: TimeZoneName
    previous_time_zone: TimeZoneName | None = Field(
        default=None,
        description="The zone before the last change: records before `effectiveFrom` are still cut in it, so that no "
        "open period is cut in two zones",
    )
    effective_from: UtcDatetime | None = Field(
        default=None,
        description="When `timeZone` takes over from `previousTimeZone`: the end of the local day (in the previous "
        "zone) in which the change was made. Absent: since always",
    )

    @property
    def key(self) -> str:
        """The topic key: `subjectType:subjectId`."""
        return subject_key(self.subject_type, self.subject_id)


def subject_key(subject_type: str, subject_id: str) -> str:
    """A subject's key on `metering.subjects` (and on the usage topics): `subjectType:subjectId`."""
    return f"{subject_type}:{subject_id}"
