"""Which metric definition governs a usage record: the record's org's own, else the global one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metering_pipeline.usage.meter import MeterReader, reads_payload
from metering_schemas import MetricDefinition


def record_org(subject_type: str, subject_id: str, metadata: Mapping[str, Any]) -> str | None:
    """An org subject is its own org; any other subject names its org in `metadata.orgId`."""
    if subject_type == "org":
        return subject_id
    org = metadata.get("orgId")
    return org if isinstance(org, str) else None


class MetricCatalog:
    """Definitions by id (the `metering.metrics` topic's key), indexed by (key, org) for lookups."""

    def __init__(self, definitions: Mapping[str, MetricDefinition] | None = None) -> None:
        self._by_id: dict[str, MetricDefinition] = {}
        self._by_key: dict[tuple[str, str | None], MetricDefinition] = {}
        # Only metrics that read more than `quantity` have one: the router asks per record, and a miss is cheap.
        self.readers: dict[str, MeterReader] = {}
        for definition in (definitions or {}).values():
            self.put(definition)

    def put(self, definition: MetricDefinition) -> MetricDefinition | None:
        """Add or replace a definition; returns the one it replaced."""
        previous = self._by_id.get(definition.id)
        if previous is not None:
            self._by_key.pop((previous.key, previous.org_id), None)
        self._by_id[definition.id] = definition
        self._by_key[(definition.key, definition.org_id)] = definition
        if reads_payload(definition):
            self.readers[definition.id] = MeterReader(definition)
        else:
            self.readers.pop(definition.id, None)
        return previous

    def delete(self, definition_id: str) -> MetricDefinition | None:
        previous = self._by_id.pop(definition_id, None)
        self.readers.pop(definition_id, None)
        if previous is not None and self._by_key.get((previous.key, previous.org_id)) is previous:
            del self._by_key[(previous.key, previous.org_id)]
        return previous

    def resolve(self, metric_key: str, org: str | None) -> MetricDefinition | None:
        if org is not None:
            scoped = self._by_key.get((metric_key, org))
            if scoped is not None:
                return scoped
        return self._by_key.get((metric_key, None))

    def get(self, definition_id: str) -> MetricDefinition | None:
        return self._by_id.get(definition_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def definitions(self) -> list[MetricDefinition]:
        return list(self._by_id.values())
