"""The worker's garbage-collector policy: what it sets, and that survivors leave later collections."""

from __future__ import annotations

import gc
import weakref

from metering_pipeline.worker import garbage


def test_tune_sets_the_measured_thresholds():
    before = gc.get_threshold()
    try:
        garbage.tune()
        assert gc.get_threshold() == garbage.THRESHOLDS
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
