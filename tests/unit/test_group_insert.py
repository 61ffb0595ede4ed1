"""The sink's group insert: rows from many partitions' writers go to ClickHouse together, each writer awaits its own."""

from __future__ import annotations

import asyncio

import pytest

from metering_pipeline.warehouse.sink import GroupInsert


class _Table:
    """Stands for one table's insert: logs each insert's rows; the first insert takes a while; can fail once."""

    def __init__(self) -> None:
        self.inserts: list[list[str]] = []
        self.fail_next: Exception | None = None

    async def insert(self, rows: list[str]) -> None:
        await asyncio.sleep(0.05 if not self.inserts else 0)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self.inserts.append(rows)


def test_rows_offered_while_an_insert_is_in_flight_go_out_together_in_the_next_one():
    async def scenario() -> None:
        table = _Table()
        group = GroupInsert[str](table.insert)
        first = asyncio.create_task(group.write(["p0-a"]))
        await asyncio.sleep(0.01)  # the first insert is in flight now
        late = [asyncio.create_task(group.write([f"p{n}-a", f"p{n}-b"])) for n in (1, 2, 3)]
        await asyncio.gather(first, *late)
        assert table.inserts == [["p0-a"], ["p1-a", "p1-b", "p2-a", "p2-b", "p3-a", "p3-b"]]

    asyncio.run(scenario())


def test_writes_of_one_loop_turn_share_one_insert():
    async def scenario() -> None:
        table = _Table()
        group = GroupInsert[str](table.insert)
        await asyncio.gather(*(group.write([f"p{n}"]) for n in range(12)))
        assert table.inserts == [[f"p{n}" for n in range(12)]]

    asyncio.run(scenario())


def test_a_failed_insert_fails_every_write_it_carried_and_the_next_writes_go_through():
    async def scenario() -> None:
        table = _Table()
        group = GroupInsert[str](table.insert)
        table.fail_next = ConnectionError("ClickHouse is down")
        results = await asyncio.gather(group.write(["a"]), group.write(["b"]), return_exceptions=True)
        assert [type(result) for result in results] == [ConnectionError, ConnectionError]
        await group.write(["a"])  # a writer retries its own rows
        assert table.inserts == [["a"]]

    asyncio.run(scenario())


def test_a_cancelled_writer_does_not_stop_the_others_rows():
    async def scenario() -> None:
        table = _Table()
        group = GroupInsert[str](table.insert)
        cancelled = asyncio.create_task(group.write(["gone"]))
        kept = asyncio.create_task(group.write(["kept"]))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await kept
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert table.inserts == [["gone", "kept"]]  # rows already handed over are written (writes are idempotent)

    asyncio.run(scenario())
