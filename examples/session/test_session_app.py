"""The session app on real servers, through the shipped pytest plugin; the expiry alarm is run
with `durable_app.run_alarm` instead of waiting for it."""

from __future__ import annotations

import json

from durable.objects.patterns import session as session_module
from durable.testing import DurableApp


async def test_put_get_delete(durable_app: DurableApp) -> None:
    put = await durable_app.fetch("/session/s1?ttl=60", method="PUT", body=json.dumps({"user": "ada"}),
                                  headers={"content-type": "application/json"})
    assert put.status in (200, 201), put.body
    got = await durable_app.fetch("/session/s1")
    assert got.status == 200 and json.loads(got.body)["data"] == {"user": "ada"}
    assert (await durable_app.fetch("/session/s1", method="DELETE")).status in (200, 204)
    assert (await durable_app.fetch("/session/s1")).status == 404


async def test_the_alarm_expires_a_session_once_its_time_is_up(durable_app: DurableApp, env, monkeypatch) -> None:
    session = env.SESSIONS.get_by_name("short")
    await session.start({"cart": [1, 2]}, 60)
    assert await durable_app.run_alarm(session)  # early: the session is alive, the alarm re-arms itself
    assert (await durable_app.fetch("/session/short")).status == 200
    later = session_module._now_ms() + 61_000
    monkeypatch.setattr(session_module, "_now_ms", lambda: later)  # a minute on, without waiting for it
    assert await durable_app.run_alarm(session)
    assert (await durable_app.fetch("/session/short")).status == 404
    assert not await durable_app.run_alarm(session)  # deleted, alarm and all


async def test_due_alarms_run_on_demand(durable_app: DurableApp, env, monkeypatch) -> None:
    await env.SESSIONS.get_by_name("a").start({"n": 1}, 60)
    await env.SESSIONS.get_by_name("b").start({"n": 2}, 600)
    assert await durable_app.run_due_alarms() == 0  # nothing is due yet
    later = session_module._now_ms() + 61_000
    monkeypatch.setattr(session_module, "_now_ms", lambda: later)
    assert await durable_app.run_due_alarms(now_ms=later) == 1  # a's, not b's
    assert (await durable_app.fetch("/session/a")).status == 404
    assert (await durable_app.fetch("/session/b")).status == 200
