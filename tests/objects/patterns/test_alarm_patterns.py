"""The patterns built on alarms: Session (time to live) and RateLimiter (window clean-up)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from durable.client import Env
from durable.core.errors import RemoteError
from durable.core.settings import Settings
from durable.objects import Worker

from tests.helpers.waiting import assert_eventually


async def stored_rows(settings: Settings, object_id: str) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return int(await conn.fetchval(
            "SELECT (SELECT count(*) FROM do_storage WHERE object_id = $1)"
            " + (SELECT count(*) FROM do_alarms WHERE object_id = $1)", object_id))
    finally:
        await conn.close()


async def test_a_session_expires_by_its_alarm_and_leaves_nothing(worker: Worker, env: Env,
                                                                 settings: Settings) -> None:
    s = env.SESSIONS.get_by_name("expires")
    started = await s.start({"user": "ada"}, 0.8)
    assert (await s.get())["data"] == {"user": "ada"}
    assert started["expires_ms"] > time.time() * 1000

    async def gone() -> bool:
        return await stored_rows(settings, s.id.hex) == 0

    await assert_eventually(gone, timeout=8)
    assert await s.get() is None


async def test_using_a_session_renews_it(worker: Worker, env: Env, settings: Settings) -> None:
    s = env.SESSIONS.get_by_name("renewed")
    await s.start({"n": 1}, 1.0)
    for _ in range(6):  # 2.4 s of use, each well inside the ttl: the pace of a user, kept
        await asyncio.sleep(0.4)
        assert await s.get() is not None, "a session in use expired"

    async def expired() -> bool:  # read from Postgres: a get() would renew the session
        return await stored_rows(settings, s.id.hex) == 0

    await assert_eventually(expired, timeout=8, message="the unused session expires")
    assert await s.get() is None


async def test_ending_a_session_deletes_it_and_its_alarm(worker: Worker, env: Env, settings: Settings) -> None:
    s = env.SESSIONS.get_by_name("ended")
    await s.start({"n": 1}, 60)
    assert await s.end() is True
    assert await stored_rows(settings, s.id.hex) == 0
    assert await s.get() is None and await s.end() is False


@pytest.mark.parametrize("ttl", [0, -1, "1", 10**9])
async def test_a_session_refuses_a_bad_ttl(worker: Worker, env: Env, ttl: object) -> None:
    with pytest.raises(RemoteError):
        await env.SESSIONS.get_by_name("bad-ttl").start({}, ttl)


async def test_the_rate_limiter_window_is_cleaned_up_by_its_alarm(worker: Worker, env: Env,
                                                                  settings: Settings) -> None:
    limiter = env.QUICK_LIMITERS.get_by_name("203.0.113.9")
    for _ in range(10):  # four checks inside one 1-second window (a slow machine may cross one)
        # until early in a wall-clock second: the wait is computed, not polled
        await asyncio.sleep((1.0 - time.time() % 1.0) % 1.0 if time.time() % 1.0 > 0.2 else 0)
        verdicts = [await limiter.check() for _ in range(4)]
        if len({v["reset_ms"] for v in verdicts}) == 1:
            break
    assert [v["allowed"] for v in verdicts] == [True, True, True, False]
    assert await limiter.alarm_at() == verdicts[0]["reset_ms"]

    async def cleaned() -> bool:
        return await stored_rows(settings, limiter.id.hex) == 0

    await assert_eventually(cleaned, timeout=8)
    assert (await limiter.check())["allowed"] is True  # a fresh window
