"""Which records were seen before, within a time window.

A record's identity is its subject plus its id: a retried record always names the same
subject, so routing by subject keeps every copy of a record on one partition, and the
window can be kept per partition. Identities are kept in one-minute buckets so expiry
drops whole buckets instead of scanning every identity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

RecordIdentity = tuple[str, str, str]  # (subject_type, subject_id, record id)

_BUCKET_SECONDS = 60


def _bucket(at: datetime) -> int:
    return int(at.timestamp()) // _BUCKET_SECONDS


class DedupWindow:
    def __init__(self, window: timedelta) -> None:
        self.window = window
        self._seen: dict[RecordIdentity, int] = {}
        self._buckets: dict[int, list[RecordIdentity]] = {}

    def first_sighting(self, identity: RecordIdentity, at: datetime) -> bool:
        """True (and remembered) the first time `identity` is offered within the window."""
        return self.admitter(at)(identity)

    def admitter(self, at: datetime) -> Callable[[RecordIdentity], bool]:
        """`first_sighting` for many identities seen at the same time (one routed message): the bucket is found once."""
        bucket = _bucket(at)
        seen = self._seen
        entries = self._buckets.setdefault(bucket, [])

        def admit(identity: RecordIdentity) -> bool:
            if identity in seen:
                return False
            seen[identity] = bucket
            entries.append(identity)
            return True

        return admit

    def remember(self, entries: Iterable[tuple[RecordIdentity, datetime]]) -> None:
        """Restore identities seen before a restart."""
        seen, buckets = self._seen, self._buckets
        for identity, at in entries:
            if identity not in seen:
                bucket = seen[identity] = _bucket(at)
                buckets.setdefault(bucket, []).append(identity)

    def expire(self, now: datetime) -> int:
        """Forget identities seen more than `window` before `now`; returns how many."""
        horizon = _bucket(now - self.window)
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
        return identity in self._seen
