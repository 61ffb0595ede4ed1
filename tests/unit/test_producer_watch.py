"""A transaction never waits forever on a producer whose background sender died."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from metering_pipeline.worker.rollup_partition import ProducerDied, _unless_producer_died


def producer_with(sender_task: asyncio.Task) -> SimpleNamespace:
    """The one attribute `_unless_producer_died` reads of an AIOKafkaProducer."""
    return SimpleNamespace(_sender=SimpleNamespace(sender_task=sender_task))


async def test_work_that_finishes_returns_and_its_error_is_raised():
    sender = asyncio.create_task(asyncio.sleep(60))
    try:
        await _unless_producer_died(producer_with(sender), asyncio.sleep(0))
        with pytest.raises(ValueError, match="bad batch"):
            await _unless_producer_died(producer_with(sender), _raise(ValueError("bad batch")))
    finally:
        sender.cancel()


async def test_a_dead_sender_ends_the_wait_with_producer_died_and_cancels_the_work():
    async def dying() -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("KeyError in reenqueue")

    sender = asyncio.create_task(dying())
    forever = asyncio.Event()
    work = asyncio.ensure_future(forever.wait())
    async with asyncio.timeout(5):
        with pytest.raises(ProducerDied, match="KeyError in reenqueue"):
            await _unless_producer_died(producer_with(sender), work)
    await asyncio.sleep(0)
    assert work.cancelled()


async def _raise(error: Exception) -> None:
    raise error
