"""Usage thresholds: which limits apply to a subject, and which alerts a new value fires.

A threshold watches one metric of one subject (or every subject of a type, `subjectId` "*")
over the metric's `resetPeriod` window. In each window it fires `threshold.approaching` once
(value >= fraction x threshold) and `threshold.exceeded` once (value > threshold), approaching
first. What has fired is kept per (threshold, subject, window) as a marker, so a replayed or
late record never fires twice, and the markers travel with the partition's checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Final, Literal

from metering_pipeline.usage.meter import TOTAL, Dimensions
from metering_pipeline.usage.metrics import MetricCatalog
from metering_pipeline.usage.periods import (
    EPOCH,
    latest_period_end,
    local_period_start_text,
    period_end,
    period_in,
    period_start,
    zone_of,
)
from metering_pipeline.usage.rollups import LIFETIME, PartitionRollups, Period, Rollup, RollupKey
from metering_pipeline.usage.subject_zones import SubjectZones
from metering_schemas import PeriodType, ResetPeriod, ThresholdAction, ThresholdAlert, UsageThreshold

AlertType = Literal["threshold.approaching", "threshold.exceeded"]  # ThresholdAlert.type
APPROACHING: Final = "threshold.approaching"
EXCEEDED: Final = "threshold.exceeded"
WILDCARD = "*"

Subject = tuple[str, str]  # subject_type, subject_id
MarkerKey = tuple[str, str, str, datetime]  # threshold id, subject_type, subject_id, window start
_MILLISECOND = timedelta(milliseconds=1)


class ThresholdBook:
    """The thresholds in force, indexed by (metric key, subject type, subject id or `*`, dimensions) for the lookup
    per changed rollup: platforms give each customer a limit of their own, so a lookup must not scan the other
    customers' thresholds."""

    def __init__(self) -> None:
        self._by_id: dict[str, UsageThreshold] = {}
        self._index: dict[tuple[str, str, str, Dimensions], dict[str, UsageThreshold]] = {}
        self.changes: list[str] = []  # ids in the order they changed; partitions catch up through it

    def put(self, threshold: UsageThreshold) -> None:
        self._unindex(threshold.id)
        self._by_id[threshold.id] = threshold
        self._index.setdefault(_slot(threshold), {})[threshold.id] = threshold
        self.changes.append(threshold.id)

    def delete(self, threshold_id: str) -> None:
        self._unindex(threshold_id)
        self._by_id.pop(threshold_id, None)
        self.changes.append(threshold_id)

    def _unindex(self, threshold_id: str) -> None:
        previous = self._by_id.get(threshold_id)
        if previous is not None:
            where = _slot(previous)
            slot = self._index.get(where)
            if slot is not None:
                slot.pop(threshold_id, None)
                if not slot:
                    del self._index[where]

    def get(self, threshold_id: str) -> UsageThreshold | None:
        return self._by_id.get(threshold_id)

    def matching(
        self, metric_key: str, subject_type: str, subject_id: str, dimensions: Dimensions = TOTAL
    ) -> list[UsageThreshold]:
        """The subject's own thresholds on that row (the total, or one dimension row), then those of every subject of
        its type."""
        own = self._index.get((metric_key, subject_type, subject_id, dimensions))
        every = self._index.get((metric_key, subject_type, WILDCARD, dimensions)) if subject_id != WILDCARD else None
        if every is None:
            return list(own.values()) if own else []
        return [*own.values(), *every.values()] if own else list(every.values())

    def __len__(self) -> int:
        return len(self._by_id)


def _slot(threshold: UsageThreshold) -> tuple[str, str, str, Dimensions]:
    return threshold.metric_key, threshold.subject_type, threshold.subject_id, dimensions_of(threshold)


def dimensions_of(threshold: UsageThreshold) -> Dimensions:
    """The row a threshold watches, as rollup keys name it."""
    return tuple(sorted(threshold.dimensions.items()))


