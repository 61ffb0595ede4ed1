"""What a worker process sets up before it connects to anything."""

from __future__ import annotations

import platform

import pytest

from metering_pipeline.settings import Settings
from metering_pipeline.worker import allocator
from metering_pipeline.worker.app import create_app


def test_a_state_dir_that_does_not_exist_yet_is_made_with_its_parents(tmp_path):
    state_dir = tmp_path / "fresh-volume" / "metering" / "state"
    create_app(Settings(state_dir=state_dir), web_port=6066)
    assert state_dir.is_dir()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")
def test_glibc_takes_the_allocator_policy():
    assert allocator.tune()  # mallopt answers 0 for a parameter or value it refuses
