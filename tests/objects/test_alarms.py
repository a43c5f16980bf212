"""Alarms with Cloudflare's rules, on a real nats-server (JetStream schedules) and Postgres."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from durable.client import Env
from durable.core.errors import RemoteError
from durable.core.settings import Settings
from durable.objects import Worker
from durable.objects.alarm_rules import RETRY_JITTER, alarm_time_ms, at_header, retry_delay

from tests.helpers.waiting import assert_eventually, assert_stays
from tests.helpers.workers import WorkerFactory


def now_ms() -> int:
    return int(time.time() * 1000)


async def runs_of(stub: Any, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Wait until the object has recorded ``count`` alarm runs; returns them."""
    runs: list[dict[str, Any]] = []

    async def enough() -> bool:
        nonlocal runs
        runs = await stub.runs()
        return len(runs) >= count

    await assert_eventually(enough, timeout=timeout)
    return runs


async def alarm_row(settings: Settings, object_id: str) -> Any:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetchrow("SELECT * FROM do_alarms WHERE object_id = $1", object_id)
    finally:
        await conn.close()


async def test_an_alarm_fires_once_at_its_time_and_is_then_cleared(worker: Worker, env: Env) -> None:
    a = env.ALARMERS.get_by_name("fires")
    when = await a.arm(600)
    assert await a.get_alarm() == when
    runs = await runs_of(a, 1)
    assert runs[0]["scheduled"] == when and runs[0]["retry"] == 0 and runs[0]["is_retry"] is False
    assert runs[0]["at"] >= when
    assert runs[0]["inside"] is None  # get_alarm() inside the running handler
    assert await a.get_alarm() is None
    await _stays(a, 1, 1.0)


async def test_a_new_alarm_replaces_the_old_one(worker: Worker, env: Env) -> None:
    a = env.ALARMERS.get_by_name("replace")
    await a.arm(400)
    later = await a.arm(1200)
    assert await a.get_alarm() == later
    runs = await runs_of(a, 1)
    assert [r["scheduled"] for r in runs] == [later]
    await _stays(a, 1, 1.0)


async def test_moving_an_alarm_earlier_fires_at_the_earlier_time(worker: Worker, env: Env) -> None:
    a = env.ALARMERS.get_by_name("earlier")
    await a.arm(60_000)
    sooner = await a.arm(300)
    runs = await runs_of(a, 1)
    assert runs[0]["scheduled"] == sooner


async def test_a_time_in_the_past_fires_promptly(worker: Worker, env: Env) -> None:
    a = env.ALARMERS.get_by_name("past")
    before = now_ms()
    await a.arm_at(1000)  # 1970
    runs = await runs_of(a, 1, timeout=5)
    assert runs[0]["scheduled"] >= before  # clamped to now, like Cloudflare
    assert runs[0]["at"] - before < 3000


async def test_datetimes_are_accepted_and_naive_ones_refused(worker: Worker, env: Env) -> None:
    a = env.ALARMERS.get_by_name("datetime")
    when = datetime.now(UTC) + timedelta(seconds=30)
    await a.arm_at(when)
    assert await a.get_alarm() == int(when.timestamp() * 1000)
    with pytest.raises(RemoteError) as err:
        await a.arm_at(datetime.now() + timedelta(seconds=30))  # noqa: DTZ005 - the point of the test
    assert err.value.remote_type == "TypeError" and "timezone-aware" in str(err.value)


@pytest.mark.parametrize("when", [0, -5, "soon", None, True])
async def test_bad_alarm_times_are_errors(worker: Worker, env: Env, when: Any) -> None:
    a = env.ALARMERS.get_by_name(f"bad-{when}")
    with pytest.raises(RemoteError) as err:
        await a.arm_at(when)
    assert err.value.remote_type == "TypeError"
    if when in (0, -5):
        assert "alarm time <= 0" in str(err.value)
    assert await a.get_alarm() is None


async def test_set_alarm_on_a_class_without_an_alarm_handler_is_an_error(worker: Worker, env: Env) -> None:
    probe = env.PROBES.get_by_name("no-alarm-handler")
    with pytest.raises(RemoteError) as err:
        await probe.storage("set_alarm", now_ms() + 1000)
    assert err.value.remote_type == "TypeError" and "alarm() handler" in str(err.value)


async def test_delete_alarm_cancels_it(worker: Worker, env: Env) -> None:
    a = env.ALARMERS.get_by_name("delete")
    await a.arm(500)
    await a.delete_alarm()
    assert await a.get_alarm() is None
    await _stays(a, 0, 1.5)


