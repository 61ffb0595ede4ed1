"""Publishing usage records onto `usage.recorded`, as producers are advised to.

Single records are keyed `"{subjectType}:{subjectId}"` (keeps a subject's records in order on
one partition); batches travel as the seed's `{"records": [...]}` messages of at most
`batch_size` records. Every call returns only once the broker has acknowledged the messages
(acks=all), and the producer is idempotent where the broker supports it, so an internal retry
never writes a record twice.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence

import jiter
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

from metering_pipeline.logs import get_logger
from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics, kafka_answers
from metering_schemas import UsageRecord

MAX_BATCH_RECORDS = 500
IN_FLIGHT = 2_000  # messages awaited together: bounds memory while keeping the pipe full
# A batch message is cut at about this many bytes, half Kafka's default 1 MiB message size: a record within intake's
# limits (256 KiB of metadata) always fits one.
MAX_MESSAGE_BYTES = 512 * 1024
SHUTDOWN_FLUSH_SECONDS = 5.0

log = get_logger(__name__)


def subject_key(record: UsageRecord) -> bytes:
    return f"{record.subject_type}:{record.subject_id}".encode()


def with_id(record: UsageRecord) -> UsageRecord:
    """Gives an id-less record a random one, so re-sending the same object is deduplicated."""
    return record if record.id is not None else record.model_copy(update={"id": str(uuid.uuid4())})


def _batch_of(records: Sequence[UsageRecord], encoded: Sequence[bytes]) -> tuple[bytes | None, bytes]:
    """(key, value) of one batch message; keyed by subject only when all records share it."""
    keys = {subject_key(r) for r in records}
    return (keys.pop() if len(keys) == 1 else None), b'{"records":[' + b",".join(encoded) + b"]}"


def messages_of(records: Iterable[UsageRecord], batch_size: int | None) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) of the messages carrying `records`: one record per message when `batch_size` is None, else batch
    messages of at most `batch_size` records cut at about MAX_MESSAGE_BYTES, so that records each within intake's
    limits always travel in messages the broker takes, however many a batch holds."""
    chunk: list[UsageRecord] = []
    encoded: list[bytes] = []
    size = 0
    for record in records:
        value = record.to_json()
        if batch_size is None:
            yield subject_key(record), value
            continue
        if chunk and (len(chunk) >= batch_size or size + len(value) > MAX_MESSAGE_BYTES):
            yield _batch_of(chunk, encoded)
            chunk, encoded, size = [], [], 0
        chunk.append(record)
        encoded.append(value)
        size += len(value) + 1
    if chunk:
        yield _batch_of(chunk, encoded)


