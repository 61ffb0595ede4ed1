"""`metering api` through the real broker, worker and ClickHouse endpoint: every endpoint, auth,
validation, idempotency, org scoping, streamed exports, and schemathesis fuzzing for 5xx."""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from support import FIXED_SEED, running_api

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(module_pipeline, tmp_path_factory):
    settings, new_worker = module_pipeline
    worker = new_worker().start()
    worker.wait_healthy()
    with running_api(settings, tmp_path_factory.mktemp("api"), {"METERING_API_MAX_BATCH_RECORDS": "50"}) as started:
        yield started


def define(client: httpx.Client, key: str, aggregation: str = "SUM", **extra) -> httpx.Response:
    return client.post("/v1/metrics", json={"key": key, "name": key, "aggregationType": aggregation, **extra})


def monthly_total(client: httpx.Client, metric: str, subject: str, expected_count: int, timeout: float = 60) -> tuple[Decimal, int]:
    subject_type, subject_id = subject.split(":")
    params = {"metricKey": metric, "subjectType": subject_type, "subjectId": subject_id, "periodType": "MONTHLY",
              "periodStart": datetime.now(timezone.utc).isoformat()}
    deadline = time.monotonic() + timeout
    while True:
        [summary] = client.get("/v1/usage/summary", params=params).json()["summaries"]
        if summary["recordCount"] >= expected_count or time.monotonic() > deadline:
            return Decimal(summary["totalQuantity"]), summary["recordCount"]
        time.sleep(0.3)


def test_requests_without_a_valid_key_or_scope_are_refused(api):
    anonymous = api.client(None)
    assert anonymous.get("/v1/metrics").status_code == 401
    assert anonymous.get("/v1/metrics", headers={"Authorization": "Bearer mk_not-a-key"}).json()["error"] == "unauthenticated"
    refused = define(api.client("reader"), "reader_metric")
    assert (refused.status_code, refused.json()["error"]) == (403, "forbidden_scope")
    assert api.client("reader").get("/v1/metrics").status_code == 200


def test_metric_commands_and_queries(api):
    admin, org1 = api.client(), api.client("org1")
    created = define(admin, "api_calls", "count", resetPeriod="monthly", unit="calls")
    assert created.status_code == 201
    assert created.json() == {"id": "api_calls", "key": "api_calls", "name": "api_calls", "description": "", "unit": "calls",
                              "aggregationType": "COUNT", "resetPeriod": "MONTHLY", "orgId": None,
                              "valueProperty": None, "groupBy": {}, "filter": {}}
    assert define(admin, "api_calls").status_code == 409
    invalid = define(admin, "bad", "median")
    assert invalid.status_code == 422
    assert [e["field"] for e in invalid.json()["errors"]] == ["body.aggregationType"]

    assert admin.put("/v1/metrics/api_calls", json={"name": "API calls"}).json()["name"] == "API calls"
    assert admin.get("/v1/metrics/api_calls").json()["name"] == "API calls"
    assert admin.put("/v1/metrics/nope", json={"name": "x"}).status_code == 404

    # An org key defines its org's metrics only, and sees them beside the global ones.
    scoped = define(org1, "api_calls", "SUM")
    assert (scoped.status_code, scoped.json()["id"], scoped.json()["orgId"]) == (201, "org-1:api_calls", "org-1")
    assert define(org1, "x", orgId="org-2").json()["error"] == "forbidden_org"
    assert org1.get("/v1/metrics/api_calls").json()["aggregationType"] == "SUM"
    assert admin.get("/v1/metrics/api_calls").json()["aggregationType"] == "COUNT"
    assert {m["id"] for m in org1.get("/v1/metrics").json()["metrics"]} >= {"api_calls", "org-1:api_calls"}
    assert org1.delete("/v1/metrics/api_calls").status_code == 204
    assert org1.get("/v1/metrics/api_calls").json()["aggregationType"] == "COUNT"  # the global one again

    assert define(admin, "temp").status_code == 201
    assert admin.delete("/v1/metrics/temp").status_code == 204
    assert admin.get("/v1/metrics/temp").status_code == 404


