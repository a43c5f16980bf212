"""Fault test: the output gate. A reply leaves the worker only after the writes made before it
are committed, so killing the worker (SIGKILL) the instant a reply arrives never loses an
acknowledged write."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import asyncpg
import pytest
from durable.client import Client, Env
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.errors import DurableError
from durable.core.settings import Settings

from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerProcess

pytestmark = pytest.mark.fault


async def _advisory_locks_held(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = $1 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            settings.deployment_key,
        ))
    finally:
        await conn.close()


async def _restart_after_kill(dead: WorkerProcess, make: Callable[..., WorkerProcess]) -> WorkerProcess:
    """Wait until Postgres noticed the dead worker (its locks are gone), then start another."""
    assert dead.proc is not None and dead.proc.returncode == -signal.SIGKILL

    async def released() -> bool:
        return await _advisory_locks_held(dead.settings) == 0

    await assert_eventually(released, 5, "the killed worker's partition locks were released")
    fresh = make()
    await fresh.start()
    return fresh


async def _stored_counters(settings: Settings, object_ids: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT object_id, value FROM do_storage WHERE object_id = ANY($1::text[]) "
                                "AND key = $2", object_ids, b"value")
    finally:
        await conn.close()
    return {r["object_id"]: codec.unpack(bytes(r["value"])) for r in rows}


async def test_acknowledged_increment_survives_kill_9_right_after_reply(
        worker_process: Callable[..., WorkerProcess], env: Env, settings: Settings) -> None:
    names = [f"gate-{i}" for i in range(3)]
    stubs = [env.COUNTERS.get_by_name(n) for n in names]
    acked = dict.fromkeys(names, 0)
    wp = worker_process()
    await wp.start()
    for rnd in range(5):
        name = names[rnd % len(names)]
        idx = names.index(name)
        value = await stubs[idx].increment(rnd + 1)
        os.kill(wp.pid, signal.SIGKILL)  # the very next thing after the reply arrived
        wp.kill()  # reap it
        assert value == acked[name] + rnd + 1
        acked[name] = value

        stored = await _stored_counters(settings, [s.id.hex for s in stubs])
        for n, s in zip(names, stubs, strict=True):
            assert stored.get(s.id.hex, 0) == acked[n], f"round {rnd}: {n} lost an acknowledged increment"
        wp = await _restart_after_kill(wp, worker_process)
        for n, s in zip(names, stubs, strict=True):
            assert await s.get() == acked[n], f"round {rnd}: {n} read back wrong after restart"


async def test_burst_then_kill_9_every_acknowledged_value_is_durable(
        worker_process: Callable[..., WorkerProcess], settings: Settings, config: AppConfig) -> None:
    """Many objects incremented concurrently; SIGKILL the moment the KILL_AT-th reply arrives,
    with other requests still in flight. For every object: acknowledged <= stored <= attempted.
    Every driver keeps going until the kill (a slow reply on a loaded machine does not end it),
    so the kill always comes; ``max_attempts`` only bounds a burst against a broken worker."""
    objects, max_attempts, kill_at = 40, 500, 600
    fast = settings.model_copy(update={"request_timeout": 2.0, "retry_deadline": 0.5})
    wp = worker_process()
    await wp.start()
    clients = await asyncio.gather(*(Client.connect(fast, config) for _ in range(4)))
    stubs = [Env(clients[i % len(clients)], config).COUNTERS.get_by_name(f"burst-{i}") for i in range(objects)]
    attempted = [0] * objects
    acked = [0] * objects
    replies = 0
    killed = asyncio.Event()

    async def drive(i: int) -> None:
        nonlocal replies
        while attempted[i] < max_attempts and not killed.is_set():
            attempted[i] += 1
            try:
                value = await stubs[i].increment()
            except DurableError:
                # in flight when the worker died, or (before the kill) a reply slower than the
                # timeout: either may or may not have been committed, which attempted[i] allows
                continue
            acked[i] = max(acked[i], value)
            replies += 1
            if replies == kill_at and not killed.is_set():
                os.kill(wp.pid, signal.SIGKILL)  # synchronously, before any other reply is handled
                killed.set()

    started = time.monotonic()
    try:
        await asyncio.gather(*(drive(i) for i in range(objects)))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert killed.is_set(), "the burst ended before the kill"
    wp.kill()
    lost_in_flight = sum(attempted) - sum(acked)
    assert lost_in_flight > 0, "no request was in flight at the kill: the test did not test anything"

    stored = await _stored_counters(settings, [s.id.hex for s in stubs])
    for i, s in enumerate(stubs):
        value = stored.get(s.id.hex, 0)
        assert acked[i] <= value <= attempted[i], f"object {i}: acked {acked[i]}, stored {value}, " \
                                                  f"attempted {attempted[i]}"

    await _restart_after_kill(wp, worker_process)
    async with await Client.connect(settings, config) as client:
        reader = Env(client, config).COUNTERS
        for i in range(objects):
            value = await reader.get_by_name(f"burst-{i}").get()
            assert value == stored.get(stubs[i].id.hex, 0)
    print(f"burst: {sum(acked)} acked, {lost_in_flight} in flight at kill, {time.monotonic() - started:.2f}s")