class NotAcknowledged(KafkaTimeoutError):  # type: ignore[misc]  # aiokafka is untyped
    """Kafka did not acknowledge the records in time (a retriable 503): they may still be written, and a retry
    with the same record ids counts them once."""

    def __init__(self, timeout: float) -> None:
        self.message = (
            f"Kafka did not acknowledge the records within {timeout:g} s (METERING_PUBLISH_TIMEOUT); they may still "
            "be written: retry with the same record ids, which are counted once"
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KafkaError's would put the class name first
        return self.message


class UsageProducer:
    def __init__(self, settings: Settings, *, assign_ids: bool = True) -> None:
        self.settings = settings
        self.topic = Topics.of(settings).usage_recorded
        self.assign_ids = assign_ids
        self._producer: AIOKafkaProducer | None = None

    async def __aenter__(self) -> UsageProducer:
        self._producer = AIOKafkaProducer(
            **self.settings.kafka_client_options(),
            acks="all",
            # Brokers without producer ids (tansu) run the pipeline at_least_once; see Settings.
            enable_idempotence=self.settings.processing_guarantee == "exactly_once",
            linger_ms=5,
            compression_type="lz4",
        )
        try:
            await self._producer.start()
        except BaseException:  # e.g. refused credentials: close it, or asyncio reports an unclosed producer
            await self._producer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop, flushing what is still pending for a few seconds at most: every caller has had its answer by now
        (acknowledged, or NotAcknowledged after `publish_timeout`), and with too few replicas in sync the flush would
        never end, while the process must exit when told to."""
        assert self._producer is not None
        try:
            await asyncio.wait_for(self._producer.stop(), SHUTDOWN_FLUSH_SECONDS)
        except TimeoutError:
            log.warning(
                "Kafka did not acknowledge every pending record before shutdown; their callers were told 503 and "
                "retry them with the same ids",
                topic=self.topic,
                waited_seconds=SHUTDOWN_FLUSH_SECONDS,
            )

    async def kafka_answers(self) -> bool:
        """Whether a broker answers now (readiness), through this producer's connections."""
        assert self._producer is not None
        return await kafka_answers(self._producer.client, self.topic)

    def _prepare(self, record: UsageRecord) -> UsageRecord:
        return with_id(record) if self.assign_ids else record

    async def record(self, record: UsageRecord) -> UsageRecord:
        """`usage.record`: returns the record as published (with its id)."""
        record = self._prepare(record)
        await self._send_all([(subject_key(record), record.to_json())])
        return record

    async def record_batch(
        self, records: Sequence[UsageRecord], batch_size: int = MAX_BATCH_RECORDS
    ) -> list[UsageRecord]:
        """`usage.recordBatch`: batch messages of up to `batch_size` records, all acknowledged on return. Records
        over several messages are not published atomically: a failed call may have published some, which a retry
        with the same record ids counts once."""
        prepared = [self._prepare(r) for r in records]
        await self._send_all(messages_of(prepared, batch_size))
        return prepared

    async def publish(
        self,
        records: Iterable[UsageRecord] | AsyncIterable[UsageRecord],
        batch_size: int = 1,
        progress: Callable[[int], None] = lambda sent: None,
    ) -> int:
        """Streams any number of records (one per message, or batches of `batch_size`); returns how many were
        acknowledged."""
        if batch_size < 1 or batch_size > MAX_BATCH_RECORDS:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_RECORDS}")
        window = (IN_FLIGHT // batch_size + 1) * batch_size  # records awaited together
        per_message = None if batch_size == 1 else batch_size
        sent = 0
        pending: list[UsageRecord] = []

        async def send_pending() -> None:
            nonlocal sent, pending
            await self._send_all(messages_of(pending, per_message))
            sent += len(pending)
            progress(len(pending))
            pending = []

        async for record in _aiter(records):
            pending.append(self._prepare(record))
            if len(pending) >= window:
                await send_pending()
        if pending:
            await send_pending()
        return sent

    async def _send_all(self, messages: Iterable[tuple[bytes | None, bytes]]) -> None:
        """Every message acknowledged, or NotAcknowledged after `publish_timeout`: an idempotent producer retries a
        partition whose replicas are out of sync for ever, and a caller must hear back before that."""
        assert self._producer is not None
        timeout = self.settings.publish_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        acks: list[asyncio.Future[object]] = []
        try:
            async with asyncio.timeout_at(deadline):
                acks = [await self._producer.send(self.topic, value, key=key) for key, value in messages]
        except TimeoutError:
            raise NotAcknowledged(timeout) from None
        if not acks:
            return
        # asyncio.wait, not a timeout around gather: the producer's own futures must not be cancelled under it.
        done, pending = await asyncio.wait(acks, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        if pending:
            for ack in pending:  # whatever it ends in later is not news to anyone
                ack.add_done_callback(_retrieved)
            raise NotAcknowledged(timeout)
        for ack in done:
            ack.result()


def _retrieved(ack: asyncio.Future[object]) -> None:
    if not ack.cancelled():
        ack.exception()


async def _aiter(records: Iterable[UsageRecord] | AsyncIterable[UsageRecord]) -> AsyncIterable[UsageRecord]:
    if isinstance(records, AsyncIterable):
        async for record in records:
            yield record
    else:
        for record in records:
            yield record


def record_line(line: bytes) -> UsageRecord:
    """One JSON-lines input of `metering produce`; JSON numbers keep every digit (decimal mode)."""
    return UsageRecord.model_validate(jiter.from_json(line, float_mode="decimal"))