def test_usage_is_recorded_exactly_once_through_retries_and_read_back(api):
    admin = api.client()
    assert define(admin, "tokens", "SUM").status_code == 201
    now = datetime.now(timezone.utc)
    # A JSON number with 38 significant digits keeps every one of them.
    raw = ('{"id": "big-1", "metricKey": "tokens", "subjectType": "org", "subjectId": "acme", '
           '"quantity": 12345678901234567890.123456789012345678}')
    for _ in range(2):  # a client retry: same id, counted once
        accepted = admin.post("/v1/usage", content=raw, headers={"Content-Type": "application/json"})
        assert accepted.status_code == 202 and accepted.json()["records"][0]["quantity"] == "12345678901234567890.123456789012345678"
    batch = {"records": [{"metricKey": "tokens", "subjectType": "org", "subjectId": "acme", "quantity": "0.5",
                          "timestamp": (now - timedelta(minutes=n)).isoformat()} for n in range(5)]}
    for _ in range(2):  # retried with the same Idempotency-Key: the derived ids make it count once
        accepted = admin.post("/v1/usage/batch", json=batch, headers={"Idempotency-Key": "req-42"})
        assert accepted.status_code == 202
        assert [r["id"] for r in accepted.json()["records"]] == [f"req-42:{n}" for n in range(5)]
    assert monthly_total(admin, "tokens", "org:acme", 6) == (Decimal("12345678901234567892.623456789012345678"), 6)

    # usage.get pages through the raw records in (timestamp, id) order.
    seen, cursor = [], None
    while True:
        page = admin.get("/v1/usage", params={"subjectType": "org", "subjectId": "acme", "limit": 4,
                                              **({"cursor": cursor} if cursor else {})}).json()
        seen += [r["id"] for r in page["records"]]
        if not (cursor := page["nextCursor"]):
            break
    assert sorted(seen) == sorted(["big-1", *(f"req-42:{n}" for n in range(5))]) and len(seen) == 6
    assert admin.get("/v1/usage", params={"subjectType": "org", "subjectId": "acme", "cursor": "garbage"}).status_code == 400

    exported = admin.get("/v1/usage/export", params={"format": "csv", "subjectType": "org", "subjectId": "acme"})
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert sorted(Decimal(r["quantity"]) for r in rows) == sorted([Decimal("0.5")] * 5 + [Decimal("12345678901234567890.123456789012345678")])
    lines = admin.get("/v1/usage/export", params={"format": "jsonl", "metricKey": "tokens"}).text.splitlines()
    assert {json.loads(line)["id"] for line in lines} == set(seen)
    parquet = admin.get("/v1/usage/export", params={"format": "parquet", "metricKey": "tokens"})
    assert parquet.content[:4] == b"PAR1" and parquet.content[-4:] == b"PAR1"


def test_invalid_usage_is_refused_whole_with_field_level_errors(api):
    admin = api.client()
    assert define(admin, "calls", "COUNT").status_code == 201
    good = {"metricKey": "calls", "subjectType": "org", "subjectId": "refusals"}
    cases = {
        "unknown metric": ({"records": [good, {**good, "metricKey": "nope"}]}, 422, "body.records.1"),
        "NaN quantity": ({"records": [{**good, "quantity": "NaN"}]}, 422, "body.records.0.quantity"),
        "bad timestamp": ({"records": [{**good, "timestamp": "yesterday"}]}, 422, "body.records.0.timestamp"),
        "too late": ({"records": [{**good, "timestamp": "2001-01-01T00:00:00Z"}]}, 422, "body.records.0"),
        "bad enum-free type": ({"records": [{**good, "subjectId": 5}]}, 422, "body.records.0.subjectId"),
        "too many": ({"records": [good] * 51}, 413, None),
    }
    for name, (body, status, field) in cases.items():
        response = admin.post("/v1/usage/batch", json=body)
        assert response.status_code == status, (name, response.text)
        if field:
            assert field in [e["field"] for e in response.json()["errors"]], (name, response.json())
    assert admin.post("/v1/usage", content=b'{"metricKey": "calls", "quantity": Infinity}',
                      headers={"Content-Type": "application/json"}).status_code == 422
    time.sleep(3)  # nothing from the refused requests was published, not even the valid first record
    assert monthly_total(admin, "calls", "org:refusals", 0, timeout=0) == (Decimal(0), 0)


def test_usage_its_metric_cannot_read_is_refused_at_once_naming_the_path(api):
    admin = api.client()
    assert define(admin, "model_tokens", "SUM", valueProperty="$.metadata.usage.tokens",
                  groupBy={"model": "$.metadata.model"}, filter={"$.metadata.env": ["prod"]}).status_code == 201
    good = {"metricKey": "model_tokens", "subjectType": "org", "subjectId": "payloads",
            "metadata": {"env": "prod", "model": "a", "usage": {"tokens": "2.5"}}}
    cases = {
        "no tokens": ({**good, "metadata": {"env": "prod", "model": "a"}}, "$.metadata.usage.tokens"),
        "tokens not a number": ({**good, "metadata": {"env": "prod", "usage": {"tokens": "many"}}}, "$.metadata.usage.tokens"),
        "model an object": ({**good, "metadata": {"env": "prod", "model": {"x": 1}, "usage": {"tokens": 1}}}, "$.metadata.model"),
    }
    for name, (record, path) in cases.items():
        response = admin.post("/v1/usage/batch", json={"records": [good, record]})
        assert response.status_code == 422, (name, response.text)
        [error] = response.json()["errors"]
        assert error["field"] == "body.records.1" and "invalid_record" in error["message"] and path in error["message"], name
    # A record the filter leaves out is valid: accepted, and not counted.
    assert admin.post("/v1/usage", json={**good, "id": "staging", "metadata": {"env": "staging"}}).status_code == 202
    assert admin.post("/v1/usage", json={**good, "id": "counted"}).status_code == 202
    assert monthly_total(admin, "model_tokens", "org:payloads", 1) == (Decimal("2.5"), 1)


