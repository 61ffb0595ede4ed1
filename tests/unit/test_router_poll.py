"""The router's poll size: records, not messages or bytes, bound what one poll holds in RAM."""

from __future__ import annotations

from metering_pipeline.worker.router_stage import ROUTER_POLL_RECORDS, PollSize


def test_a_poll_asks_for_as_many_messages_as_the_configured_most_until_it_has_seen_some():
    assert PollSize(20_000).messages == 20_000


def test_envelopes_of_many_records_make_the_next_poll_ask_for_fewer_messages():
    poll = PollSize(20_000)
    poll.observe(messages=400, records=400 * 500)
    assert poll.messages == ROUTER_POLL_RECORDS // 500
    assert poll.messages * 500 <= ROUTER_POLL_RECORDS


def test_single_record_messages_keep_the_configured_most_and_a_huge_envelope_still_gets_one_message():
    poll = PollSize(20_000)
    poll.observe(messages=100, records=100)
    assert poll.messages == 20_000
    poll.observe(messages=1, records=ROUTER_POLL_RECORDS * 3)
    assert poll.messages == 1


def test_an_empty_or_wholly_dead_lettered_poll_does_not_divide_by_zero():
    poll = PollSize(500)
    poll.observe(messages=10, records=0)
    assert poll.messages == 500
