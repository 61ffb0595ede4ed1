"""The product's Kafka topics (public contract names) and their creation.

The base names are what users' producers and consumers depend on: add, never rename.
`METERING_TOPIC_PREFIX` (default empty) prefixes all of them, so several deployments or
test runs can share one cluster.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import (
    KafkaError,
    LeaderNotAvailableError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    for_code,
)
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.protocol.offset import OffsetRequest

from metering_pipeline.logs import get_logger
from metering_pipeline.settings import Settings

log = get_logger(__name__)

USAGE_RECORDED = "usage.recorded"
USAGE_DLQ = "usage.recorded.dlq"
USAGE_AGGREGATED = "usage.aggregated"
METRICS = "metering.metrics"
EVENTS = "metering.events"
THRESHOLDS = "metering.thresholds"
ALERTS = "metering.alerts"
PLANS = "metering.plans"
SUBSCRIPTIONS = "metering.subscriptions"
SUBJECTS = "metering.subjects"
WEBHOOKS = "metering.webhooks"

_COMPACTED = {"cleanup.policy": "compact"}
# The broker's clock, not the producer's, on usage.recorded: retention and the allowed lateness read a message's time,
# and a producer that sets it to the event time would have back-dated records deleted by retention within minutes.
_BROKER_TIME = {"message.timestamp.type": "LogAppendTime"}
_WEEK_MS = str(7 * 24 * 3600 * 1000)
# How long compaction keeps a changelog tombstone: a worker's state store not written for less than this cannot have
# missed one (state_store.STALE_AFTER is shorter). Kafka's default, set on the topic so that a broker whose default
# is lower does not silently break that rule.
CHANGELOG_TOMBSTONES_MS = 24 * 3600 * 1000
_LATEST = -1  # ListOffsets' timestamp for "the end offset"
KAFKA_ANSWER_TIMEOUT = 2.0  # seconds a readiness probe waits for a broker (probes time out after a few seconds)
KAFKA_UNREACHABLE = f"Kafka does not answer: no broker answered a metadata request within {KAFKA_ANSWER_TIMEOUT:g} s"


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
    subjects: str
    webhooks: str
    # Internal to the worker: the subject-routed stream, the rollup changelog, and the partition count they were
    # first used with.
    routed: str
    rollup_changelog: str
    layout: str
    webhook_deliveries: str  # internal to `metering webhooks`: the deliveries still to attempt

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
            subjects=p + SUBJECTS,
            webhooks=p + WEBHOOKS,
            routed=f"{p}{settings.consumer_group_prefix}.usage-by-subject",
            rollup_changelog=f"{p}{settings.consumer_group_prefix}.rollup-changelog",
            layout=f"{p}{settings.consumer_group_prefix}.layout",
            webhook_deliveries=f"{p}{settings.consumer_group_prefix}.webhook-deliveries",
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
        TopicSpec(topics.usage_recorded, settings.usage_partitions, _BROKER_TIME),
        TopicSpec(topics.dead_letters, settings.usage_partitions, _retention(settings.dead_letter_retention)),
        TopicSpec(topics.usage_aggregated, settings.usage_partitions, _retention(settings.usage_aggregated_retention)),
        TopicSpec(topics.metrics, 1, _COMPACTED),
        TopicSpec(topics.events, 1),
        TopicSpec(topics.thresholds, 1, _COMPACTED),
        TopicSpec(topics.alerts, settings.usage_partitions, _retention(settings.alerts_retention)),
        TopicSpec(topics.plans, 1, _COMPACTED),
        TopicSpec(topics.subscriptions, 1, _COMPACTED),
        TopicSpec(topics.subjects, 1, _COMPACTED),
        TopicSpec(topics.webhooks, 1, _COMPACTED),
    ]


def _retention(kept: timedelta | None) -> dict[str, str]:
    """A topic's retention.ms when a setting gives one; none: the broker's default."""
    return {} if kept is None else {"retention.ms": str(int(kept.total_seconds() * 1000))}


def internal_topics(settings: Settings) -> list[TopicSpec]:
    """Partition p's rollup state lives in changelog partition p: both have the same partition count."""
    topics = Topics.of(settings)
    return [
        TopicSpec(topics.routed, settings.usage_partitions, {"retention.ms": _WEEK_MS}),
        TopicSpec(
            topics.rollup_changelog,
            settings.usage_partitions,
            {**_COMPACTED, "delete.retention.ms": str(CHANGELOG_TOMBSTONES_MS)},
        ),
        TopicSpec(topics.layout, 1, _COMPACTED),
    ]


