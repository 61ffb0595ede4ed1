"""Runs the phases in order and reports them side by side."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from metering_dev.bench import phases, state_phases
from metering_dev.bench.hot_path import render_state_costs, state_costs
from metering_dev.bench.phases import Result
from metering_dev.bench.workload import DimensionWorkload, Workload
from metering_pipeline import tables
from metering_pipeline.settings import Settings
from metering_pipeline.warehouse.client import connect

PHASES = ("baselines", "workers", "dimensions", "state", "memory", "steady", "history", "rebalance")
ALIASES = {"latency": "steady"}  # the steady phase's former name, which measured only alerts and freshness


@dataclass(frozen=True)
class Plan:
    records: int = 1_000_000
    subjects: int = 10_000
    batch: int = 500
    memory_keys: int = 1_000_000
    steady_seconds: float = 120.0  # the steady phase: measured after a warm-up of phases.WARM_UP_SECONDS
    steady_alerting: int = 200  # subjects with a threshold that trips during the steady phase
    steady_rate: float | None = None  # records/s; None: half of what worker ×1 reached on single-record messages
    dimension_subjects: int = 1_000  # the dimensions phase: subjects, each with up to 100 (model, region) rows
    dimension_users: int = 10_000  # distinct values of its UNIQUE_COUNT metric across all subjects
    history_records: int = 1_000_000  # the history phase: records over 30 days of event time
    history_subjects: int = 2_000  # × 2 SUM metrics
    history_sample_at: int = 200_000  # RSS growth per record is measured from here to the end
    rebalance_identities: int = 10_000_000  # the rebalance phase: dedup identities in one partition's changelog
    rebalance_rate: float = 500.0  # records/s of alert-crossing usage on the other partitions meanwhile
    phases: tuple[str, ...] = PHASES  # which to run (all by default)
    zoned_share: float = 0.0  # of the throughput and steady phases' subjects in a zone other than UTC

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            records=60_000,
            subjects=2_000,
            memory_keys=50_000,
            steady_seconds=15.0,
            steady_alerting=50,
            dimension_subjects=200,
            dimension_users=2_000,
            history_records=100_000,
            history_sample_at=20_000,
            rebalance_identities=500_000,
        )


DIMENSIONS_PHASE = "worker ×1, dimensions (2×10) + UNIQUE_COUNT"
DIMENSIONS_BASELINE = "baseline, single-record messages with dimensions"


def run(settings: Settings, plan: Plan, log_dir: Path, say: Callable[[str], None]) -> dict:
    run_id = f"bench{int(time.time())}"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    mismatches: dict[str, int] = {}
    databases: list[str] = []
    baselines: dict[str, float] = {}
    state: dict[str, dict[str, float]] = {}
    state_dirs = set(log_dir.glob("state-*"))  # workers' METERING_STATE_DIRs beside their logs: this run's go after

    def scoped(kind: str, group: str) -> Settings:
        isolated = phases.isolated(settings, f"{run_id}-{kind}.", f"{run_id}-{group}")
        databases.append(isolated.clickhouse_database)
        return isolated

    def workers(label: str, kind: str, group: str, processes: int, records: int, expected) -> Result:
        isolated = scoped(kind, group)
        say(f"{label}: {processes} worker process(es) until usage_summary holds all {records:,} records ...")
        result, started = phases.run_workers(isolated, processes, records, log_dir, group)
        phases.stop_all(started)
        if expected is not None:
            mismatches[label] = phases.check_totals(isolated, expected)
        result.phase = label
        results.append(result)
        say(f"  {result.rate:,.0f} records/s" + ("" if expected is None else f", totals {_verdict(mismatches[label])}"))
        return result

    def single_worker() -> Result:
        """One worker on the single-record messages: the capacity and backlog cost other phases are read against."""
        return workers("worker ×1, single-record messages", "single", "w1-single", 1, plan.records, expected)

    one: Result | None = None
    try:
        workload = Workload.recent(plan.records, plan.subjects, zoned_share=plan.zoned_share)
        if {"baselines", "workers", "steady"} & set(plan.phases):
            say(
                f"publishing {plan.records:,} single-record messages and {plan.records:,} records "
                f"in batches of {plan.batch} ..."
            )
            single_input = scoped("single", "input-single")
            batch_input = scoped("batch", "input-batch")
            expected = asyncio.run(phases.prepare_input(single_input, workload, 1))
            asyncio.run(phases.prepare_input(batch_input, workload, plan.batch))

        if "baselines" in plan.phases:
            say("baseline: plain aiokafka consumer, orjson + Decimal sums per (metric, subject, hour) ...")
            base_single = asyncio.run(phases.baseline(single_input, plan.records, "baseline, single-record messages"))
            base_batch = asyncio.run(phases.baseline(batch_input, plan.records, f"baseline, batches of {plan.batch}"))
            results += [base_single, base_batch]
            baselines |= {"single": base_single.rate, "batch": base_batch.rate}

        if "workers" in plan.phases:
            one = single_worker()
            workers(f"worker ×1, batches of {plan.batch}", "batch", "w1-batch", 1, plan.records, expected)
            workers("worker ×2, single-record messages", "single", "w2-single", 2, plan.records, expected)

        if "dimensions" in plan.phases:
            dims = DimensionWorkload.recent(plan.records, plan.dimension_subjects, plan.dimension_users)
            say(
                f"dimensions: publishing {plan.records:,} single-record messages "
                f"({plan.dimension_subjects:,} subjects; "
                f"tokens SUM of $.metadata.tokens by model × region, 10 × 10; active users UNIQUE_COUNT of "
                f"{plan.dimension_users:,} users) ..."
            )
            dims_input = scoped("dims", "input-dims")
            dims_expected = asyncio.run(phases.prepare_input(dims_input, dims, 1))
            base_dims = asyncio.run(phases.baseline(dims_input, plan.records, DIMENSIONS_BASELINE))
            results.append(base_dims)
            baselines["dimensions"] = base_dims.rate
            workers(DIMENSIONS_PHASE, "dims", "w1-dims", 1, plan.records, dims_expected)

        if "state" in plan.phases:
            say("state per distinct value and per dimension combination (in this process, tracemalloc) ...")
            state = state_costs()

        if "memory" in plan.phases:
            memory = Workload(plan.memory_keys, plan.memory_keys // 5, workload.start, seed=2, spread_hours=0)
            say(f"memory: {plan.memory_keys:,} active (metric, subject) keys ...")
            memory_settings = scoped("memory", "memory")
            asyncio.run(phases.prepare_input(memory_settings, memory, plan.batch))
            workers(f"worker ×1, {plan.memory_keys:,} active keys", "memory", "memory", 1, plan.memory_keys, None)

        if "steady" in plan.phases:
            if one is None:  # the capacity and the backlog cost it is measured against
                one = single_worker()
            load = phases.SteadyLoad(
                plan.steady_rate or one.rate * 0.5,
                plan.steady_seconds,
                plan.subjects,
                plan.steady_alerting,
                plan.zoned_share,
            )
            say(
                f"steady load: {load.rate:,.0f} records/s for {phases.WARM_UP_SECONDS:.0f} + {load.seconds:.0f} s, "
                f"{load.subjects:,} subjects × 5 metrics, {load.alerting} thresholds ..."
            )
            backlog_us = one.cpu_seconds / one.records * 1e6
            results.append(asyncio.run(phases.steady_load(scoped("steady", "steady"), load, backlog_us, log_dir)))

        if "history" in plan.phases:
            history, wrong = state_phases.history(
                scoped("history", "history"),
                plan.history_records,
                plan.history_subjects,
                plan.history_sample_at,
                log_dir,
                say,
            )
            results.append(history)
            mismatches[history.phase] = wrong

        if "rebalance" in plan.phases:
            results.append(
                state_phases.rebalance(
                    scoped("rebalance", "rebalance"), plan.rebalance_identities, plan.rebalance_rate, log_dir, say
                )
            )
    finally:
        _drop(settings, databases)
        asyncio.run(_delete_topics(settings, f"{run_id}-"))
        for directory in set(log_dir.glob("state-*")) - state_dirs:
            shutil.rmtree(directory, ignore_errors=True)

    return report(results, mismatches, baselines, state)


def report(
    results: list[Result],
    mismatches: dict[str, int],
    baselines: dict[str, float],
    state: dict[str, dict[str, float]] | None = None,
) -> dict:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "results": [asdict(r) | {"records_per_s": r.rate} for r in results],
        "total_mismatches": mismatches,
        "baselines": baselines,
        "state_bytes": state or {},
    }


def _verdict(mismatches: int) -> str:
    return "exact" if mismatches == 0 else f"{mismatches} wrong"


def _baseline_of(phase: str, baselines: dict[str, float]) -> float | None:
    if "dimensions" in phase:
        return baselines.get("dimensions")
    return baselines.get("batch") if "batch" in phase else baselines.get("single")


def render(summary: dict) -> str:
    base = summary["baselines"]
    rows = []
    for r in summary["results"]:
        if r["phase"] in (phases.STEADY_PHASE, state_phases.REBALANCE_PHASE):
            continue
        baseline = None if r["phase"] == state_phases.HISTORY_PHASE else _baseline_of(r["phase"], base)
        rows.append(
            (
                r["phase"],
                f"{r['records']:,}",
                f"{r['seconds']:.1f}",
                f"{r['records_per_s']:,.0f}",
                f"{r['records_per_s'] / baseline:.2f}" if baseline else "",
                f"{r['cpu_seconds']:.1f}",
                "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:,.0f}",
                ""
                if r["phase"] not in summary["total_mismatches"]
                else _verdict(summary["total_mismatches"][r["phase"]]),
            )
        )
    sections = []
    if rows:
        sections.append(
            tables.render(
                ["phase", "records", "seconds", "records/s", "× baseline", "CPU s", "peak RSS MB", "totals"], rows
            )
        )
    steady = next((r for r in summary["results"] if r["phase"] == phases.STEADY_PHASE), None)
    if steady:
        e = steady["extra"]
        sections.append(
            f"steady load at {e['rate']:,.0f} records/s: {e['cpu_us_per_record']:.1f} µs of worker CPU per record, "
            f"{e['cpu_vs_backlog']:.2f}× its {e['backlog_cpu_us_per_record']:.1f} µs on the backlog; "
            f"alert latency p50 {e['latency_p50_s'] * 1000:,.0f} ms, p99 {e['latency_p99_s'] * 1000:,.0f} ms "
            f"({e['alerts_received']} of {e['alerts_expected']} alerts); usage_summary freshness "
            f"p50 {e['freshness_p50_s']:.2f} s, p99 {e['freshness_p99_s']:.2f} s"
        )
    if summary.get("state_bytes"):
        sections.append(render_state_costs(summary["state_bytes"]))
    if state_text := state_phases.render(summary["results"]):
        sections.append(state_text)
    machine = summary["machine"]
    return "\n\n".join(sections) + f"\n{machine['cores']} cores, Python {machine['python']}, {summary['date']}"


def _drop(settings: Settings, databases: list[str]) -> None:
    with connect(settings, database="default") as admin:
        for database in databases:
            admin.command(f"DROP DATABASE IF EXISTS `{database}`")


async def _delete_topics(settings: Settings, prefix: str) -> None:
    """The run's topics, like its databases: a day of runs otherwise leaves gigabytes in the broker, and later
    runs on the same stack measure a slower broker."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    await admin.start()
    try:
        names = [name for name in await admin.list_topics() if name.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


def write(summary: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str))
