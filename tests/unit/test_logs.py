"""Log levels mean something: error lines are for what needs a person."""

from __future__ import annotations

import logging

from aiokafka.errors import GroupAuthorizationFailedError, GroupCoordinatorNotAvailableError

from metering_pipeline.logs import RetriedIsWarning


def test_a_retried_kafka_coordinator_error_is_logged_as_a_warning_and_a_final_one_as_an_error():
    def level(error: Exception) -> str:
        record = logging.LogRecord("aiokafka.consumer.group_coordinator", logging.ERROR, __file__, 1,
                                   "Group Coordinator Request failed: %s", (error,), None)
        assert RetriedIsWarning().filter(record)
        return record.levelname

    assert level(GroupCoordinatorNotAvailableError()) == "WARNING"
    assert level(GroupAuthorizationFailedError()) == "ERROR"
