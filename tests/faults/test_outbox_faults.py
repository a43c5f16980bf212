"""Events under a real fault: the owner is killed (-9) after committing events and before
publishing them. Its publisher is held back (DURABLE_EVENTS_PUBLISH_DELAY), so the kill lands
exactly between commit and publish; and the first event is put on the stream beforehand with its
own message id, as an owner that published it and died before deleting its row would have.

What must hold: the worker that takes the partition over publishes every committed event, the
stream holds each exactly once (the repeat of the first is dropped by its id), in commit order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import asyncpg
import pytest
from durable.client import Env
from durable.core.settings import Settings
from nats.aio.client import Client as NatsClient

from tests.helpers import events
from tests.helpers.workers import WorkerProcess

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]

FAULTY = {"lease_ttl": 3.0, "heartbeat_interval": 0.5}


async def test_events_committed_by_a_killed_owner_reach_the_stream_exactly_once(
        worker_process: Callable[..., WorkerProcess], env: Env, settings: Settings, raw_nc: NatsClient) -> None:
    first = worker_process(events_publish_delay=3600.0, **FAULTY)
    await first.start()
    counter = env.COUNTERS.get_by_name(f"outbox-fault-{uuid.uuid4().hex[:10]}")
    subjects = f"evt.Counter.{counter.id.hex}.>"
    for expected in range(1, 6):
        assert await counter.increment() == expected  # each reply waited for its commit
    assert await events.outbox_rows(settings, counter.id.hex) == 5
    assert await events.count(raw_nc, settings, subjects) == 0

    # the owner "published" the first event and died before deleting its row
    conn = await asyncpg.connect(settings.database_url)
    try:
        row = await conn.fetchrow("SELECT subject, msg_id, seq, payload, headers FROM do_outbox "
                                  "WHERE object_id = $1 ORDER BY seq LIMIT 1", counter.id.hex)
    finally:
        await conn.close()
    assert row is not None and row["seq"] == 1
    await raw_nc.jetstream().publish(row["subject"], bytes(row["payload"]), headers={
        **json.loads(row["headers"] or "{}"), "Nats-Msg-Id": row["msg_id"], "Durable-Seq": "1"})

    second = worker_process(**FAULTY)
    await second.start()
    first.kill()  # SIGKILL: nothing of the first worker runs again

    await events.wait_drained(settings, timeout=60)
    got = await events.read_all(raw_nc, settings, subjects)
    assert [(e.seq, e.json()["value"]) for e in got] == [(n, n) for n in range(1, 6)]
    assert len({e.msg_id for e in got}) == 5
    assert await counter.increment() == 6  # the new owner serves the object, and publishes its events
    last = (await events.wait_for(raw_nc, settings, subjects, 6))[-1]
    assert (last.seq, last.json()["value"]) == (6, 6)
