"""A real Faust worker process with a Table and a repartition (group_by), on both brokers."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from support import create_topics

pytestmark = pytest.mark.integration

APP = Path(__file__).with_name("faust_smoke_app.py")


async def test_faust_table_sums_per_subject_after_group_by(any_stack, unique_name, tmp_path):
    source, sink = f"{unique_name}-in", f"{unique_name}-out"
    subjects = [f"org-{i}" for i in range(7)]
    rng = random.Random(7)
    records = [{"subject": rng.choice(subjects), "quantity": rng.randint(1, 9)} for _ in range(300)]
    expected = {s: sum(r["quantity"] for r in records if r["subject"] == s) for s in subjects}
    expected = {s: total for s, total in expected.items() if total}

    await create_topics(any_stack.kafka_bootstrap, [source, sink], partitions=2)
    env = {
        **os.environ,
        "SMOKE_APP_ID": unique_name,
        "SMOKE_BOOTSTRAP": any_stack.kafka_bootstrap,
        "SMOKE_DATADIR": str(tmp_path / "faust"),
        "SMOKE_SOURCE": source,
        "SMOKE_SINK": sink,
    }
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, str(APP), "worker", "-l", "warn"], env=env, stdout=log, stderr=log)
    try:
        producer = AIOKafkaProducer(bootstrap_servers=any_stack.kafka_bootstrap)
        await producer.start()
        try:
            # Keyed by something other than the subject, so only the repartition brings a subject together.
            for i, record in enumerate(records):
                await producer.send(source, key=str(i).encode(), value=json.dumps(record).encode())
            await producer.flush()
        finally:
            await producer.stop()

        latest: dict[str, int] = {}
        consumer = AIOKafkaConsumer(sink, bootstrap_servers=any_stack.kafka_bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            async with asyncio.timeout(120):
                while latest != expected:
                    assert worker.poll() is None, (tmp_path / "worker.log").read_text()
                    batch = await consumer.getmany(timeout_ms=500)
                    for messages in batch.values():
                        for message in messages:
                            value = json.loads(message.value)
                            latest[value["subject"]] = value["total"]
        finally:
            await consumer.stop()
        assert latest == expected
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
