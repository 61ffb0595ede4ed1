"""Delivery status of alert e-mails in ClickHouse (`notification_deliveries`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client

SENT = "sent"
FAILED = "failed"


class DeliveryLog:
    def __init__(self, client: Client) -> None:
        self.client = client
        self._lock = asyncio.Lock()

    async def sent(self, alert_id: str, addresses: Iterable[str]) -> set[str]:
        """The addresses this alert was already delivered to (by any notifier, before any restart)."""
        query = (
            "SELECT email FROM notification_deliveries FINAL "
            "WHERE alert_id = {alert_id:String} AND email IN {emails:Array(String)} AND status = {sent:String}"
        )
        async with self._lock:
            result = await asyncio.to_thread(
                self.client.query, query, parameters={"alert_id": alert_id, "emails": list(addresses), "sent": SENT}
            )
        return {row[0] for row in result.result_rows}

    async def record(self, alert_id: str, address: str, status: str, attempts: int, error: str = "") -> None:
        row = [alert_id, address, status, attempts, error, datetime.now(UTC)]
        async with self._lock:
            await asyncio.to_thread(
                self.client.insert,
                "notification_deliveries",
                [row],
                column_names=["alert_id", "email", "status", "attempts", "error", "updated_at"],
            )
