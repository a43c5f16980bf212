"""Fault test: many concurrent clients on ONE Counter; the total is exact and survives a restart.

64 clients, each on its own NATS connection, call ``increment`` 50 times on the same object.
The input gate makes each read-modify-write atomic, so the result is exactly 3200; the output
gate makes every acknowledged increment durable, so a new worker reads 3200 after a restart.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest
from durable.client import Client, Env
from durable.core.config import AppConfig
from durable.core.settings import Settings
from durable.objects import Worker

from tests.helpers.workers import WorkerFactory, WorkerProcess

CLIENTS = 64
CALLS = 50
TOTAL = CLIENTS * CALLS


async def _hammer(settings: Settings, config: AppConfig, name: str) -> list[int]:
    """Run the 64 x 50 increments; returns every value the object replied with."""
    clients = await asyncio.gather(*(Client.connect(settings, config) for _ in range(CLIENTS)))
    try:
        async def one_client(client: Client) -> list[int]:
            stub = Env(client, config).COUNTERS.get_by_name(name)
            return [await stub.increment() for _ in range(CALLS)]

        results = await asyncio.gather(*(one_client(c) for c in clients))
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    replies = [v for r in results for v in r]
    # every increment saw a distinct value: no two read-modify-writes interleaved
    assert sorted(replies) == list(range(1, TOTAL + 1))
    for r in results:
        assert r == sorted(r), "one client's increments must be seen in its own order"
    return replies


async def test_64_clients_on_one_counter_in_process_worker(
        start_worker: WorkerFactory, settings: Settings, config: AppConfig, env: Env) -> None:
    worker: Worker = await start_worker()
    started = time.monotonic()
    await _hammer(settings, config, "hot-in-process")
    elapsed = time.monotonic() - started
    assert await env.COUNTERS.get_by_name("hot-in-process").get() == TOTAL
    assert worker.flusher.commits < TOTAL, "group commit should have coalesced some writes"

    await worker.stop()
    await start_worker()
    assert await env.COUNTERS.get_by_name("hot-in-process").get() == TOTAL
    print(f"{TOTAL} increments in {elapsed:.2f}s ({TOTAL / elapsed:.0f}/s)")


@pytest.mark.fault
async def test_64_clients_on_one_counter_subprocess_worker_sigterm_restart(
        worker_process: Callable[..., WorkerProcess], settings: Settings, config: AppConfig,
        env: Env) -> None:
    first = worker_process()
    await first.start()
    await _hammer(settings, config, "hot-subprocess")
    assert await env.COUNTERS.get_by_name("hot-subprocess").get() == TOTAL

    first.kill(signal.SIGTERM)  # graceful: drain, flush, unlock, exit
    assert first.proc is not None and first.proc.returncode == 0, first.log_path.read_text()[-3000:]

    second = worker_process()
    await second.start()
    assert await env.COUNTERS.get_by_name("hot-subprocess").get() == TOTAL
    assert await env.COUNTERS.get_by_name("hot-subprocess").increment() == TOTAL + 1
