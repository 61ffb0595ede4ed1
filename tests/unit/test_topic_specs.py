"""What the product asks of the topics it creates, from its settings, without a broker."""

from __future__ import annotations

from datetime import timedelta

from metering_pipeline.settings import Settings
from metering_pipeline.topics import Topics, internal_topics, public_topics


def configs(settings: Settings) -> dict[str, dict[str, str]]:
    return {spec.name: spec.config for spec in public_topics(settings) + internal_topics(settings)}


def test_retention_settings_reach_their_topics_and_only_theirs(monkeypatch):
    monkeypatch.setenv("METERING_DEAD_LETTER_RETENTION", "P30D")
    monkeypatch.setenv("METERING_USAGE_AGGREGATED_RETENTION", "3600")
    monkeypatch.setenv("METERING_ALERTS_RETENTION", "PT12H")
    settings = Settings()
    topics = Topics.of(settings)
    assert settings.dead_letter_retention == timedelta(days=30)
    found = configs(settings)
    assert found[topics.dead_letters] == {"retention.ms": str(30 * 24 * 3600 * 1000)}
    assert found[topics.usage_aggregated] == {"retention.ms": "3600000"}
    assert found[topics.alerts] == {"retention.ms": str(12 * 3600 * 1000)}
    assert "retention.ms" not in found[topics.usage_recorded] and "retention.ms" not in found[topics.metrics]


def test_by_default_the_brokers_retention_and_its_clock_on_usage_recorded():
    settings = Settings()
    topics = Topics.of(settings)
    found = configs(settings)
    assert all(
        "retention.ms" not in found[name] for name in (topics.dead_letters, topics.usage_aggregated, topics.alerts)
    )
    assert found[topics.usage_recorded] == {"message.timestamp.type": "LogAppendTime"}
    assert found[topics.routed]["retention.ms"] == str(7 * 24 * 3600 * 1000)
