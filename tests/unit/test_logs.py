"""Log levels mean something: error lines are for what needs a person, and a broker outage is two lines."""

from __future__ import annotations

import logging
import time

from aiokafka.errors import (
    GroupAuthorizationFailedError,
    GroupCoordinatorNotAvailableError,
    KafkaConnectionError,
    NotLeaderForPartitionError,
    SaslAuthenticationFailed,
)
from structlog.testing import capture_logs

from metering_pipeline.logs import KafkaRetries


def record(
    message: str, *args: object, level: int = logging.ERROR, logger: str = "aiokafka.consumer.group_coordinator"
) -> logging.LogRecord:
    return logging.LogRecord(logger, level, __file__, 1, message, args, None)


def test_a_retried_kafka_coordinator_error_is_one_warning_a_minute_and_a_final_one_an_error():
    retries = KafkaRetries()
    retried = record("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    assert retries.filter(retried) and retried.levelname == "WARNING"
    assert not retries.filter(record("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError()))
    for _ in range(2):  # never hushed
        final = record("Group Coordinator Request failed: %s", GroupAuthorizationFailedError())
        assert retries.filter(final) and final.levelname == "ERROR"
    refused = record(
        'Unable connect to "%s:%s": %s', "localhost", 9094, SaslAuthenticationFailed("bad password"), logger="aiokafka"
    )
    assert retries.filter(refused) and refused.levelname == "ERROR" and not retries.outages
    bug = record("Unexpected error in sender routine", logger="aiokafka.producer.sender")
    assert retries.filter(bug) and bug.levelname == "ERROR"


def test_an_unreachable_broker_is_one_warning_when_it_goes_and_one_when_it_is_back():
    retries = KafkaRetries(quiet=0.2)
    outage = [
        record("Unable connect to node with id %s: %s", 1, OSError(111, "Connect call failed"), logger="aiokafka"),
        record("Unable to update metadata from %s", [1], logger="aiokafka"),
        record(
            "Failed fetch messages from %s: %s", 1, KafkaConnectionError("closed"), logger="aiokafka.consumer.fetcher"
        ),
        record("Heartbeat session expired - marking coordinator dead"),
        record("Marking the coordinator dead (node %s)for group %s.", 1, "g", level=logging.WARNING),
    ]
    with capture_logs() as said:
        assert [retries.filter(r) for r in outage * 100] == [False] * 500
        assert [(e["event"], e.get("broker")) for e in said] == [
            ("Kafka broker unreachable; its clients retry until it is back", "node 1"),
            ("Kafka unreachable: no broker answers; its clients retry until it is back", None),
        ]
        assert "Connect call failed" in said[0]["error"]
        time.sleep(0.3)
        retries.notice_recovery()
        retries.notice_recovery()
    back = {e.get("broker"): e for e in said[2:]}
    assert {(e["event"], broker) for broker, e in back.items()} == {
        ("Kafka broker reachable again", "node 1"),
        ("Kafka reachable again", None),
    }
    assert back["node 1"]["retries_not_logged"] + back[None]["retries_not_logged"] == 500
    assert all(e["log_level"] == "warning" and 0 <= e["unreachable_seconds"] < 1 for e in back.values())
    # After recovery, a retried error is a warning again (rate-limited as before the outage).
    moved = record(
        "Heartbeat failed for group %s: coordinator (node %s) is either not started or not valid",
        "g",
        1,
        level=logging.WARNING,
    )
    assert retries.filter(moved)


def test_one_broker_of_a_cluster_down_is_named_and_the_others_taking_over_are_told():
    retries = KafkaRetries(quiet=0.2)
    down = [
        record("Unable connect to node with id %s: %s", 2, OSError(111, "Connect call failed"), logger="aiokafka"),
        record("Unable to request metadata from node with id %s: %r", 2, KafkaConnectionError("x"), logger="aiokafka"),
        record("Marking the coordinator dead (node %s)for group %s.", 2, "g", level=logging.WARNING),
    ]
    leader_moved = record(
        "Got error produce response: %s", NotLeaderForPartitionError(), logger="aiokafka.producer.sender"
    )
    with capture_logs() as said:
        assert [retries.filter(r) for r in down * 50] == [False] * 150
        assert retries.filter(leader_moved) and leader_moved.levelname == "WARNING"  # told, at most once a minute
        assert not retries.filter(leader_moved)
        time.sleep(0.3)
        retries.notice_recovery()
    assert [(e["event"], e.get("broker")) for e in said] == [
        ("Kafka broker unreachable; its clients retry until it is back", "node 2"),
        ("Kafka broker reachable again", "node 2"),
    ]
    assert said[1]["retries_not_logged"] == 150
    by_address = record('Unable connect to "%s:%s": %s', "kafka-3", 9092, OSError(111, "refused"), logger="aiokafka")
    with capture_logs() as said:
        assert not retries.filter(by_address)
    assert [(e["event"], e["broker"]) for e in said] == [
        ("Kafka broker unreachable; its clients retry until it is back", "kafka-3:9092")
    ]