def event_reader(settings: Settings, group_id: str, *topics: str) -> AIOKafkaConsumer:
    """A member of `group_id` reading events as they were committed, from the start of what the group has not
    handled, and committing by hand once they are."""
    return AIOKafkaConsumer(
        *topics,
        **settings.kafka_client_options(),
        **settings.kafka_group_options(),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )


def webhook_topics(settings: Settings) -> list[TopicSpec]:
    """The deliveries still to attempt, one compacted entry each (a tombstone once delivered or failed): what a
    restarted `metering webhooks` resumes from. Its partitions are the unit its instances share the work by."""
    return [TopicSpec(Topics.of(settings).webhook_deliveries, settings.usage_partitions, _COMPACTED)]


def rollup_group(settings: Settings) -> str:
    """The consumer group of the workers' rollup stage (on the routed topic)."""
    return f"{settings.consumer_group_prefix}-rollups"


def router_group(settings: Settings) -> str:
    """The consumer group of the workers' router (on usage.recorded)."""
    return f"{settings.consumer_group_prefix}-router"


class TopicLayoutError(RuntimeError):
    """Existing topics the product cannot run on as they are; the message says what differs and what to do."""


async def ensure_topics(settings: Settings, specs: list[TopicSpec]) -> list[str]:
    """Create the topics that do not exist yet; returns the names created, once they have leaders.
    Existing topics are left as they are: a warning names those with fewer replicas than
    METERING_REPLICATION_FACTOR, a lower min.insync.replicas than the product sets, or no compaction where
    they need it."""
    if not specs:
        return []
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        await _warn_if_weaker(admin, settings, [s for s in specs if s.name in existing])
        missing = [spec for spec in specs if spec.name not in existing]
        if not missing:
            return []
        insync = {"min.insync.replicas": str(settings.insync_replicas)}
        new = [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=settings.replication_factor,
                topic_configs={**s.config, **insync},
            )
            for s in missing
        ]
        response = await admin.create_topics(new)
        created = []
        for name, code, *_ in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                raise RuntimeError(f"could not create topic {name}: Kafka error code {code}")
            created.append(name)
        await until_led(admin, created)
        return created
    finally:
        await admin.close()


async def _warn_if_weaker(admin: AIOKafkaAdminClient, settings: Settings, specs: list[TopicSpec]) -> None:
    """Topics someone else created (an operator, or the broker's auto-create for an early producer) may keep fewer
    copies than the product's settings ask for, (definitions and the changelog) lack compaction, so that their
    entries expire with the retention time, or (usage.recorded) keep the producers' message times."""
    if not specs:
        return
    for described in await admin.describe_topics([s.name for s in specs]):
        replicas = min((len(p["replicas"]) for p in described["partitions"]), default=settings.replication_factor)
        if replicas < settings.replication_factor:
            log.warning(
                "topic has fewer replicas than METERING_REPLICATION_FACTOR: a broker's loss can lose its data",
                topic=described["topic"],
                replicas=replicas,
                replication_factor=settings.replication_factor,
            )
    responses = await admin.describe_configs(
        [
            ConfigResource(
                ConfigResourceType.TOPIC,
                s.name,
                {"cleanup.policy": None, "min.insync.replicas": None, "message.timestamp.type": None},
            )
            for s in specs
        ]
    )
    wanted = {s.name: s.config.get("cleanup.policy") for s in specs}
    clocks = {s.name: s.config.get("message.timestamp.type") for s in specs}
    for response in responses:
        for _code, _message, _type, name, entries in response.resources:
            config = {entry[0]: entry[1] for entry in entries}
            policy = config.get("cleanup.policy")
            if wanted[name] is not None and policy is not None and wanted[name] not in policy.split(","):
                log.warning(
                    "topic is not compacted: its entries expire with its retention time; set cleanup.policy=compact",
                    topic=name,
                    cleanup_policy=policy,
                )
            clock = config.get("message.timestamp.type")
            if clocks[name] is not None and clock is not None and clock != clocks[name]:
                log.warning(
                    "topic keeps the producers' message times: its retention and the allowed lateness read the "
                    "producers' clocks; set message.timestamp.type=LogAppendTime",
                    topic=name,
                    message_timestamp_type=clock,
                )
            insync = config.get("min.insync.replicas")
            if insync is not None and insync.isdigit() and int(insync) < settings.insync_replicas:
                log.warning(
                    "topic acknowledges writes held by fewer replicas than METERING_MIN_INSYNC_REPLICAS; set its "
                    "min.insync.replicas",
                    topic=name,
                    min_insync_replicas=int(insync),
                    wanted=settings.insync_replicas,
                )


