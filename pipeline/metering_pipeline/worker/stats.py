"""Counters the worker exposes on its metrics endpoint (Prometheus text format)."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field


@dataclass
class WorkerStats:
    records_in: int = 0  # records read from usage.recorded (batch elements counted one by one)
    accepted: int = 0  # passed intake and were routed
    counted: int = 0  # new records folded into rollups
    duplicates: int = 0  # records whose identity was seen within the dedup window
    dead_letters: Counter[str] = field(default_factory=Counter)  # by reason
    alerts: int = 0  # threshold alerts committed to metering.alerts
    flushes: int = 0
    flush_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    lag: dict[str, int] = field(default_factory=dict)  # "stage/partition" -> messages behind

    def prometheus(self) -> str:
        lines = [
            "# TYPE metering_records_in_total counter",
            f"metering_records_in_total {self.records_in}",
            "# TYPE metering_records_accepted_total counter",
            f"metering_records_accepted_total {self.accepted}",
            "# TYPE metering_records_counted_total counter",
            f"metering_records_counted_total {self.counted}",
            "# TYPE metering_records_duplicate_total counter",
            f"metering_records_duplicate_total {self.duplicates}",
            "# TYPE metering_dead_letters_total counter",
            *(f'metering_dead_letters_total{{reason="{reason}"}} {n}' for reason, n in sorted(self.dead_letters.items())),
            "# TYPE metering_alerts_total counter",
            f"metering_alerts_total {self.alerts}",
            "# TYPE metering_flushes_total counter",
            f"metering_flushes_total {self.flushes}",
        ]
        if self.flush_seconds:
            ordered = sorted(self.flush_seconds)
            lines += [
                "# TYPE metering_flush_seconds summary",
                f'metering_flush_seconds{{quantile="0.5"}} {ordered[len(ordered) // 2]:.6f}',
                f'metering_flush_seconds{{quantile="0.99"}} {ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]:.6f}',
            ]
        lines.append("# TYPE metering_consumer_lag gauge")
        for name, lag in sorted(self.lag.items()):
            stage, partition = name.split("/")
            lines.append(f'metering_consumer_lag{{stage="{stage}",partition="{partition}"}} {lag}')
        return "\n".join(lines) + "\n"
