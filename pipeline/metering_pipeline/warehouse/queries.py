"""Read-side queries over the rollups (parameterized; shared by the CLI and, later, the HTTP API)."""

from __future__ import annotations

from datetime import datetime, timezone

from clickhouse_connect.driver.client import Client

from metering_schemas import PeriodType, UsageSummary

_SUMMARY_SQL = """
SELECT metric_key, subject_type, subject_id, period_type, period_start, period_end, total_quantity, record_count
FROM usage_summary
WHERE metric_key = {metric_key:String}
  AND subject_type = {subject_type:String}
  AND subject_id = {subject_id:String}
  AND period_type = {period_type:String}
  AND period_start >= {start:DateTime}
  AND period_start < {end:DateTime}
ORDER BY period_start
"""


def usage_summaries(
    client: Client,
    metric_key: str,
    subject_type: str,
    subject_id: str,
    period_type: PeriodType,
    start: datetime,
    end: datetime,
) -> list[UsageSummary]:
    """The seed's getUsageSummary over a range: one summary per period starting in [start, end)."""
    result = client.query(_SUMMARY_SQL, parameters={
        "metric_key": metric_key,
        "subject_type": subject_type,
        "subject_id": subject_id,
        "period_type": period_type.value,
        "start": start.astimezone(timezone.utc).replace(tzinfo=None),
        "end": end.astimezone(timezone.utc).replace(tzinfo=None),
    })
    return [
        UsageSummary(
            id=f"{metric}:{stype}:{sid}:{period}:{pstart.isoformat()}",
            metric_key=metric, subject_type=stype, subject_id=sid, period_type=period,
            period_start=pstart, period_end=pend, total_quantity=total, record_count=count,
        )
        for metric, stype, sid, period, pstart, pend, total, count in result.result_rows
    ]