async def check_partitioning(settings: Settings) -> None:
    """Partition p of the routed topic holds the subjects whose state is in changelog partition p (a subject's
    partition is crc32 of its key modulo the count): partitions added to either topic, or to both, would split
    subjects' state and silently break their totals. Raises TopicLayoutError when the two counts differ, or differ
    from the count the workers first ran with (recorded in the layout topic, which this records when it has none)."""
    topics = Topics.of(settings)
    admin = AIOKafkaAdminClient(**settings.kafka_client_options())
    await admin.start()
    try:
        # Only topics that exist: a metadata request for a missing one would have the broker auto-create it.
        present = set(await admin.list_topics()) & {topics.routed, topics.rollup_changelog, topics.layout}
        counts = {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(sorted(present))}
    finally:
        await admin.close()
    routed, changelog = counts.get(topics.routed), counts.get(topics.rollup_changelog)
    if not (routed and changelog):
        return  # created by the worker's start
    if routed != changelog:
        raise TopicLayoutError(
            f"topic {topics.routed} has {routed} partitions and {topics.rollup_changelog} has {changelog}: they "
            "must have the same count (a partition's state lives in the changelog partition of the same number). "
            f"Partitions were added to one of them: with every worker stopped, run `metering repartition "
            f"--partitions {max(routed, changelog)}` to move the state to where it belongs (see {_REPARTITIONING})"
        )
    if not counts.get(topics.layout):
        return
    recorded = await recorded_partitions(settings, topics.layout)
    if recorded is None:
        await record_partitions(settings, topics.layout, routed)
    elif recorded != routed:
        raise TopicLayoutError(
            f"topics {topics.routed} and {topics.rollup_changelog} have {routed} partitions, but the workers first "
            f"ran with {recorded} (recorded in {topics.layout}): subjects would be routed to partitions that do not "
            f"hold their state. A repartition stopped before its end, or partitions were added by hand: with every "
            f"worker stopped, run `metering repartition --partitions {routed}` (see {_REPARTITIONING})"
        )


_REPARTITIONING = '"Growing the partition count" in docs/operations.md'
_PARTITIONS_KEY = b"partitions"
LAYOUT_READ_SECONDS = 30.0  # a compacted topic of a few messages: anything longer is a broker that does not serve it


async def recorded_partitions(settings: Settings, topic: str) -> int | None:
    """The partition count recorded in the layout topic (its latest entry), or None."""
    consumer = AIOKafkaConsumer(**settings.kafka_client_options(), enable_auto_commit=False)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]
        recorded = None
        try:
            async with asyncio.timeout(LAYOUT_READ_SECONDS):
                while await consumer.position(partition) < end:
                    for messages in (await consumer.getmany(partition, timeout_ms=1000)).values():
                        for message in messages:
                            if message.key == _PARTITIONS_KEY and message.value is not None:
                                recorded = int(orjson.loads(message.value)["partitions"])
        except TimeoutError:
            raise TopicLayoutError(
                f"could not read {topic} to its end ({end} messages) within {LAYOUT_READ_SECONDS:g} s: is its "
                "partition's leader available?"
            ) from None
        return recorded
    finally:
        await consumer.stop()


