"""The cyclic garbage collector's policy in a worker process.

Measured with `gc.callbacks` in every worker of `metering bench --quick` (2026-11-30): collections
took 20–25 % of a worker's CPU, mostly a dozen full (generation 2) collections of about 0.1–0.2 s
each, walking every long-lived object: the imported framework and the partitions' rollup and
dedup state. None of them frees anything on the per-record path, which makes no reference
cycles (reference counting frees what it drops). With the thresholds below and survivors frozen
after start-up and after each partition's state is restored, collections took about 5 %.
"""

from __future__ import annotations

import gc

# Young collections every 50,000 net allocations instead of 700, and a full one only after 100 of
# the middle generation's (not 10): a busy worker allocates a few objects per record.
THRESHOLDS = (50_000, 20, 100)


def tune() -> None:
    gc.set_threshold(*THRESHOLDS)


def freeze_survivors() -> None:
    """Collect once, then leave everything alive now out of every later collection.

    Frozen objects are still freed by reference counting when dropped; only a reference cycle among
    them would stay (none is made by the state this freezes). Called when a large long-lived
    population has just been built: after start-up and after a partition's state is restored.
    """
    gc.collect()
    gc.freeze()
