"""The endpoint's one logger, shared by its modules so every line keeps the package's name."""

from __future__ import annotations

import logging

log = logging.getLogger("metering_dev.clickhouse_endpoint")
