"""A worker's state on local disk (METERING_STATE_DIR): restarts replay only the changelog's tail, and a store that is
gone, damaged, left by another assignment or out of room never changes a total.

The changelog is the truth: each test ends by checking every monthly total and record count in ClickHouse against
what was published, and that duplicates of records counted before the fault are still refused."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from support import define, eventually, metric, publish, summary_rows, usage, while_running, worker_metric

pytestmark = pytest.mark.integration

SUBJECTS = 40


def _batch(first: int, count: int, prefix: str = "r") -> list:
    return [usage(f"{prefix}{n}", "tokens", f"org:o{n % SUBJECTS}", "0.25") for n in range(first, first + count)]


def _monthly(settings) -> tuple[Decimal, int]:
    rows = [value for key, value in summary_rows(settings, ["tokens"]).items() if key[2] == "MONTHLY" and not key[4]]
    return sum((total for total, _ in rows), Decimal(0)), sum(count for _, count in rows)


def _counted(worker, settings, records: int) -> None:
    """Wait until ClickHouse's monthly rows hold exactly `records` records of 0.25, and no more."""

    def exact() -> bool:
        total, count = _monthly(settings)
        assert (total, count) == (Decimal("0.25") * records, records), (total, count)
        return True

    eventually(while_running(worker, exact), 90, interval=0.5, message=worker.log_tail)


def _ready(worker) -> bool:
    """/ready answers 200 once every assigned partition's state is restored (nothing answers while it starts)."""
    try:
        return worker.ready()[0] == 200
    except OSError:
        return False


def test_a_worker_restarted_on_its_state_dir_replays_only_the_changelog_tail_and_counts_exactly(pipeline, tmp_path):
    settings, new_worker = pipeline
    state = tmp_path / "state"
    asyncio.run(define(settings, metric("tokens", "SUM")))
    published = 0
    # SIGKILLed mid-stream, again and again, each time restarted on the same state dir: some kills fall between a
    # checkpoint's Kafka commit and its store write, which the changelog's tail replays.
    for round_ in range(3):
        worker = new_worker(METERING_STATE_DIR=str(state)).start()
        worker.wait_healthy()
        asyncio.run(publish(settings, _batch(published, 2_000)))
        published += 2_000
        if round_ < 2:
            eventually(while_running(worker, lambda w=worker: worker_metric(w, "metering_records_counted") > 500), 60)
            worker.kill()
    _counted(worker, settings, published)
    eventually(lambda: _ready(worker), 30)
    replayed = worker_metric(worker, "metering_state_restored_entries")
    worker.stop()

    # A last restart with nothing new replays only the tail since the last stored checkpoint, not the whole
    # changelog (which holds an identity entry, hourly, daily, monthly rollups per subject, and more).
    worker = new_worker(METERING_STATE_DIR=str(state)).start()
    worker.wait_healthy()
    eventually(lambda: _ready(worker), 30)
    tail = worker_metric(worker, "metering_state_restored_entries")
    assert tail < 20, f"replayed {tail} changelog entries after a clean stop (the previous start replayed {replayed})"
    asyncio.run(publish(settings, _batch(0, 500) + _batch(published, 10)))  # 500 duplicates, 10 new
    published += 10
    _counted(worker, settings, published)
    assert worker_metric(worker, "metering_records_duplicate") == 500


def test_a_deleted_or_corrupted_store_is_rebuilt_from_the_changelog_and_says_why(pipeline, tmp_path):
    settings, new_worker = pipeline
    state = tmp_path / "state"
    asyncio.run(define(settings, metric("tokens", "SUM")))
    worker = new_worker(METERING_STATE_DIR=str(state)).start()
    worker.wait_healthy()
    asyncio.run(publish(settings, _batch(0, 1_000)))
    _counted(worker, settings, 1_000)
    worker.stop()

    stores = sorted(path for path in state.iterdir() if "rollup-changelog" in path.name)
    assert len(stores) == 4, stores  # one per partition of the routed topic
    shutil.rmtree(stores[0])  # deleted
    for file in stores[1].iterdir():  # corrupted: every file overwritten with garbage
        if file.is_file():
            file.write_bytes(b"\x00garbage" * 64)

    worker = new_worker(METERING_STATE_DIR=str(state)).start()
    worker.wait_healthy()
    eventually(lambda: _ready(worker), 60, message=worker.log_tail)
    assert "state store rebuilt from the changelog" in worker.log_tail(20_000), worker.log_tail()
    asyncio.run(publish(settings, _batch(0, 1_000) + _batch(1_000, 100)))  # every old id again: all duplicates
    _counted(worker, settings, 1_100)
    assert worker_metric(worker, "metering_records_duplicate") == 1_000


def test_a_state_dir_left_by_another_assignment_catches_up_from_the_changelog(pipeline, tmp_path):
    settings, new_worker = pipeline
    asyncio.run(define(settings, metric("tokens", "SUM")))
    first_dir = tmp_path / "first"
    first = new_worker(METERING_STATE_DIR=str(first_dir)).start()
    first.wait_healthy()
    asyncio.run(publish(settings, _batch(0, 1_000)))
    _counted(first, settings, 1_000)
    first.stop()

    # Meanwhile another worker, on another machine (state dir), owned the partitions and moved them on.
    other = new_worker(METERING_STATE_DIR=str(tmp_path / "other")).start()
    other.wait_healthy()
    asyncio.run(publish(settings, _batch(1_000, 1_000)))
    _counted(other, settings, 2_000)
    other.stop()

    # The first worker's stores are behind the changelog: they replay what the other committed, no more, no less.
    first = new_worker(METERING_STATE_DIR=str(first_dir)).start()
    first.wait_healthy()
    asyncio.run(publish(settings, _batch(0, 2_000) + _batch(2_000, 100)))
    _counted(first, settings, 2_100)
    assert worker_metric(first, "metering_records_duplicate") == 2_000


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB file system (tmpfs) for a state dir: room for a few thousand records' state, not for more."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_state_disk_stops_the_worker_with_a_clear_error_and_a_restart_with_room_loses_nothing(
    pipeline, small_disk: Path, tmp_path
):
    """Also the crash between a checkpoint's Kafka commit and its store write, made certain: the checkpoint that
    fills the disk is committed, and its store write fails."""
    settings, new_worker = pipeline
    asyncio.run(define(settings, metric("tokens", "SUM")))
    worker = new_worker(METERING_STATE_DIR=str(small_disk / "state")).start()
    worker.wait_healthy()
    records = 60_000
    asyncio.run(publish(settings, _batch(0, records)))
    exited = eventually(lambda: worker.process.poll() is not None, 120, message=worker.log_tail)
    assert exited and worker.process.returncode != 0
    said = worker.log_tail(20_000)
    assert "state store" in said and "could not be written" in said, said

    # With room (the same store, copied to a larger disk), the worker goes on from what the changelog committed.
    roomy = tmp_path / "roomy"
    shutil.copytree(small_disk / "state", roomy)
    worker = new_worker(METERING_STATE_DIR=str(roomy)).start()
    worker.wait_healthy()
    _counted(worker, settings, records)
    asyncio.run(publish(settings, _batch(0, 100)))  # duplicates
    eventually(while_running(worker, lambda: worker_metric(worker, "metering_records_duplicate") >= 100), 60)
    _counted(worker, settings, records)
