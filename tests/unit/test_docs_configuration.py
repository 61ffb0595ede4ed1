"""docs/configuration.md is generated from the settings models and names every setting."""

from __future__ import annotations

from pathlib import Path

from metering_dev.docs import render
from metering_dev.settings import StackSettings
from metering_pipeline.settings import Settings

CONFIGURATION = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_page_matches_the_settings_models() -> None:
    assert CONFIGURATION.read_text() == render(), "docs/configuration.md is stale: run python -m metering_dev.docs"


def test_configuration_page_names_every_setting_and_the_cli_log_level() -> None:
    page = render()
    names = [f"METERING_{name.upper()}" for model in (Settings, StackSettings) for name in model.model_fields]
    assert [name for name in names if f"| `{name}` |" not in page] == []
    assert "| `METERING_LOG_LEVEL` | `metering --log-level` | `WARNING` |" in page
