"""A restore asked for with on_next_session_restore_bookmark() is durable: when the owner is
killed (kill -9) before the object restarts, the next owner applies it when it starts the object,
before the constructor runs, exactly once (the request is deleted in the restore's transaction)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import asyncpg
import pytest
from durable.client import Env
from durable.core.errors import ObjectReset
from durable.core.settings import Settings

from tests.helpers.workers import WorkerFactory, WorkerProcess

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]

FAULTY = {"lease_ttl": 3.0, "heartbeat_interval": 0.5}


async def pending_restores(settings: Settings, object_id: str) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM do_history_restores WHERE object_id = $1", object_id))
    finally:
        await conn.close()


async def test_a_restore_asked_for_before_the_owner_is_killed_happens_once_on_the_next_owner(
        worker_process: Callable[..., WorkerProcess], start_worker: WorkerFactory, env: Env,
        settings: Settings) -> None:
    doomed = worker_process(**FAULTY)
    await doomed.start()
    stub = env.JOURNALS.get_by_name("killed-before-restart")
    oid = env.JOURNALS.id_from_name("killed-before-restart").hex
    await stub.put({"a": 1, "b": 1})
    await asyncio.sleep(0.02)
    t = int(time.time() * 1000)
    await asyncio.sleep(0.02)
    await stub.put({"a": 2, "c": 2})
    await stub.delete(["b"])
    undo = await stub.request_restore(await stub.bookmark_for(t))  # no abort: the owner dies first
    assert await pending_restores(settings, oid) == 1
    assert await stub.dump() == {"a": 2, "c": 2}  # the live instance carries on until it restarts
    doomed.kill(signal.SIGKILL)

    await start_worker(**FAULTY)
    assert await stub.seen_at_start() == {"a": 1, "b": 1}  # the constructor saw the restored state
    assert await stub.dump() == {"a": 1, "b": 1}
    assert await pending_restores(settings, oid) == 0
    await stub.put({"d": 4})
    with pytest.raises(ObjectReset):
        await stub.abort()
    assert await stub.dump() == {"a": 1, "b": 1, "d": 4}  # not restored a second time
    # and the undo bookmark taken at the request brings back what the restore replaced
    with pytest.raises(ObjectReset):
        await stub.restore(undo)
    assert await stub.dump() == {"a": 2, "c": 2}
