"""The rules of alarms, without I/O: the stored row, times, retries and what a run decides.

Cloudflare's policy: one alarm per object; a handler that fails is retried with exponential
backoff (2 s base, doubling, up to 25 % jitter) at most six times, then abandoned; a run that
set or deleted the alarm itself is not retried (its own change wins).
"""

from __future__ import annotations

import enum
import random
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: Cloudflare: at most 6 retries of a failing alarm, then it is abandoned.
MAX_RETRIES = 6
#: Cloudflare adds up to 25 % of the delay as jitter.
RETRY_JITTER = 0.25
#: message schedules (ADR-51 ``@at``) arrived in nats-server 2.12
SCHEDULES_SINCE = (2, 12)


@dataclass(frozen=True, slots=True)
class AlarmRow:
    """One object's alarm as stored in ``do_alarms``."""

    scheduled_ms: int  #: the time the object set (what get_alarm() and info.scheduled_time report)
    due_ms: int  #: when it next runs: scheduled_ms, or the time of the next retry
    generation: int  #: names this set_alarm (or retry); a fire for another generation is stale
    retry_count: int = 0


class RunOutcome(enum.StrEnum):
    """What one alarm event did."""

    RAN = "ran"  #: the handler returned; the alarm is cleared (unless it set a new one)
    FAILED = "failed"  #: the handler raised; a retry (if any) is recorded
    ABANDONED = "abandoned"  #: the handler raised for the last time allowed; the alarm is deleted
    STALE = "stale"  #: the stored alarm is gone or has another generation: nothing ran
    BUSY = "busy"  #: this object's alarm handler is running already: look again shortly


def now_ms() -> int:
    return int(time.time() * 1000)


def new_generation() -> int:
    return secrets.randbits(62) + 1


def alarm_time_ms(when: Any) -> int:
    """Epoch milliseconds of a ``set_alarm`` argument: an aware datetime or a number of ms."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise TypeError("set_alarm() needs a timezone-aware datetime (e.g. datetime.now(UTC) + ...); "
                            "a naive one is ambiguous")
        ms = int(when.timestamp() * 1000)
    elif isinstance(when, int | float) and not isinstance(when, bool):
        if when != when or when in (float("inf"), float("-inf")):
            raise TypeError(f"set_alarm() needs a finite time, not {when!r}")
        ms = int(when)
    else:
        raise TypeError(f"set_alarm() takes a datetime or epoch milliseconds, not {type(when).__name__}")
    if ms <= 0:
        raise TypeError("set_alarm() cannot be called with an alarm time <= 0")
    return ms


def new_alarm(when: Any, now: int) -> AlarmRow:
    """The row of ``set_alarm(when)``: a time in the past runs promptly (it is due now)."""
    ms = max(alarm_time_ms(when), now)
    return AlarmRow(ms, ms, new_generation())


def retry_delay(retry_count: int, base: float, jitter: float | None = None) -> float:
    """Seconds before retry number ``retry_count + 1``: base * 2**n plus up to 25 % jitter
    (``jitter`` in [0, 1] picks the share of it; random when None)."""
    delay = base * (2 ** min(retry_count, 9))
    share: float = random.random() if jitter is None else jitter
    return float(delay * (1 + share * RETRY_JITTER))


@dataclass(frozen=True, slots=True)
class AfterFailure:
    """What to do with a failed run's alarm: ``row`` to store (None: delete), or leave it."""

    action: str  #: "retry" | "abandon" | "keep" (reset, or the run changed the alarm itself)
    row: AlarmRow | None = None
    delay: float = 0.0


def after_failure(row: AlarmRow, touched: bool, reset: bool, retry_base: float, now: int,
                  jitter: float | None = None) -> AfterFailure:
    """The policy for a handler that raised: a reset object keeps the alarm due; a run that set
    or deleted the alarm keeps its own change; otherwise retry, or abandon after MAX_RETRIES."""
    if reset or touched:
        return AfterFailure("keep")
    if row.retry_count >= MAX_RETRIES:
        return AfterFailure("abandon")
    delay = retry_delay(row.retry_count, retry_base, jitter)
    return AfterFailure("retry", AlarmRow(row.scheduled_ms, now + int(delay * 1000), new_generation(),
                                          row.retry_count + 1), delay)


def at_header(ms: int) -> str:
    """``Nats-Schedule`` value for a one-shot at ``ms``: RFC 3339, UTC, with milliseconds."""
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return "@at " + stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def schedule_support_problem(version: str, jetstream: bool) -> str | None:
    """Why a nats-server of ``version`` (with or without JetStream) cannot run alarms, or None."""
    try:
        major, minor = (int(part) for part in version.split("-")[0].split(".")[:2])
    except ValueError:
        return f"the NATS server reports version {version!r}, which is not a version number"
    if (major, minor) < SCHEDULES_SINCE:
        return (f"the NATS server is version {version}; durable's alarms need message schedules, which "
                f"need nats-server {SCHEDULES_SINCE[0]}.{SCHEDULES_SINCE[1]} or later")
    if not jetstream:
        return (f"the NATS server (version {version}) runs without JetStream; durable's alarms need it: "
                "start nats-server with -js (or a jetstream {} block in its config)")
    return None
