"""The development tooling's own settings, read from ``METERING_*`` env vars like the product's.

The product's `Settings` configures what runs in production; where the local stack keeps its data, which broker it
runs and which Kafka release it resolves concern only a checkout, so they live here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BrokerKind = Literal["apache", "tansu"]


def _default_home() -> Path:
    return Path.home() / ".local" / "share" / "metering"


class StackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERING_", extra="ignore")

    stack_broker: BrokerKind | None = Field(
        default=None, description="Broker for `metering stack up`; default apache where java and mvn exist, else tansu."
    )
    stack_dir: Path = Field(default_factory=lambda: _default_home() / "stack")
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "metering")
    kafka_version: str = "4.1.1"
    stack_kafka_heap: str = "512m"
