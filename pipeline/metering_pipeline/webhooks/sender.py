"""The HTTP side of a delivery: one signed POST, its answer within the timeout or the reason there was none."""

from __future__ import annotations

import time
from datetime import datetime

import aiohttp

from metering_pipeline.settings import Settings
from metering_pipeline.webhooks.deliveries import Delivery, Outcome
from metering_pipeline.webhooks.destinations import RefusedDestination, check_url, resolver
from metering_pipeline.webhooks.signing import signature_header

USER_AGENT = "usage-metering-webhooks/1"
_ANSWER_KEPT = 200  # characters of a refusing receiver's answer kept in the delivery log


class WebhookSender:
    """POSTs deliveries through one connection pool; used as an async context manager."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> WebhookSender:
        connector = aiohttp.TCPConnector(resolver=resolver(self.settings.webhook_allow_private), limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout),
            headers={"User-Agent": USER_AGENT},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def post(self, url: str, delivery: Delivery, secrets: list[str], at: datetime) -> Outcome:
        """One attempt: a 2xx answer in time delivers it; a redirect is not followed (it could lead anywhere)."""
        assert self._session is not None, "use the sender as a context manager"
        body = delivery.body.encode()
        timestamp = int(at.timestamp())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(secrets, delivery.id, timestamp, body),
        }
        started = time.monotonic()
        try:
            check_url(url, self.settings.webhook_allow_http, self.settings.webhook_allow_private)
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                answer = (await response.content.read(_ANSWER_KEPT)).decode(errors="replace")
                status = response.status
        except RefusedDestination as refused:
            return Outcome(None, _since(started), f"refused: {refused}")
        except TimeoutError:
            return Outcome(None, _since(started), f"no answer within {self.settings.webhook_timeout:g} s")
        except (aiohttp.ClientError, OSError) as error:
            cause = error.__cause__ if isinstance(error.__cause__, RefusedDestination) else error
            prefix = "refused" if isinstance(cause, RefusedDestination) else "connection failed"
            return Outcome(None, _since(started), f"{prefix}: {cause}")
        if 200 <= status < 300:
            return Outcome(status, _since(started))
        if 300 <= status < 400:
            return Outcome(status, _since(started), "redirect not followed")
        return Outcome(status, _since(started), f"HTTP {status}: {answer}")


def _since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
