"""Pure parts of the local stack launcher."""

from __future__ import annotations

from metering_pipeline.stack.apache_kafka import new_cluster_id


def test_kraft_cluster_ids_never_look_like_an_option():
    ids = [new_cluster_id() for _ in range(2000)]  # a plain random id starts with '-' 1 time in 64
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == len(ids)
