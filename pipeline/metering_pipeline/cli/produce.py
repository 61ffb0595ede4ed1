"""`metering produce`: publish usage records from flags or JSON lines (the seed's usage.record / usage.recordBatch)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import IO

import click
import orjson
from pydantic import ValidationError

from metering_pipeline import tables
from metering_pipeline.cli.params import field_errors, subject as parse_subject, utc
from metering_pipeline.producer import MAX_BATCH_RECORDS, UsageProducer, record_line
from metering_pipeline.settings import Settings
from metering_schemas import UsageRecord


def _quantity(value: str) -> Decimal:
    try:
        quantity = Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"{value!r} is not a decimal number") from None
    if not quantity.is_finite():
        raise click.BadParameter("must be finite")
    return quantity


class RunningCount:
    """Progress when the total is unknown (a stream): the count so far, on stderr, once a second."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.total = 0
        self.shown_at = time.monotonic()

    def update(self, count: int) -> None:
        self.total += count
        if time.monotonic() - self.shown_at >= 1:
            self.shown_at = time.monotonic()
            click.echo(f"{self.label} {self.total:,}", err=True)


class LineErrors:
    """Reports each unusable input line on stderr as JSON, so a script can pick them out."""

    def __init__(self) -> None:
        self.count = 0

    def report(self, line_number: int, message: str) -> None:
        self.count += 1
        click.echo(orjson.dumps({"line": line_number, "error": message}).decode(), err=True)


def _records_from_lines(stream: IO[bytes], errors: LineErrors) -> Iterator[UsageRecord]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            yield record_line(line)
        except ValidationError as error:
            errors.report(number, field_errors(error))
        except ValueError as error:  # jiter: not JSON
            errors.report(number, f"invalid JSON: {error}")


@click.command()
@click.option("--metric", "metric_key", help="Metric key of the record(s) given by flags.")
@click.option("--subject", help="TYPE:ID of the record(s) given by flags.")
@click.option("--quantity", default="1", show_default=True, help="Decimal quantity.")
@click.option(
    "--timestamp",
    type=click.DateTime(),
    default=None,
    help="When the usage happened (UTC). [default: now, by the broker]",
)
@click.option("--id", "record_id", default=None, help="Dedup key. [default: a random UUID per record]")
@click.option("--metadata", default="{}", help="JSON object of additional context.")
@click.option(
    "--count", type=click.IntRange(min=1), default=1, show_default=True, help="Records to publish with these flags."
)
@click.option(
    "--file",
    "source",
    type=click.File("rb"),
    default=None,
    help="JSON lines of UsageRecords ('-' for stdin) instead of flags.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_BATCH_RECORDS),
    default=1,
    show_default=True,
    help='Records per Kafka message; above 1 they travel as {"records": [...]} batches.',
)
@click.pass_obj
def produce(
    settings: Settings,
    metric_key: str | None,
    subject: str | None,
    quantity: str,
    timestamp: datetime | None,
    record_id: str | None,
    metadata: str,
    count: int,
    source: IO[bytes] | None,
    batch_size: int,
) -> None:
    """Publish usage records onto usage.recorded, acknowledged by the broker before this returns.

    Unusable input lines are reported on stderr as {"line": N, "error": "..."} and the others
    are still published; the exit status is 1 if any line was refused.
    """
    errors = LineErrors()
    if source is not None:
        if metric_key or subject:
            raise click.UsageError("give records either with --file or with --metric/--subject, not both")
        records: Iterator[UsageRecord] | list[UsageRecord] = _records_from_lines(source, errors)
    else:
        if not metric_key or not subject:
            raise click.UsageError("--metric and --subject are required without --file")
        if record_id is not None and count > 1:
            raise click.UsageError("--id names one record; with --count the records get ids of their own")
        subject_type, subject_id = parse_subject(subject)
        try:
            template = UsageRecord(
                id=record_id,
                metric_key=metric_key,
                subject_type=subject_type,
                subject_id=subject_id,
                quantity=_quantity(quantity),
                timestamp=utc(timestamp),
                metadata=orjson.loads(metadata),
            )
        except (ValidationError, orjson.JSONDecodeError) as error:
            raise click.UsageError(
                field_errors(error) if isinstance(error, ValidationError) else f"--metadata: {error}"
            ) from error
        records = [template] * count

    async def run(progress: Callable[[int], None]) -> int:
        async with UsageProducer(settings) as producer:
            return await producer.publish(records, batch_size=batch_size, progress=progress)

    started = time.perf_counter()
    if source is None:
        with click.progressbar(length=count, label="publishing", file=sys.stderr, show_pos=True) as bar:
            sent = asyncio.run(run(bar.update))
    else:
        sent = asyncio.run(run(RunningCount("published").update))
    elapsed = time.perf_counter() - started
    click.echo(
        tables.render(
            ["published", "refused", "seconds", "records/s"],
            [(sent, errors.count, f"{elapsed:.2f}", f"{sent / elapsed:,.0f}" if elapsed else "")],
        )
    )
    if errors.count:
        sys.exit(1)
