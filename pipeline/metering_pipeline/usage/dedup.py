"""Which records were seen before, within a time window.

A record's identity is its subject plus its id: a retried record always names the same
subject, so routing by subject keeps every copy of a record on one partition, and the
window can be kept per partition. Identities are kept in buckets of their time so expiry
drops whole buckets instead of scanning every identity. With a state store, RAM keeps only
the identities not stored yet, in buckets of the checkpoint that carries them (dropped once
that checkpoint is stored), and asks the store about the rest, which expires them itself.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

RecordIdentity = tuple[str, str, str]  # (subject_type, subject_id, record id)

_BUCKET_SECONDS = 60


class Admit(Protocol):
    def __call__(self, identity: RecordIdentity, unseen: bool = False) -> bool:
        """True (and remembered) the first time; `unseen`: the caller just found it not `in` the window (with a store,
        that was a read of the store: not made twice)."""
        ...


class DedupWindow:
    def __init__(self, window: timedelta, recall: Callable[[RecordIdentity], bool] | None = None) -> None:
        self.window = window
        self._recall = recall  # whether the store remembers an identity RAM does not hold
        self._seen: dict[RecordIdentity, int] = {}
        self._buckets: dict[int, list[RecordIdentity]] = {}
        # With a store: the checkpoint that will carry the identities admitted now (their bucket), numbered as the
        # state numbers its checkpoints. A bucket of time would keep a partition's last second of identities in RAM
        # until its next records came, however long.
        self._checkpoint = 1

    def _bucket(self, at: datetime) -> int:
        return int(at.timestamp()) // _BUCKET_SECONDS if self._recall is None else self._checkpoint

    def first_sighting(self, identity: RecordIdentity, at: datetime) -> bool:
        """True (and remembered) the first time `identity` is offered within the window."""
        return self.admitter(at)(identity)

    def admitter(self, at: datetime) -> Admit:
        """`first_sighting` for many identities seen at the same time (one routed message): the bucket is found once."""
        bucket = self._bucket(at)
        seen, recall = self._seen, self._recall
        entries = self._buckets.setdefault(bucket, [])

        def admit(identity: RecordIdentity, unseen: bool = False) -> bool:
            if not unseen and (identity in seen or (recall is not None and recall(identity))):
                return False
            seen[identity] = bucket
            entries.append(identity)
            return True

        return admit

    def expire(self, now: datetime) -> int:
        """Forget identities seen more than `window` before `now`; returns how many. With a store, RAM holds only
        identities not stored yet (seconds old): the store's expire."""
        return 0 if self._recall is not None else self._forget(self._bucket(now - self.window))

    def seal(self) -> None:
        """A checkpoint was taken: identities admitted from now on go out with the next one."""
        self._checkpoint += 1

    def stored_through(self, checkpoint: int) -> int:
        """With a store: the identities of checkpoints up to `checkpoint` are in it now, and leave RAM."""
        return self._forget(checkpoint + 1)

    def _forget(self, horizon: int) -> int:
        """Forget identities of buckets before `horizon`."""
        expired = 0
        for bucket in [b for b in self._buckets if b < horizon]:
            for identity in self._buckets.pop(bucket):
                if self._seen.get(identity) == bucket:
                    del self._seen[identity]
                    expired += 1
        return expired

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, identity: RecordIdentity) -> bool:
        return identity in self._seen or (self._recall is not None and self._recall(identity))