@dataclass(frozen=True, slots=True)
class Alert:
    """One `threshold.approaching` / `threshold.exceeded` event on `metering.alerts`."""

    type: AlertType
    threshold: UsageThreshold
    subject_type: str
    subject_id: str
    value: Decimal
    period: ResetPeriod
    window_start: datetime
    occurred_at: datetime
    # Epoch seconds the crossing usage was published at (for the alert-latency metric; not part of the event);
    # None when a threshold change fired it.
    usage_published_at: float | None = None
    time_zone: str = "UTC"  # the zone the window was cut in (the subject's)

    @property
    def id(self) -> str:
        """Deterministic: the same crossing of the same limit in the same window has the same id."""
        return (
            f"{self.threshold.id}/{self.subject_type}:{self.subject_id}/{self.period.value}/"
            f"{_iso(self.window_start)}/{self.type}@{self.threshold.threshold}"
        )

    @property
    def window_end(self) -> datetime:
        return period_end(period_in(self.period, self.time_zone), self.window_start)

    def to_event(self) -> ThresholdAlert:
        """The event as published (validated: alerts are rare, and what goes out must match the contract)."""
        return ThresholdAlert(
            id=self.id,
            type=self.type,
            threshold_id=self.threshold.id,
            metric_key=self.threshold.metric_key,
            subject_type=self.subject_type,
            subject_id=self.subject_id,
            threshold=self.threshold.threshold,
            value=self.value,
            period_type=self.period,
            period_start=self.window_start,
            period_end=self.window_end,
            action=self.threshold.action,
            notify_emails=list(self.threshold.notify_emails),
            occurred_at=self.occurred_at,
            dimensions=dict(self.threshold.dimensions),
            time_zone=self.time_zone,
            local_period_start=local_period_start_text(self.window_start, self.time_zone),
        )


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class Marker:
    """What fired for one threshold, subject and window, and at which limit."""

    limit: Decimal
    approaching: bool = False
    exceeded: bool = False


def crossings(value: Decimal, limit: Decimal, fraction: Decimal, marker: Marker | None) -> list[AlertType]:
    """The alert types `value` fires that `marker` has not fired yet, approaching first."""
    fired: list[AlertType] = []
    if value >= limit * fraction and not (marker and marker.approaching):
        fired.append(APPROACHING)
    if value > limit and not (marker and marker.exceeded):
        fired.append(EXCEEDED)
    return fired


def limit_state(value: Decimal, limit: Decimal, fraction: Decimal) -> str:
    """ok | approaching | exceeded: where a value stands against one threshold."""
    return "exceeded" if value > limit else ("approaching" if value >= limit * fraction else "ok")


class ThresholdWatch:
    """One partition's markers: decides alerts, re-arms raised limits, forgets old windows."""

    def __init__(self, fraction: Decimal) -> None:
        self.fraction = fraction
        self.markers: dict[MarkerKey, Marker] = {}
        self._changed: set[MarkerKey] = set()

    def evaluate(
        self,
        threshold: UsageThreshold,
        subject: Subject,
        period: ResetPeriod,
        window_start: datetime,
        value: Decimal,
        now: datetime,
        zone: str = "UTC",
    ) -> list[Alert]:
        if threshold.action is ThresholdAction.NONE:
            return []
        key = (threshold.id, *subject, window_start)
        marker = self.markers.get(key)
        fired = crossings(value, threshold.threshold, self.fraction, marker)
        if not fired:
            return []
        if marker is None:
            marker = self.markers[key] = Marker(threshold.threshold)
        marker.approaching = marker.approaching or APPROACHING in fired
        marker.exceeded = marker.exceeded or EXCEEDED in fired
        marker.limit = threshold.threshold
        self._changed.add(key)
        return [Alert(kind, threshold, *subject, value, period, window_start, now, time_zone=zone) for kind in fired]

    def rearm(self, threshold: UsageThreshold, value_of: Callable[[Subject, datetime], Decimal | None]) -> None:
        """A limit raised to at least the current value fires again in that window; a lowered one does not."""
        for key, marker in list(self.markers.items()):
            if key[0] != threshold.id or threshold.threshold <= marker.limit:
                continue
            value = value_of((key[1], key[2]), key[3])
            if value is None or value <= threshold.threshold:
                self._drop(key)

    def forget(self, threshold_id: str) -> None:
        """A deleted threshold: its markers go, so a re-created one starts clean."""
        for key in [k for k in self.markers if k[0] == threshold_id]:
            self._drop(key)

    def marker(self, threshold_id: str, subject: Subject, window_start: datetime) -> Marker | None:
        return self.markers.get((threshold_id, *subject, window_start))

    def evict_before(self, horizon: datetime, period_of: Callable[[str], ResetPeriod | None]) -> None:
        """Markers of windows that ended before `horizon` can no longer matter (a marker does not know the zone its
        window was cut in: the latest end in any zone)."""
        for key in list(self.markers):
            period = period_of(key[0])
            if period is None or latest_period_end(period, key[3]) < horizon:
                self._drop(key)

    def _drop(self, key: MarkerKey) -> None:
        del self.markers[key]
        self._changed.add(key)

    def has_changes(self) -> bool:
        return bool(self._changed)

    def checkpoint(self) -> list[tuple[MarkerKey, Marker | None]]:
        """Markers changed since the last checkpoint (None: removed)."""
        changed = [(key, self.markers.get(key)) for key in self._changed]
        self._changed = set()
        return changed

    def restore(self, markers: Iterable[tuple[MarkerKey, Marker]]) -> None:
        self.markers.update(markers)


