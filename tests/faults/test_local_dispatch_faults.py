"""Fault test of the local dispatch path: a client wired to its in-process worker (as `durable
dev` wires its router) keeps calling while the other worker, a `durable worker` process, is
killed (-9) or paused (SIGSTOP). The in-process worker takes the lost partitions over and serves
them locally from then on; no acknowledged increment is lost and none is applied twice."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import pytest
from durable.client import Client, Env
from durable.core.config import AppConfig
from durable.core.errors import DurableError
from durable.core.settings import Settings
from durable.core.wire import partition_of

from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory, WorkerProcess
from tests.objects.test_output_gate import _stored_counters

pytestmark = pytest.mark.fault


@pytest.mark.parametrize("fault", ["kill", "pause"])
async def test_local_calls_keep_every_acknowledged_increment_when_the_other_worker_fails(
        fault: str, start_worker: WorkerFactory, worker_process: Callable[..., WorkerProcess],
        settings: Settings, config: AppConfig) -> None:
    local_worker = await start_worker()
    other = worker_process()
    await other.start()

    def shared() -> bool:
        return len(local_worker.parts) == settings.partitions // 2 and all(
            s.sub is not None and not s.closing for s in local_worker.parts.values())

    await assert_eventually(shared, 30, "half the partitions handed to the other worker")
    fast = settings.model_copy(update={"request_timeout": 2.0, "retry_deadline": 1.0})
    c = await Client.connect(fast, config)
    c.local = local_worker.local
    counters = [Env(c, config).COUNTERS.get_by_name(f"local-fault-{fault}-{i}") for i in range(32)]
    partitions = [partition_of(s.id.hex, settings.partitions) for s in counters]
    assert any(p not in local_worker.parts for p in partitions), "every counter on the local worker"
    attempted, acked = [0] * len(counters), [0] * len(counters)
    stop = asyncio.Event()

    async def drive(i: int) -> None:
        while not stop.is_set():
            attempted[i] += 1
            try:
                acked[i] = max(acked[i], await counters[i].increment())
            except DurableError:  # in flight on the failed worker: it may or may not have run
                await asyncio.sleep(0.05)

    drivers = [asyncio.create_task(drive(i)) for i in range(len(counters))]
    try:
        await assert_eventually(lambda: min(acked) >= 3, 20, "every counter incremented before the fault")
        taken = local_worker.local.taken
        if fault == "kill":
            other.kill(signal.SIGKILL)
        else:
            other.kill(signal.SIGSTOP)

        def all_local() -> bool:
            return len(local_worker.parts) == settings.partitions and all(
                s.sub is not None and not s.closing for s in local_worker.parts.values())

        await assert_eventually(all_local, 40, "the in-process worker owns every partition")
        marks = list(acked)
        await assert_eventually(lambda: all(a > m for a, m in zip(acked, marks, strict=True)), 20,
                                "every counter incremented after the take-over")
        assert local_worker.local.taken > taken
    finally:
        stop.set()
        await asyncio.gather(*drivers, return_exceptions=True)
        if fault == "pause":
            other.kill(signal.SIGCONT)  # it finds itself fenced and steps down
        await c.close()
    stored = await _stored_counters(settings, [s.id.hex for s in counters])
    for i, stub in enumerate(counters):
        value = stored.get(stub.id.hex, 0)
        assert acked[i] <= value <= attempted[i], (i, acked[i], value, attempted[i])
