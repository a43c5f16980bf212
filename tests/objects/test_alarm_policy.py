"""Cloudflare's alarm retry policy and time rules, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from durable.objects.alarm_rules import (
    MAX_RETRIES,
    AlarmRow,
    RunOutcome,
    after_failure,
    alarm_time_ms,
    at_header,
    new_alarm,
    retry_delay,
    schedule_support_problem,
)


def test_retries_double_from_the_base_with_at_most_a_quarter_of_jitter() -> None:
    assert [retry_delay(n, 2.0, jitter=0.0) for n in range(4)] == [2.0, 4.0, 8.0, 16.0]
    assert retry_delay(0, 2.0, jitter=1.0) == 2.5
    assert retry_delay(50, 1.0, jitter=0.0) == 512.0  # the exponent is capped
    for _ in range(100):
        assert 2.0 <= retry_delay(0, 2.0) <= 2.5


def test_a_failure_is_retried_then_abandoned_after_six_retries() -> None:
    row = AlarmRow(1000, 1000, 5, retry_count=0)
    decision = after_failure(row, touched=False, reset=False, retry_base=2.0, now=10_000, jitter=0.0)
    assert decision.action == "retry" and decision.delay == 2.0 and decision.row is not None
    assert decision.row.scheduled_ms == 1000 and decision.row.due_ms == 12_000 and decision.row.retry_count == 1
    assert decision.row.generation != row.generation  # an old fire of this alarm is stale now
    last = AlarmRow(1000, 1000, 5, retry_count=MAX_RETRIES)
    assert after_failure(last, False, False, 2.0, 0).action == "abandon"


def test_a_run_that_changed_its_alarm_or_reset_the_object_keeps_it() -> None:
    row = AlarmRow(1000, 1000, 5)
    assert after_failure(row, touched=True, reset=False, retry_base=2.0, now=0).action == "keep"
    assert after_failure(row, touched=False, reset=True, retry_base=2.0, now=0).action == "keep"


def test_alarm_times() -> None:
    assert alarm_time_ms(1500.9) == 1500
    assert alarm_time_ms(datetime(2026, 1, 1, tzinfo=UTC)) == 1767225600000
    for bad in (datetime(2026, 1, 1), float("nan"), float("inf"), True, "1", 0, -5):
        with pytest.raises(TypeError):
            alarm_time_ms(bad)
    past = new_alarm(1000, now=5000)
    assert past.scheduled_ms == past.due_ms == 5000  # a time in the past runs promptly
    assert at_header(1767225600123) == "@at 2026-01-01T00:00:00.123Z"


def test_server_support_for_schedules() -> None:
    assert schedule_support_problem("2.12.1", True) is None
    assert "2.12 or later" in (schedule_support_problem("2.11.9", True) or "")
    assert "without JetStream" in (schedule_support_problem("2.12.0", False) or "")
    assert "not a version number" in (schedule_support_problem("dev", True) or "")


def test_run_outcomes_travel_as_their_names() -> None:
    assert RunOutcome.BUSY == "busy" and f"{RunOutcome.RAN}" == "ran"
