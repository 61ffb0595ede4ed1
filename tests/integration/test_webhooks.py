"""`metering webhooks` end to end: alerts and metric definitions from a real worker, endpoints through the API, real
HTTP receivers on loopback that verify every delivery with the Standard Webhooks reference library, the delivery log
in ClickHouse, a SIGKILL mid-retry, a rotation and a resend."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import orjson
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from metering_pipeline.topics import Topics
from metering_pipeline.warehouse.client import connect
from support import (
    define,
    eventually,
    free_port,
    metric,
    publish,
    read_values,
    running_api,
    set_thresholds,
    settings_env,
    threshold,
    usage,
)

pytestmark = pytest.mark.integration

TIMEOUT = 1.0  # METERING_WEBHOOK_TIMEOUT of these tests
SCHEDULE = "0,500ms,500ms,1s,1s,1s,1s,1s"
OVERLAP = 3  # seconds: METERING_WEBHOOK_ROTATION_OVERLAP of these tests


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    answered: int
    verified_by: list[int]  # indexes of the secrets (oldest first) whose signature the reference library accepted


@dataclass
class Receiver:
    """An HTTP server on loopback: each path answers as `answers[path]` says and checks signatures against
    `secrets[path]` with the reference library (not the product's code)."""

    port: int = field(default_factory=free_port)
    answers: dict[str, Callable[[], int]] = field(default_factory=dict)
    secrets: dict[str, list[str]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    def handle(self, path: str, headers: dict[str, str], body: bytes) -> int:
        verified = []
        for index, secret in enumerate(self.secrets.get(path, [])):
            try:
                Webhook(secret).verify(body, headers)  # also refuses a timestamp more than 5 minutes off
                verified.append(index)
            except WebhookVerificationError:
                pass
        received = Received(path, headers, body, time.monotonic(), 0, verified)  # recorded as it arrives
        self.received.append(received)
        received.answered = self.answers.get(path, lambda: 200)()
        return received.answered

    @contextmanager
    def serving(self) -> Iterator[Receiver]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.handle(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()


def hangs() -> int:
    time.sleep(TIMEOUT * 3)
    return 200


def failing_times(count: int) -> Callable[[], int]:
    left = [count]

    def answer() -> int:
        left[0] -= 1
        return 500 if left[0] >= 0 else 200

    return answer


def start_webhooks(env: dict[str, str], log: Path, port: int) -> subprocess.Popen[bytes]:
    """A `metering webhooks` process; a static group member, as in production, so that its successor after a kill
    takes over its partitions without waiting for its session to time out."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "metering_pipeline.cli", "webhooks", "--web-port", str(port)],
            env={**os.environ, **env, "METERING_KAFKA_GROUP_INSTANCE_ID": "webhooks-1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def attempts(settings, endpoint_id: str) -> list[tuple[str, int, str, int | None, str]]:
    with connect(settings) as client:
        return list(
            client.query(
                "SELECT delivery_id, attempt, status, status_code, error FROM webhook_deliveries FINAL "
                "WHERE endpoint_id = {e:String} ORDER BY delivery_id, attempt",
                parameters={"e": endpoint_id},
            ).result_rows
        )


async def alerts_on_kafka(settings, count: int) -> dict[str, bytes]:
    """The alerts topic's values by alert id, as a consumer reads them."""
    values = await read_values(settings.kafka_bootstrap, Topics.of(settings).alerts, count)
    return {orjson.loads(value)["id"]: value for value in values}


async def test_webhooks_are_signed_retried_logged_resumed_after_a_kill_rotated_and_resent(pipeline, tmp_path):
    settings, new_worker = pipeline
    receiver, late = Receiver(), Receiver()  # `late` starts listening only after the first attempts failed
    env = settings_env(settings) | {
        "METERING_WEBHOOK_ALLOW_HTTP": "true",
        "METERING_WEBHOOK_ALLOW_PRIVATE": "true",
        "METERING_WEBHOOK_TIMEOUT": str(TIMEOUT),
        "METERING_WEBHOOK_RETRY_SCHEDULE": SCHEDULE,
        "METERING_WEBHOOK_ROTATION_OVERLAP": str(OVERLAP),
    }
    web_port = free_port()
    with receiver.serving(), running_api(settings, tmp_path, env) as api, api.client() as http:
        # Without METERING_WEBHOOK_ALLOW_PRIVATE, a loopback URL is refused (the CLI shares the API's rule).
        refused = subprocess.run(
            [sys.executable, "-m", "metering_pipeline.cli", "webhook", "create", "--url", "https://127.0.0.1/x"]
            + ["--event-type", "threshold.exceeded"],
            env={**os.environ, **settings_env(settings)},
            capture_output=True,
            text=True,
        )
        assert refused.returncode != 0 and "loopback" in refused.stderr and "ALLOW_PRIVATE" in refused.stderr
        assert http.get("/v1/webhooks", headers={"Authorization": f"Bearer {api.keys['org1']}"}).status_code == 403

        endpoints: dict[str, dict] = {}
        for name, types in [
            ("ok", ["threshold.approaching", "threshold.exceeded", "metric.defined"]),
            ("flaky", ["threshold.exceeded"]),
            ("hang", ["threshold.exceeded"]),
            ("doomed", ["threshold.exceeded"]),
        ]:
            answer = http.post(
                "/v1/webhooks", json={"url": receiver.url(f"/{name}"), "eventTypes": types, "description": name}
            )
            assert answer.status_code == 201, answer.text
            endpoints[name] = answer.json()
            receiver.secrets[f"/{name}"] = [endpoints[name]["secret"]]
        answer = http.post("/v1/webhooks", json={"url": late.url("/late"), "eventTypes": ["threshold.exceeded"]})
        endpoints["late"] = answer.json()
        late.secrets["/late"] = [endpoints["late"]["secret"]]
        listed = http.get("/v1/webhooks").json()["webhooks"]
        assert {e["id"] for e in listed} == {e["id"] for e in endpoints.values()}
        assert all("secret" not in e for e in listed) and "whsec_" not in http.get("/v1/webhooks").text
        receiver.answers |= {"/flaky": failing_times(2), "/hang": hangs, "/doomed": lambda: 500}

        webhooks = start_webhooks(env, tmp_path / "webhooks-1.log", web_port)
        try:
            await define(settings, metric("tokens", "SUM"))
            await set_thresholds(settings, threshold("t1", "tokens", "org:*", "100"))
            new_worker().start().wait_healthy()
            await publish(settings, [usage("a1", "tokens", "org:acme", "120")])  # approaching, then exceeded
            on_kafka = await alerts_on_kafka(settings, 2)
            exceeded = next(body for body in on_kafka.values() if b'"threshold.exceeded"' in body)

            # Every alert exactly as on Kafka, and the metric definition, signed with the endpoint's secret.
            def ok_has_all() -> bool:
                return len(receiver.at("/ok")) >= 3

            await asyncio.to_thread(eventually, ok_has_all, 60)
            ok = receiver.at("/ok")
            assert {r.body for r in ok if b'"threshold.' in r.body} == set(on_kafka.values())
            assert any(b'"metric.defined"' in r.body for r in ok)
            assert all(r.verified_by == [0] and r.answered == 200 for r in ok)
            assert len({r.headers["webhook-id"] for r in ok}) == 3
            assert all(abs(int(r.headers["webhook-timestamp"]) - time.time()) < 300 for r in ok)

            # The doomed endpoint is deleted while its retries are pending: they stop, logged failed, unsent.
            await asyncio.to_thread(eventually, lambda: len(receiver.at("/doomed")) >= 1, 30)
            assert http.delete(f"/v1/webhooks/{endpoints['doomed']['id']}").status_code == 204
            sent_before_delete = len(receiver.at("/doomed"))

            # 500, 500, 200: three attempts logged, one accepted.
            def flaky_delivered() -> bool:
                return [row[1:3] for row in attempts(settings, endpoints["flaky"]["id"])] == [
                    (1, "retrying"),
                    (2, "retrying"),
                    (3, "delivered"),
                ]

            await asyncio.to_thread(eventually, flaky_delivered, 30)
            assert [r.answered for r in receiver.at("/flaky")] == [500, 500, 200]
            assert all(r.body == exceeded for r in receiver.at("/flaky"))
            assert len({r.headers["webhook-id"] for r in receiver.at("/flaky")}) == 1

            # A receiver that hangs times out and is retried; the others were not held up by it.
            hung = receiver.at("/hang")
            assert hung and [row[2:] for row in attempts(settings, endpoints["hang"]["id"])][0] == (
                "retrying",
                None,
                f"no answer within {TIMEOUT:g} s",
            )
            exceeded_at_ok = next(r.at for r in ok if r.body == exceeded)
            assert exceeded_at_ok < hung[0].at + TIMEOUT

            # The late receiver was down for its first attempts: delivered once it listens.
            await asyncio.to_thread(eventually, lambda: len(attempts(settings, endpoints["late"]["id"])) >= 2, 30)
            with late.serving():
                await asyncio.to_thread(eventually, lambda: len(late.at("/late")) == 1, 30)
                assert late.at("/late")[0].body == exceeded and late.at("/late")[0].verified_by == [0]
                first_error = attempts(settings, endpoints["late"]["id"])[0][4]
                assert first_error.startswith("connection failed")

            def doomed_ended() -> bool:
                return attempts(settings, endpoints["doomed"]["id"])[-1][2:] == (
                    "failed",
                    None,
                    "endpoint deleted: not sent",
                )

            await asyncio.to_thread(eventually, doomed_ended, 30)
            assert len(receiver.at("/doomed")) == sent_before_delete

            # SIGKILL while a delivery waits for its next attempt: the restarted process delivers it, once.
            sick = http.post("/v1/webhooks", json={"url": receiver.url("/sick"), "eventTypes": ["threshold.exceeded"]})
            sick_id = sick.json()["id"]
            receiver.secrets["/sick"] = [sick.json()["secret"]]
            healthy = threading.Event()
            receiver.answers["/sick"] = lambda: 200 if healthy.is_set() else 503
            await publish(settings, [usage("b1", "tokens", "org:globex", "150")])
            await asyncio.to_thread(eventually, lambda: len(receiver.at("/sick")) >= 2, 30)
            webhooks.send_signal(signal.SIGKILL)
            webhooks.wait(timeout=10)
            healthy.set()
            webhooks = start_webhooks(env, tmp_path / "webhooks-2.log", web_port)
            await asyncio.to_thread(eventually, lambda: any(r.answered == 200 for r in receiver.at("/sick")), 60)
            await asyncio.sleep(2)
            sick_received = receiver.at("/sick")
            assert len({r.headers["webhook-id"] for r in sick_received}) == 1
            assert [r.answered for r in sick_received].count(200) == 1
            assert all(r.verified_by == [0] for r in sick_received)
            assert attempts(settings, sick_id)[-1][2] == "delivered"

            # Rotation: both secrets sign for the overlap, then only the new one.
            old_secret = endpoints["ok"]["secret"]
            rotated = http.post(f"/v1/webhooks/{endpoints['ok']['id']}/rotate-secret")
            overlap_ends = time.monotonic() + OVERLAP
            assert rotated.status_code == 200 and rotated.json()["secret"] != old_secret
            receiver.secrets["/ok"] = [old_secret, rotated.json()["secret"]]
            before = len(receiver.at("/ok"))
            await publish(settings, [usage("c1", "tokens", "org:initech", "200")])
            await asyncio.to_thread(eventually, lambda: len(receiver.at("/ok")) >= before + 2, 30)
            assert all(r.verified_by == [0, 1] for r in receiver.at("/ok")[before:])
            assert all(len(r.headers["webhook-signature"].split(" ")) == 2 for r in receiver.at("/ok")[before:])

            # Resend, after the overlap: the same body and webhook-id, signed with the new secret only; the log pages.
            await asyncio.sleep(overlap_ends - time.monotonic())
            page = http.get(f"/v1/webhooks/{endpoints['ok']['id']}/deliveries", params={"limit": 2}).json()
            assert len(page["deliveries"]) == 2
            delivered = http.get(
                f"/v1/webhooks/{endpoints['ok']['id']}/deliveries", params={"status": "delivered", "limit": 500}
            ).json()["deliveries"]
            assert len(delivered) == len(receiver.at("/ok"))
            first = next(d for d in delivered if d["eventId"] in on_kafka and on_kafka[d["eventId"]] == exceeded)
            resent = http.post(f"/v1/webhooks/{endpoints['ok']['id']}/deliveries/{first['deliveryId']}/resend")
            assert resent.status_code == 202, resent.text
            count = len(receiver.at("/ok"))
            await asyncio.to_thread(eventually, lambda: len(receiver.at("/ok")) == count + 1, 30)
            again = receiver.at("/ok")[-1]
            assert (again.body, again.headers["webhook-id"], again.verified_by) == (exceeded, first["deliveryId"], [1])

            metrics = httpx.get(f"http://127.0.0.1:{web_port}/metrics").text
            assert 'metering_webhook_attempts_total{outcome="delivered"}' in metrics
            assert 'metering_webhook_attempt_seconds_count{outcome="retrying"}' in metrics
            assert old_secret not in metrics and old_secret not in (tmp_path / "webhooks-1.log").read_text()
        finally:
            webhooks.send_signal(signal.SIGTERM)
            webhooks.wait(timeout=30)
