"""A minimal Faust app for the smoke test: repartition by subject (group_by), sum in a Table.

Run as a real worker process: `python faust_smoke_app.py worker`; configured by SMOKE_* env vars.
"""

from __future__ import annotations

import os

import faust


class Usage(faust.Record, serializer="json"):
    subject: str
    quantity: int


app = faust.App(
    os.environ["SMOKE_APP_ID"],
    broker=f"kafka://{os.environ['SMOKE_BOOTSTRAP']}",
    store="memory://",
    datadir=os.environ["SMOKE_DATADIR"],
    topic_partitions=2,
    web_enabled=False,
)
source = app.topic(os.environ["SMOKE_SOURCE"], value_type=Usage)
totals_topic = app.topic(os.environ["SMOKE_SINK"], key_type=str, value_serializer="json")
totals = app.Table("totals", default=int, partitions=2)


@app.agent(source)
async def sum_per_subject(stream):
    async for usage in stream.group_by(Usage.subject, name="by-subject"):
        totals[usage.subject] += usage.quantity
        await totals_topic.send(key=usage.subject, value={"subject": usage.subject, "total": totals[usage.subject]})


if __name__ == "__main__":
    app.main()
