"""Synchronous reads and writes of a definitions topic, for the CLI's define/update/delete/list commands."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from metering_pipeline.definitions import Definition, DefinitionWriter, read_all
from metering_pipeline.settings import Settings


def read(settings: Settings, topic: str, model: type[Definition]) -> dict[str, Definition]:
    return asyncio.run(read_all(settings, topic, model))


def write(settings: Settings, topic: str, definition_id: str, definition: BaseModel | bytes | None) -> None:
    """Put (or, for None, delete) one definition (or an entry already encoded); returns once the broker has
    acknowledged it."""

    async def run() -> None:
        async with DefinitionWriter(settings, topic) as writer:
            await (writer.delete(definition_id) if definition is None else writer.put(definition_id, definition))

    asyncio.run(run())
