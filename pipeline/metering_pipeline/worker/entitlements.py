"""Entitlement checks: a subject's current usage of a metric against its thresholds, served
by the worker that owns the subject's partition.

Only the owner holds the subject's state, so a worker that does not own it forwards the request.
Owners are found from the rollup consumer group itself: every member's Kafka client id carries
its web URL, and the group description says which member holds which partition. No registry
to keep in sync, and the answer is current as of the last rebalance.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from metering_pipeline.logs import get_logger
from metering_pipeline.settings import Settings
from metering_pipeline.worker.rollup_stage import RollupStage
from metering_pipeline.worker.routing import subject_partition

log = get_logger(__name__)

CLIENT_ID_SEPARATOR = " @ "
FORWARDED_HEADER = "X-Metering-Forwarded"
SERVED_BY_HEADER = "X-Metering-Served-By"
_OWNERS_TTL = 5.0  # seconds a group description is trusted


def member_client_id(group_id: str, url: str) -> str:
    return f"{group_id}{CLIENT_ID_SEPARATOR}{url}"


def owners_from_description(description: dict[str, Any], topic: str) -> dict[int, str]:
    """partition -> owner URL, from one DescribeGroups entry."""
    owners: dict[int, str] = {}
    for member in description.get("members", []):
        _, sep, url = member["client_id"].partition(CLIENT_ID_SEPARATOR)
        if not sep or not member["member_assignment"]:
            continue
        assignment = ConsumerProtocolMemberAssignment.decode(member["member_assignment"])
        for assigned_topic, partitions in assignment.assignment:
            if assigned_topic == topic:
                owners.update(dict.fromkeys(partitions, url))
    return owners


class Entitlements:
    def __init__(self, settings: Settings, stage: RollupStage, url: str) -> None:
        self.settings = settings
        self.stage = stage
        self.url = url
        self._owners: dict[int, str] = {}
        self._owners_at = 0.0
        self._lock = asyncio.Lock()

    async def check(
        self, subject_type: str, subject_id: str, metric_key: str, forwarded: bool
    ) -> tuple[int, dict[str, Any], str]:
        """(HTTP status, body, URL of the worker that answered)."""
        partitions = self.stage.partition_count()
        if partitions is None:
            return 503, {"error": "starting", "message": "the worker has not joined its group yet"}, self.url
        partition = subject_partition(subject_type, subject_id, partitions)
        owned = self.stage.owned.get(partition)
        if owned is not None:
            status = owned.thresholds.status(metric_key, (subject_type, subject_id), datetime.now(UTC))
            if status.period is None:
                return (
                    404,
                    {"error": "unknown_metric", "message": f"no metric {metric_key!r} applies to this subject"},
                    self.url,
                )
            return 200, status.to_json(), self.url
        if partition in self.stage.restoring:
            return (
                503,
                {"error": "rebalancing", "message": f"partition {partition}'s state is being restored"},
                self.url,
            )
        if forwarded:  # the forwarding worker's view of the group is newer than ours, or a rebalance is under way
            return 503, {"error": "rebalancing", "message": f"partition {partition} is not owned here"}, self.url
        owner = await self._owner(partition)
        if owner is None or owner == self.url:
            return 503, {"error": "rebalancing", "message": f"partition {partition} has no owner right now"}, self.url
        return await self._forward(owner, subject_type, subject_id, metric_key)

    async def _owner(self, partition: int) -> str | None:
        async with self._lock:
            if partition not in self._owners or time.monotonic() - self._owners_at > _OWNERS_TTL:
                self._owners = await self._describe()
                self._owners_at = time.monotonic()
            return self._owners.get(partition)

    async def _describe(self) -> dict[int, str]:
        admin = AIOKafkaAdminClient(**self.settings.kafka_client_options())
        await admin.start()
        try:
            responses = await admin.describe_consumer_groups([self.stage.group_id])
        finally:
            await admin.close()
        owners: dict[int, str] = {}
        for response in responses:
            for group in response.to_object()["groups"]:
                owners.update(owners_from_description(group, self.stage.topic))
        return owners

    async def _forward(
        self, owner: str, subject_type: str, subject_id: str, metric_key: str
    ) -> tuple[int, dict[str, Any], str]:
        url = (
            f"{owner}/v1/subjects/{quote(subject_type, safe='')}/{quote(subject_id, safe='')}"
            f"/metrics/{quote(metric_key, safe='')}"
        )
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
                async with session.get(url, headers={FORWARDED_HEADER: "1"}) as response:
                    return response.status, await response.json(), response.headers.get(SERVED_BY_HEADER, owner)
        except (TimeoutError, aiohttp.ClientError) as error:
            self._owners_at = 0.0  # ask the group again next time
            log.warning("entitlement forward failed", owner=owner, error=str(error))
            return (
                503,
                {"error": "owner_unreachable", "message": f"the owner of this subject did not answer: {error}"},
                self.url,
            )
