"""The soak run's chart: RSS and consumer lag over time, so a slow leak or a growing backlog shows at a glance."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from metering_dev.bench.soak_summary import Sample


def render_soak_chart(samples: Sequence[Sample], path: Path, title: str, warmup_s: float) -> None:
    """Two panels sharing a time axis in minutes: worker RSS (MB), then lag of both stages (messages).
    Agg backend: no display needed, the benchmark runs on headless machines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    minutes = [s.t_s / 60 for s in samples]
    figure, (memory, lag) = pyplot.subplots(2, 1, sharex=True, figsize=(10, 6.5), constrained_layout=True)
    try:
        memory.plot(minutes, [s.rss_mb for s in samples], color="tab:blue", linewidth=1.2)
        memory.set_ylabel("worker RSS (MB)")
        memory.set_ylim(bottom=0)
        memory.set_title(title)
        lag.plot(minutes, [s.router_lag for s in samples], label="router (usage.recorded)", linewidth=1.0)
        lag.plot(minutes, [s.rollups_lag for s in samples], label="rollups (usage-by-subject)", linewidth=1.0)
        lag.set_ylabel("consumer lag (messages)")
        lag.set_ylim(bottom=0)
        lag.yaxis.set_major_locator(MaxNLocator(integer=True))
        lag.set_xlabel("minutes since publishing started")
        lag.legend(loc="upper left")
        drain = next((s.t_s / 60 for s in samples if s.phase == "drain"), None)
        for axes in (memory, lag):
            axes.grid(alpha=0.3)
            axes.axvspan(0, warmup_s / 60, color="grey", alpha=0.12, linewidth=0)
            if drain is not None:
                axes.axvline(drain, color="grey", linestyle="--", linewidth=0.8)
        memory.text(
            0.005,
            0.02,
            "shaded: warm-up; dashed: publishing stops",
            transform=memory.transAxes,
            fontsize=8,
            color="grey",
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
    finally:
        pyplot.close(figure)
