"""Helpers the integration tests share (real clients against the local stack)."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from metering_pipeline.worker.process import WorkerProcess, free_port

__all__ = ["WorkerProcess", "create_topics", "free_port"]


async def create_topics(bootstrap: str, names: list[str], partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1) for name in names])
    finally:
        await admin.close()