def test_an_org_key_sees_and_changes_only_its_org(api):
    admin, org1 = api.client(), api.client("org1")
    assert define(admin, "seats", "MAX").status_code == 201
    refused = org1.post("/v1/usage", json={"metricKey": "seats", "subjectType": "org", "subjectId": "org-2", "quantity": 3})
    assert (refused.status_code, refused.json()["error"]) == (403, "forbidden_org")
    stamped = org1.post("/v1/usage", json={"id": "u-1", "metricKey": "seats", "subjectType": "user", "subjectId": "u1", "quantity": 3})
    assert stamped.json()["records"][0]["metadata"] == {"orgId": "org-1"}
    assert org1.post("/v1/usage", json={"id": "u-2", "metricKey": "seats", "subjectType": "user", "subjectId": "u2",
                                        "quantity": 9, "metadata": {"orgId": "org-2"}}).status_code == 403
    assert admin.post("/v1/usage", json={"id": "u-3", "metricKey": "seats", "subjectType": "user", "subjectId": "u3",
                                         "quantity": 9, "metadata": {"orgId": "org-2"}}).status_code == 202
    assert monthly_total(admin, "seats", "user:u1", 1) == (Decimal(3), 1)
    assert monthly_total(admin, "seats", "user:u3", 1) == (Decimal(9), 1)
    assert org1.get("/v1/usage", params={"subjectType": "user", "subjectId": "u1"}).json()["records"][0]["id"] == "u-1"
    assert org1.get("/v1/usage", params={"subjectType": "user", "subjectId": "u3"}).json()["records"] == []
    assert org1.get("/v1/usage/summary", params={"metricKey": "seats", "subjectType": "user", "subjectId": "u3"}).json()["summaries"] == []
    exported = org1.get("/v1/usage/export", params={"format": "jsonl", "metricKey": "seats"}).text.splitlines()
    assert [json.loads(line)["id"] for line in exported] == ["u-1"]

    assert org1.post("/v1/thresholds", json={"metricKey": "seats", "subjectType": "user", "subjectId": "*",
                                             "threshold": 5}).status_code == 403
    mine = org1.post("/v1/thresholds", json={"metricKey": "seats", "subjectType": "user", "subjectId": "u1", "threshold": 5})
    assert (mine.status_code, mine.json()["orgId"]) == (201, "org-1")
    theirs = admin.post("/v1/thresholds", json={"id": "admin-t", "metricKey": "seats", "subjectType": "user",
                                                "subjectId": "u3", "threshold": 5})
    assert theirs.status_code == 201
    assert [t["id"] for t in org1.get("/v1/thresholds").json()["thresholds"]] == [mine.json()["id"]]
    assert org1.delete("/v1/thresholds/admin-t").status_code == 404


def test_threshold_commands_and_list(api):
    admin = api.client()
    assert define(admin, "storage", "MAX").status_code == 201
    assert admin.post("/v1/thresholds", json={"metricKey": "nope", "subjectType": "org", "subjectId": "o",
                                              "threshold": 1}).status_code == 422
    created = admin.post("/v1/thresholds", json={"id": "s1", "metricKey": "storage", "subjectType": "org", "subjectId": "*",
                                                 "threshold": "100.5", "action": "block", "notifyEmails": ["ops@example.com"]})
    assert created.status_code == 201 and created.json()["action"] == "BLOCK" and created.json()["threshold"] == "100.5"
    assert admin.post("/v1/thresholds", json={"id": "s1", "metricKey": "storage", "subjectType": "org", "subjectId": "o",
                                              "threshold": 1}).status_code == 409
    updated = admin.put("/v1/thresholds/s1", json={"threshold": 200, "notifyEmails": []})
    assert (updated.json()["threshold"], updated.json()["notifyEmails"], updated.json()["action"]) == ("200", [], "BLOCK")
    listed = admin.get("/v1/thresholds", params={"metricKey": "storage", "subjectType": "org", "subjectId": "anyone"}).json()
    assert [t["id"] for t in listed["thresholds"]] == ["s1"]
    assert admin.delete("/v1/thresholds/s1").status_code == 204
    assert admin.put("/v1/thresholds/s1", json={"threshold": 1}).status_code == 404


def test_fuzzing_every_operation_against_the_openapi_schema_finds_no_server_error(api):
    """schemathesis generates requests from /openapi.json (valid and edge-case bodies, paths and
    queries) and sends them with a read-write key; no answer may be a 5xx."""
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    headers = {"Authorization": f"Bearer {api.keys['admin']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=40, deadline=None, database=None, derandomize=FIXED_SEED,
                            suppress_health_check=list(HealthCheck))
        def no_server_error(case) -> None:
            response = case.call(headers=headers)
            assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"

        no_server_error()