async def test_delete_all_removes_the_alarm(worker: Worker, env: Env, settings: Settings) -> None:
    a = env.ALARMERS.get_by_name("delete-all")
    await a.arm(800)
    await a.wipe()
    assert await a.get_alarm() is None
    assert await alarm_row(settings, a.id.hex) is None
    await _stays(a, 0, 1.5)


async def test_the_alarm_is_written_with_the_event_and_behind_the_output_gate(
        worker: Worker, env: Env, settings: Settings) -> None:
    a = env.ALARMERS.get_by_name("gate")
    await a.put_and_arm("k", "v", 60_000)
    # the reply came after the commit: both writes are in Postgres already
    row = await alarm_row(settings, a.id.hex)
    assert row is not None and row["scheduled_ms"] > now_ms() + 50_000
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM do_storage WHERE object_id = $1", a.id.hex) == 1
    finally:
        await conn.close()


async def test_an_alarm_set_in_a_transaction_that_rolls_back_never_fires(worker: Worker, env: Env) -> None:
    for mode in ("rollback", "raise"):
        a = env.ALARMERS.get_by_name(f"txn-{mode}")
        await a.arm_in_txn(200, mode)
        assert await a.get_alarm() is None
        assert await a.get("txn") is None
    committed = env.ALARMERS.get_by_name("txn-commit")
    await committed.arm_in_txn(200, "commit")
    await runs_of(committed, 1)
    assert await committed.get("txn") == "commit"
    for mode in ("rollback", "raise"):
        await _stays(env.ALARMERS.get_by_name(f"txn-{mode}"), 0, 0.5)


async def test_a_failing_alarm_is_retried_with_growing_delays(worker: Worker, env: Env) -> None:
    a = env.ALARMERS.get_by_name("retry")
    await a.plan({"fail_times": 2})
    when = await a.arm(100)
    runs = await runs_of(a, 3, timeout=20)
    assert [r["retry"] for r in runs] == [0, 1, 2]
    assert [r["is_retry"] for r in runs] == [False, True, True]
    assert all(r["scheduled"] == when for r in runs)
    gaps = [runs[i + 1]["at"] - runs[i]["at"] for i in range(2)]
    assert 2000 <= gaps[0] <= 2500 + 500 and 4000 <= gaps[1] <= 5000 + 500, gaps
    assert await a.get_alarm() is None
    await _stays(a, 3, 1.0)


async def test_a_failing_alarm_is_abandoned_after_six_retries(start_worker: WorkerFactory, env: Env) -> None:
    await start_worker(alarm_retry_base=0.05)
    a = env.ALARMERS.get_by_name("abandon")
    await a.plan({"fail_times": 100})
    await a.arm(50)
    runs = await runs_of(a, 7, timeout=20)
    assert [r["retry"] for r in runs] == [0, 1, 2, 3, 4, 5, 6]
    await _stays(a, 7, 2.0)
    assert await a.get_alarm() is None


async def test_an_alarm_set_by_a_failing_handler_runs_instead_of_a_retry(
        start_worker: WorkerFactory, env: Env) -> None:
    await start_worker(alarm_retry_base=5.0)
    a = env.ALARMERS.get_by_name("rearm-then-fail")
    await a.plan({"fail_times": 1, "rearm_ms": 300})
    await a.arm(50)
    runs = await runs_of(a, 2, timeout=10)
    assert [r["retry"] for r in runs] == [0, 0]
    assert runs[1]["at"] - runs[0]["at"] < 3000  # the new alarm, not a retry after ~5 s
    assert runs[0]["inside"] is None


async def test_an_alarm_set_by_a_successful_handler_stays(worker: Worker, env: Env) -> None:
    a = env.ALARMERS.get_by_name("rearm")
    await a.plan({"rearm_ms": 300, "rearm_times": 2})
    await a.arm(50)
    runs = await runs_of(a, 3, timeout=10)
    assert [r["retry"] for r in runs] == [0, 0, 0]
    await _stays(a, 3, 1.0)
    assert await a.get_alarm() is None


async def test_delete_alarm_inside_a_failing_handler_prevents_the_retry(
        start_worker: WorkerFactory, env: Env) -> None:
    await start_worker(alarm_retry_base=0.1)
    a = env.ALARMERS.get_by_name("delete-inside")
    await a.plan({"fail_times": 5, "delete_inside": True})
    await a.arm(50)
    await runs_of(a, 1)
    await _stays(a, 1, 1.5)
    assert await a.get_alarm() is None


async def _stays(stub: Any, count: int, seconds: float) -> None:
    """The object's run count stays ``count`` for ``seconds`` (no late or duplicate run)."""
    async def runs_are_count() -> bool:
        return len(await stub.runs()) == count

    await assert_stays(runs_are_count, seconds, message=f"{count} alarm runs")