async def record_partitions(settings: Settings, topic: str, partitions: int) -> None:
    producer = AIOKafkaProducer(**settings.kafka_client_options(), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, orjson.dumps({"partitions": partitions}), key=_PARTITIONS_KEY, partition=0)
    finally:
        await producer.stop()


async def until_led(admin: AIOKafkaAdminClient, names: list[str], timeout: float = 30.0) -> None:
    """Waits until the leader of every partition of the new topics answers for it.

    Metadata names a leader a moment before that broker serves the partition; a producer writing in
    between gets NotLeaderForPartition warnings and retries. A ListOffsets request that every leader
    answers without error is the same test the producer's first write would be.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    client = admin._client  # aiokafka has no public call to send one request to a chosen broker
    while names:
        described = await admin.describe_topics(names)  # they exist now, so this creates nothing
        by_leader: dict[int, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
        for topic in described:
            for partition in topic["partitions"]:
                by_leader[partition["leader"]][topic["topic"]].append((partition["partition"], _LATEST))
        described_all = all(t["error_code"] == 0 and t["partitions"] for t in described) and -1 not in by_leader
        if described_all and all([await _answers(client, leader, topics) for leader, topics in by_leader.items()]):
            return
        if asyncio.get_running_loop().time() >= deadline:
            raise RuntimeError(f"partitions of {', '.join(names)} still had no serving leader after {timeout:.0f} s")
        await asyncio.sleep(0.1)


async def _answers(client: AIOKafkaClient, leader: int, topics: dict[str, list[tuple[int, int]]]) -> bool:
    response = await client.send(leader, OffsetRequest(-1, 0, list(topics.items())))
    return all(error_code == 0 for _topic, partitions in response.topics for _p, error_code, *_ in partitions)


async def kafka_answers(client: AIOKafkaClient, topic: str, timeout: float = KAFKA_ANSWER_TIMEOUT) -> bool:
    """Whether a broker answers a metadata request for `topic` within `timeout` (any broker: on a cluster, one down
    is not Kafka unreachable). What readiness asks of Kafka; a client's cached metadata would not tell."""
    nodes = [broker.nodeId for broker in client.cluster.brokers()] or [client.get_random_node()]
    try:
        async with asyncio.timeout(timeout):
            for node in nodes:
                if node is None:
                    continue
                try:
                    await client.send(node, MetadataRequest([topic], allow_auto_topic_creation=False))
                except (KafkaError, OSError):
                    continue
                return True
    except TimeoutError:
        pass
    return False


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> frozenset[int] | None:
    """The topic's partition ids as the broker has them now, or None while the topic does not exist.

    A client's cached metadata knows a topic only once something subscribed to or produced to it,
    so reading partitions from it silently sees none (or stale ones). This asks a broker for the
    topic alone and without auto-creation: a reader must not create a topic with the broker's
    defaults (a definitions topic must be compacted). Raises KafkaError when no broker answers or
    the topic cannot be described (e.g. not authorized).
    """
    client = consumer._client  # aiokafka exposes no public call for one topic's metadata without auto-creation
    node = client.get_random_node()
    if node is None:
        raise KafkaError(f"no Kafka broker known to describe topic {topic!r}")
    response = await client.send(node, MetadataRequest([topic], allow_auto_topic_creation=False))
    for described in response.to_object()["topics"]:
        if described["topic"] != topic:
            continue
        code = described["error_code"]
        if code == UnknownTopicOrPartitionError.errno or (
            code == LeaderNotAvailableError.errno and not described["partitions"]
        ):
            return None  # absent, or still being created
        if code not in (0, LeaderNotAvailableError.errno):
            raise for_code(code)(f"describing topic {topic!r}")
        return frozenset(p["partition"] for p in described["partitions"])
    return None
