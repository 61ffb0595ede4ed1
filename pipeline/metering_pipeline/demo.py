"""`metering demo`: the local stack up, the warehouse migrated, sample usage published."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from aiokafka import AIOKafkaProducer

from metering_pipeline.topics import USAGE_RECORDED
from metering_schemas import UsageRecord




def sample_records(count: int, seed: int = 1) -> list[UsageRecord]:
    """Deterministic sample usage: a few orgs calling APIs and spending tokens over the last day."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    metrics = {"api_calls": lambda: Decimal(1), "llm_tokens": lambda: Decimal(rng.randint(10, 4000))}
    records = []
    for n in range(count):
        metric = rng.choice(sorted(metrics))
        records.append(
            UsageRecord(
                id=f"demo-{seed}-{n}",
                metric_key=metric,
                subject_type="org",
                subject_id=f"org-{rng.randint(1, 5)}",
                quantity=metrics[metric](),
                timestamp=now - timedelta(seconds=rng.randint(0, 86_400)),
            )
        )
    return records


async def publish(kafka_options: dict[str, object], records: list[UsageRecord]) -> Counter[tuple[str, str]]:
    """Publish one record per message, keyed by subject; returns how many went out per (metric, subject)."""
    producer = AIOKafkaProducer(**kafka_options, acks="all", linger_ms=5)
    await producer.start()
    try:
        sent = [
            await producer.send(
                USAGE_RECORDED, key=f"{r.subject_type}:{r.subject_id}".encode(), value=r.to_json()
            )
            for r in records
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return Counter((r.metric_key, f"{r.subject_type}:{r.subject_id}") for r in records)