async def test_a_stale_or_duplicate_wake_up_is_acknowledged_and_ignored(worker: Worker, env: Env,
                                                                        settings: Settings) -> None:
    """Wake-ups published by hand on the fire subject: a wrong generation runs nothing, the right
    one runs the alarm, a duplicate of it runs nothing again; every one is acknowledged."""
    from durable.core import codec
    from durable.objects.alarm_stream import AlarmStream

    a = env.ALARMERS.get_by_name("stale-fire")
    await a.arm(120_000)
    row = await alarm_row(settings, a.id.hex)
    stream = AlarmStream(worker.nc, settings)
    subject = stream.subjects.fire(row["partition"], a.id.hex)
    js = worker.nc.jetstream()

    async def fire(generation: int) -> None:
        await js.publish(subject, codec.dumps({"ns": "Alarmer", "gen": generation}, False))

    async def drained() -> bool:
        info = await js.stream_info(stream.name, subjects_filter=subject)
        return not (info.state.subjects or {}).get(subject)

    await fire(row["generation"] + 1)
    await assert_eventually(drained, timeout=10)
    assert await a.runs() == [] and await a.get_alarm() == row["scheduled_ms"]
    await fire(row["generation"])
    runs = await runs_of(a, 1)
    assert runs[0]["scheduled"] == row["scheduled_ms"]
    await assert_eventually(drained, timeout=10)
    await fire(row["generation"])
    await assert_eventually(drained, timeout=10)
    await _stays(a, 1, 0.5)
    assert await a.get_alarm() is None


@pytest.mark.parametrize(("version", "jetstream", "expect"), [
    ("2.15.1", True, None),
    ("2.12.0", True, None),
    ("3.0.0-beta.1", True, None),
    ("2.11.9", True, "need nats-server 2.12 or later"),
    ("2.10.24", False, "need nats-server 2.12 or later"),
    ("2.15.1", False, "runs without JetStream"),
    ("weird", True, "not a version number"),
    ("2", True, "not a version number"),
    ("", True, "not a version number"),
    ("2.12.0-RC.3", True, None),
    ("2.12.0-RC.3", False, "runs without JetStream"),
])
def test_the_start_up_check_names_the_version_found(version: str, jetstream: bool, expect: str | None) -> None:
    from durable.objects.alarm_rules import schedule_support_problem

    problem = schedule_support_problem(version, jetstream)
    if expect is None:
        assert problem is None
    else:
        assert problem is not None and expect in problem and version in problem


# ----- retry delays, alarm times and schedule headers, without a worker -------------------------


@pytest.mark.parametrize("retry", range(12))
def test_retry_delays_double_up_to_a_cap_with_at_most_a_quarter_of_jitter(retry: int) -> None:
    expected = 0.5 * 2 ** min(retry, 9)
    delays = [retry_delay(retry, 0.5) for _ in range(200)]
    assert all(expected <= d <= expected * (1 + RETRY_JITTER) for d in delays), (min(delays), max(delays))
    assert len(set(delays)) > 1  # jittered, so retries of many objects do not line up


@pytest.mark.parametrize(("ms", "header"), [
    (1, "@at 1970-01-01T00:00:00.001Z"),
    (1_700_000_000_123, "@at 2023-11-14T22:13:20.123Z"),
    (1_700_000_000_000, "@at 2023-11-14T22:13:20.000Z"),
    (4_102_444_799_999, "@at 2099-12-31T23:59:59.999Z"),
])
def test_the_schedule_header_is_rfc3339_utc_with_milliseconds(ms: int, header: str) -> None:
    assert at_header(ms) == header


def test_alarm_times_are_epoch_ms_or_aware_datetimes() -> None:
    assert alarm_time_ms(1_700_000_000_123) == 1_700_000_000_123
    assert alarm_time_ms(1_700_000_000_123.9) == 1_700_000_000_123
    at = datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert alarm_time_ms(at) == 1_700_000_000_123
    assert alarm_time_ms(at.astimezone(timezone(timedelta(hours=-5)))) == 1_700_000_000_123


@pytest.mark.parametrize(("when", "message"), [
    (datetime(2030, 1, 1), "timezone-aware"),
    (0, "<= 0"), (-5, "<= 0"), (0.4, "<= 0"),
    (float("nan"), "finite"), (float("inf"), "finite"), (float("-inf"), "finite"),
    (True, "not bool"), ("soon", "not str"), (None, "not NoneType"),
])
def test_bad_alarm_times_are_refused_with_the_reason(when: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        alarm_time_ms(when)
