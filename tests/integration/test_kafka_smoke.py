"""aiokafka produce/consume round trip against the real brokers the local stack runs."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from support import create_topics

pytestmark = pytest.mark.integration


async def test_produce_consume_round_trip_keeps_keys_values_and_order(any_stack, unique_name):
    topic = unique_name
    await create_topics(any_stack.kafka_bootstrap, [topic], partitions=3)

    sent = [(f"org:{i % 5}".encode(), f'{{"n": {i}}}'.encode()) for i in range(200)]
    producer = AIOKafkaProducer(bootstrap_servers=any_stack.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in sent:
            await producer.send(topic, key=key, value=value)
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=any_stack.kafka_bootstrap, group_id=f"{topic}-g", auto_offset_reset="earliest"
    )
    await consumer.start()
    received = []
    try:
        async with asyncio.timeout(60):
            while len(received) < len(sent):
                batch = await consumer.getmany(timeout_ms=500)
                for messages in batch.values():
                    received.extend((m.key, m.value, m.partition) for m in messages)
    finally:
        await consumer.stop()

    assert sorted((k, v) for k, v, _ in received) == sorted(sent)
    # One key always lands on one partition, in the order it was sent.
    for key in {k for k, _ in sent}:
        partitions = {p for k, _, p in received if k == key}
        assert len(partitions) == 1
        assert [v for k, v, _ in received if k == key] == [v for k, v in sent if k == key]
