"""The product's Kafka topics (public contract names) and their creation.

The base names are what users' producers and consumers depend on: add, never rename.
`METERING_TOPIC_PREFIX` (default empty) prefixes all of them, so several deployments or
test runs can share one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from metering_pipeline.settings import Settings

USAGE_RECORDED = "usage.recorded"
USAGE_DLQ = "usage.recorded.dlq"
USAGE_AGGREGATED = "usage.aggregated"
METRICS = "metering.metrics"
EVENTS = "metering.events"
THRESHOLDS = "metering.thresholds"
ALERTS = "metering.alerts"
PLANS = "metering.plans"
SUBSCRIPTIONS = "metering.subscriptions"

_COMPACTED = {"cleanup.policy": "compact"}
_WEEK_MS = str(7 * 24 * 3600 * 1000)


@dataclass(frozen=True)
class Topics:
    usage_recorded: str
    dead_letters: str
    usage_aggregated: str
    metrics: str
    events: str
    thresholds: str
    alerts: str
    plans: str
    subscriptions: str
    # Internal to the worker: the subject-routed stream and the rollup changelog.
    routed: str
    rollup_changelog: str

    @classmethod
    def of(cls, settings: Settings) -> Topics:
        p = settings.topic_prefix
        return cls(
            usage_recorded=p + USAGE_RECORDED,
            dead_letters=p + USAGE_DLQ,
            usage_aggregated=p + USAGE_AGGREGATED,
            metrics=p + METRICS,
            events=p + EVENTS,
            thresholds=p + THRESHOLDS,
            alerts=p + ALERTS,
            plans=p + PLANS,
            subscriptions=p + SUBSCRIPTIONS,
            routed=f"{p}{settings.consumer_group_prefix}.usage-by-subject",
            rollup_changelog=f"{p}{settings.consumer_group_prefix}.rollup-changelog",
        )


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


def public_topics(settings: Settings) -> list[TopicSpec]:
    """Usage topics scale with `usage_partitions` (the unit of worker parallelism); definitions are small."""
    topics = Topics.of(settings)
    return [
        TopicSpec(topics.usage_recorded, settings.usage_partitions),
        TopicSpec(topics.dead_letters, settings.usage_partitions),
        TopicSpec(topics.usage_aggregated, settings.usage_partitions),
        TopicSpec(topics.metrics, 1, _COMPACTED),
        TopicSpec(topics.events, 1),
        TopicSpec(topics.thresholds, 1, _COMPACTED),
        TopicSpec(topics.alerts, settings.usage_partitions),
        TopicSpec(topics.plans, 1, _COMPACTED),
        TopicSpec(topics.subscriptions, 1, _COMPACTED),
    ]


def internal_topics(settings: Settings) -> list[TopicSpec]:
    """Partition p's rollup state lives in changelog partition p: both have the same partition count."""
    topics = Topics.of(settings)
    return [
        TopicSpec(topics.routed, settings.usage_partitions, {"retention.ms": _WEEK_MS}),
        TopicSpec(topics.rollup_changelog, settings.usage_partitions, _COMPACTED),
    ]


async def ensure_topics(settings: Settings, specs: list[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet; returns the names created. Existing topics are left as they are."""
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [spec for spec in specs if spec.name not in existing]
        if not missing:
            return []
        new = [NewTopic(s.name, num_partitions=s.partitions, replication_factor=settings.replication_factor,
                        topic_configs=s.config) for s in missing]
        response = await admin.create_topics(new)
        created = []
        for name, code, *_ in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                raise RuntimeError(f"could not create topic {name}: Kafka error code {code}")
            created.append(name)
        return created
    finally:
        await admin.close()
