"""The time zone each subject's periods are cut in, and when a change of zone takes effect.

A subject's zone comes from the compacted `metering.subjects` topic (else METERING_DEFAULT_TIME_ZONE). A change takes
effect at the end of the local day, in the old zone, in which it was made (of the next day when less than NOTICE of it
is left): periods already open (that day, its hours, and records before that instant) stay in the old zone, and no
local hour or day is ever cut in two zones. A month in
which the zone changed has a row in each zone, each holding the records of its part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import NamedTuple

from metering_pipeline.usage.periods import EPOCH, local_period_end, local_period_start, time_zone
from metering_pipeline.usage.routed_record import AcceptedRecord
from metering_schemas import PeriodType, SubjectSettings
from metering_schemas.subject import subject_key

UTC_ZONE = ""  # what a routed record carries for UTC
# A change made in the last hour of a local day waits for the end of the next one: every worker has read it by then,
# so that no record of the new zone's first day is routed before its worker knows of the change.
NOTICE = timedelta(hours=1)


def zone_in_force(settings: SubjectSettings | None, at: datetime, default: str) -> str:
    """The zone a subject's record timestamped `at` is cut in."""
    if settings is None:
        return default
    if settings.effective_from is not None and settings.previous_time_zone and at < settings.effective_from:
        return settings.previous_time_zone
    return settings.time_zone


def zone_change(
    current: SubjectSettings | None, subject_type: str, subject_id: str, new_zone: str, default: str, now: datetime
) -> SubjectSettings:
    """The settings that move a subject to `new_zone` from the end of today in the zone in force now (at once when it
    is in force already: nothing to move). A change still pending is replaced: the zone in force now stays until the
    same instant."""
    old_zone = zone_in_force(current, now, default)
    if new_zone == old_zone:
        return SubjectSettings(subject_type=subject_type, subject_id=subject_id, time_zone=new_zone)
    old = time_zone(old_zone)
    effective = local_period_end(PeriodType.DAILY, local_period_start(PeriodType.DAILY, now, old), old)
    if effective - now < NOTICE:
        effective = local_period_end(PeriodType.DAILY, effective, old)
    return SubjectSettings(
        subject_type=subject_type,
        subject_id=subject_id,
        time_zone=new_zone,
        previous_time_zone=old_zone,
        effective_from=effective,
    )


class _Rule(NamedTuple):
    """A subject's zone as the router applies it: `before` until `from_ms`, then `zone` (UTC_ZONE for UTC)."""

    zone: str
    before: str
    from_ms: int

    def at(self, timestamp_ms: int) -> str:
        return self.before if timestamp_ms < self.from_ms else self.zone


class SubjectZones:
    """The zones of subjects that have one of their own, for the router: it stamps every record, so a worker whose
    subjects are all in the default zone pays one test per poll, and the others one dictionary lookup by subject id
    per record (the rule is worked out once, when the subject's settings arrive)."""

    def __init__(self, default: str) -> None:
        self.default = _routed(default)
        self._by_id: dict[str, dict[str, _Rule]] = {}
        self._keys: dict[str, tuple[str, str]] = {}  # topic key -> (subject type, subject id)

    def put(self, settings: SubjectSettings) -> None:
        self.delete(settings.key)
        zone = _routed(settings.time_zone)
        before, from_ms = zone, 0
        if settings.effective_from is not None and settings.previous_time_zone:
            before, from_ms = _routed(settings.previous_time_zone), _epoch_ms(settings.effective_from)
        self._keys[settings.key] = (settings.subject_type, settings.subject_id)
        self._by_id.setdefault(settings.subject_id, {})[settings.subject_type] = _Rule(zone, before, from_ms)

    def delete(self, key: str) -> None:
        subject = self._keys.pop(key, None)
        if subject is not None:
            of_id = self._by_id[subject[1]]
            of_id.pop(subject[0], None)
            if not of_id:
                del self._by_id[subject[1]]

    @property
    def any_zoned(self) -> bool:
        """Whether any record can be in another zone than UTC (else the router asks for none)."""
        return bool(self._by_id) or self.default != UTC_ZONE

    def stamp(self, records: Iterable[AcceptedRecord]) -> None:
        """Sets each record's `time_zone` as routed records carry it (left at UTC_ZONE for UTC)."""
        by_id, default = self._by_id, self.default
        for record in records:
            of_id = by_id.get(record.subject_id)
            rule = of_id.get(record.subject_type) if of_id else None
            if rule is not None:
                record.time_zone = rule.at(record.timestamp_ms)
            elif default:
                record.time_zone = default

    def zones_of(self, subject_type: str, subject_id: str) -> tuple[str, ...]:
        """The zones other than UTC the subject's periods are cut in: its zone, and the one before a change."""
        of_id = self._by_id.get(subject_id)
        rule = of_id.get(subject_type) if of_id else None
        if rule is None:
            return (self.default,) if self.default else ()
        return tuple(zone for zone in dict.fromkeys((rule.zone, rule.before)) if zone)

    def zone_at(self, subject_type: str, subject_id: str, timestamp_ms: int) -> str:
        """The zone of the subject's record at `timestamp_ms`, as routed records carry it (UTC_ZONE for UTC)."""
        of_id = self._by_id.get(subject_id)
        rule = of_id.get(subject_type) if of_id else None
        return self.default if rule is None else rule.at(timestamp_ms)


def _routed(zone_name: str) -> str:
    return UTC_ZONE if zone_name == "UTC" else zone_name


def _epoch_ms(at: datetime) -> int:
    return (at - EPOCH) // timedelta(milliseconds=1)


def zone_rollups_from(
    subjects: Mapping[str, SubjectSettings], subject_type: str, subject_id: str, zone_name: str, default: str
) -> datetime | None:
    """From when the rollups cut in `zone_name` hold every record of the subject (None: not known to at all): always
    (EPOCH) in the default zone for a subject without settings; since its change took effect in the zone it moved to.
    Before that instant, and in any other zone, its summaries and invoices are summed from the records."""
    own = subjects.get(subject_key(subject_type, subject_id))
    if own is None:
        return EPOCH if zone_name == default else None
    if own.time_zone != zone_name or own.effective_from is None:
        return None
    return own.effective_from
