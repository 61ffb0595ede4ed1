"""The development commands the product CLI gains when this distribution is installed (entry point group
`metering.commands`): `metering stack`, `metering bench` and `metering demo`."""

from __future__ import annotations

from metering_dev.cli.bench import bench
from metering_dev.cli.demo import demo
from metering_dev.cli.stack import stack

__all__ = ["bench", "demo", "stack"]