class PartitionThresholds:
    """Threshold checks over one partition's rollups.

    Records are checked as they are applied (only the rollups they touched); a threshold that
    is created, changed or deleted is checked against every matching subject's current window
    at the partition's next checkpoint, so it applies to usage already recorded.
    """

    def __init__(
        self,
        rollups: PartitionRollups,
        book: ThresholdBook,
        catalog: MetricCatalog,
        fraction: Decimal,
        zones: SubjectZones | None = None,
    ) -> None:
        self.rollups = rollups
        self.book = book
        self.catalog = catalog
        self.zones = zones  # subjects' zones: a zoned subject's windows are its local days and months
        self.watch = ThresholdWatch(fraction)
        self.seen_changes = 0  # position in book.changes this partition has caught up to

    def window_period(self, rollup: Rollup) -> ResetPeriod | None:
        """The metric's resetPeriod, the window its thresholds are evaluated over (None: metric deleted)."""
        definition = self.catalog.get(rollup.metric_id) if rollup.metric_id else None
        return None if definition is None else definition.reset_period

    def zone(self, subject: Subject, at: datetime) -> str:
        """The zone the subject's windows holding `at` are cut in ("": UTC)."""
        return self.zones.zone_at(*subject, (at - EPOCH) // _MILLISECOND) if self.zones else ""

    def _periods(self, subject: Subject) -> tuple[Period, ...]:
        """The periods a window of the subject can be: in its zone and the one before, then UTC."""
        zones = self.zones.zones_of(*subject) if self.zones else ()
        local = [period_in(period, zone) for zone in zones for period in PeriodType]
        return (*local, LIFETIME, *PeriodType)

    def window_rollup(
        self, metric_key: str, subject: Subject, window_start: datetime, dimensions: Dimensions = TOTAL
    ) -> tuple[ResetPeriod, Period, Rollup] | None:
        for period in self._periods(subject):
            rollup = self.rollups.get((metric_key, *subject, period, window_start, dimensions))
            if rollup is not None and (reset := self.window_period(rollup)) is not None and reset.value == period.value:
                return reset, period, rollup
        return None

    def current_window(
        self, metric_key: str, subject: Subject, now: datetime, dimensions: Dimensions = TOTAL
    ) -> tuple[ResetPeriod, datetime, Rollup, str] | None:
        """The subject's current window of the metric (in the zone in force now) and its rollup, and that zone."""
        zone = self.zone(subject, now)
        for period in (LIFETIME, *(period_in(p, zone) for p in PeriodType)):
            start = period_start(period, now)
            rollup = self.rollups.get((metric_key, *subject, period, start, dimensions))
            if rollup is not None and (reset := self.window_period(rollup)) is not None and reset.value == period.value:
                return reset, start, rollup, zone_of(period)
        return None

    def after_records(self, touched: Iterable[RollupKey], now: datetime) -> list[Alert]:
        alerts: list[Alert] = []
        if not self.book:  # no threshold at all: nothing to look up per touched rollup
            return alerts
        for key in touched:
            metric_key, subject_type, subject_id, period, start, dimensions = key
            thresholds = self.book.matching(metric_key, subject_type, subject_id, dimensions)
            if not thresholds:
                continue
            rollup = self.rollups.rollups[key]  # touched: in RAM until its checkpoint is stored
            reset = self.window_period(rollup)
            if reset is None or reset.value != period.value:
                continue
            value = rollup.total()
            zone = zone_of(period)
            for threshold in thresholds:
                alerts += self.watch.evaluate(threshold, (subject_type, subject_id), reset, start, value, now, zone)
        return alerts

    def pending_changes(self) -> bool:
        return self.seen_changes < len(self.book.changes)

    def after_threshold_changes(self, now: datetime) -> list[Alert]:
        changed = dict.fromkeys(self.book.changes[self.seen_changes :])
        self.seen_changes = len(self.book.changes)
        alerts: list[Alert] = []
        in_force: list[UsageThreshold] = []
        for threshold_id in changed:
            threshold = self.book.get(threshold_id)
            if threshold is None:
                self.watch.forget(threshold_id)
                continue
            self.watch.rearm(threshold, partial(self._value, threshold))
            in_force.append(threshold)
        subjects_of = self.rollups.subjects_of({(t.metric_key, t.subject_type) for t in in_force}, now)
        for threshold in in_force:
            subjects = [
                subject
                for subject in subjects_of.get((threshold.metric_key, threshold.subject_type), ())
                if threshold.subject_id in (subject[1], WILDCARD)
            ]
            for subject in subjects:
                window = self.current_window(threshold.metric_key, subject, now, dimensions_of(threshold))
                if window is not None:
                    reset, start, rollup, zone = window
                    alerts += self.watch.evaluate(threshold, subject, reset, start, rollup.total(), now, zone)
        return alerts

    def _value(self, threshold: UsageThreshold, subject: Subject, window_start: datetime) -> Decimal | None:
        found = self.window_rollup(threshold.metric_key, subject, window_start, dimensions_of(threshold))
        return None if found is None else found[2].total()

    def status(self, metric_key: str, subject: Subject, now: datetime) -> SubjectStatus:
        """Current-window usage of one metric against its thresholds: what an entitlement check asks."""
        window = self.current_window(metric_key, subject, now)
        definition = self.catalog.resolve(metric_key, subject[1] if subject[0] == "org" else None)
        reset = window[0] if window else (definition.reset_period if definition else None)
        zone = window[3] if window else self.zone(subject, now) or "UTC"
        start = window[1] if window else (period_start(period_in(reset, zone), now) if reset else None)
        value = window[2].total() if window else Decimal(0)
        limits = []
        for threshold in sorted(self.book.matching(metric_key, *subject), key=lambda t: t.threshold):
            marker = self.watch.marker(threshold.id, subject, start) if start else None
            state = limit_state(value, threshold.threshold, self.watch.fraction)
            blocked = threshold.action is ThresholdAction.BLOCK and marker is not None and marker.exceeded
            limits.append(LimitStatus(threshold, state, blocked))
        return SubjectStatus(metric_key, subject, reset, start, value, limits, zone)


@dataclass(frozen=True)
class LimitStatus:
    threshold: UsageThreshold
    state: str  # ok | approaching | exceeded
    blocked: bool


@dataclass(frozen=True)
class SubjectStatus:
    metric_key: str
    subject: Subject
    period: ResetPeriod | None  # None: the metric is not defined
    window_start: datetime | None
    value: Decimal
    limits: list[LimitStatus]
    time_zone: str = "UTC"  # the zone the window was cut in

    @property
    def blocked(self) -> bool:
        return any(limit.blocked for limit in self.limits)

    def to_json(self) -> dict[str, object]:
        state = max((limit.state for limit in self.limits), key=["ok", "approaching", "exceeded"].index, default="ok")
        return {
            "metricKey": self.metric_key,
            "subjectType": self.subject[0],
            "subjectId": self.subject[1],
            "periodType": self.period.value if self.period else None,
            "periodStart": _iso(self.window_start) if self.window_start else None,
            "periodEnd": _iso(period_end(period_in(self.period, self.time_zone), self.window_start))
            if self.period and self.window_start
            else None,
            "timeZone": self.time_zone,
            "value": str(self.value),
            "status": state,
            "blocked": self.blocked,
            "thresholds": [
                {
                    "id": limit.threshold.id,
                    "threshold": str(limit.threshold.threshold),
                    "action": limit.threshold.action.value,
                    "status": limit.state,
                    "blocked": limit.blocked,
                }
                for limit in self.limits
            ],
        }
