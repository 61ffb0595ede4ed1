"""Prometheus registries for the worker's and the API's `/metrics`, with the process's own metrics.

Each worker or API instance gets a registry of its own instead of prometheus_client's global
one, so two instances in one process (tests, an embedded API) never register a name twice.
Serve one with `prometheus_client.generate_latest(registry)` and `CONTENT_TYPE_LATEST`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector


def process_registry() -> CollectorRegistry:
    """A registry that already reports the process: RSS, CPU seconds, open files, Python version, GC runs."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
