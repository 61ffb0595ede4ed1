"""The worker's garbage-collector policy: what it sets, and that survivors leave later collections."""

from __future__ import annotations

import gc
import weakref

from metering_pipeline.worker import garbage


def test_tune_sets_the_measured_thresholds():
    """The figures measured in `metering bench --quick` (see the module): a young collection every 50,000 net
    allocations instead of CPython's 700, and a full one only after 100 of the middle generation's (not 10)."""
    before = gc.get_threshold()
    collections: list[int] = []

    def started(phase: str, info: dict) -> None:
        if phase == "start":
            collections.append(info["generation"])

    try:
        garbage.tune()
        assert gc.get_threshold() == (50_000, 20, 100)
        gc.collect()
        gc.callbacks.append(started)
        try:
            allocated = [[] for _ in range(30_000)]  # containers the collector tracks: 42 young collections at 700
        finally:
            gc.callbacks.remove(started)
        assert len(allocated) == 30_000 and collections == [], f"collections of generations {collections}"
    finally:
        gc.set_threshold(*before)


def test_survivors_are_frozen_and_cyclic_garbage_is_collected_first():
    class Node:
        pass

    survivors = [Node() for _ in range(1000)]
    cycle = Node()
    cycle.me = cycle  # garbage that only the cyclic collector frees
    collected = weakref.ref(cycle)
    del cycle
    frozen_before = gc.get_freeze_count()
    try:
        garbage.freeze_survivors()
        assert gc.get_freeze_count() >= frozen_before + len(survivors)
        assert collected() is None, "cyclic garbage must be collected before it would be frozen for good"
    finally:
        gc.unfreeze()
