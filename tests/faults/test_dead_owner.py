"""A caller learns of a dead owner sooner than its request timeout (client/owners.py): the next
owner announces the partition it took, and the caller ends its requests to that partition sent
before, which the killed owner will never answer: a RequestTimeout saying why (outcome unknown),
or, for a keyed call, a repeat at once that the next owner runs."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import pytest
from durable.client import Client, Env
from durable.core.config import AppConfig
from durable.core.errors import RequestTimeout
from durable.core.settings import Settings
from durable.core.wire import partition_of

from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory, WorkerProcess

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]

FAULTY = {"lease_ttl": 3.0, "heartbeat_interval": 0.5}


@pytest.mark.parametrize("keyed", [False, True])
async def test_a_request_in_flight_at_a_killed_owner_ends_when_its_partition_is_taken(
        worker_process: Callable[..., WorkerProcess], start_worker: WorkerFactory, settings: Settings,
        config: AppConfig, keyed: bool) -> None:
    doomed = worker_process(**FAULTY)
    await doomed.start()
    survivor = await start_worker(**FAULTY)
    await assert_eventually(lambda: len(survivor.parts) >= settings.partitions // 2 - 1, 30, "balanced")
    # the patient caller would wait 30 s for a reply the killed owner never sends
    patient = settings.model_copy(update={"request_timeout": 30.0, "retry_deadline": 30.0})
    async with await Client.connect(patient, config) as client:
        assert client.owners is not None
        env = Env(client, config)
        name = next(n for n in (f"dead-owner-{keyed}-{i}" for i in range(1000))
                    if partition_of(env.PROBES.id_from_name(n).hex, settings.partitions) not in survivor.parts)
        stub = env.PROBES.get_by_name(name)
        await stub.echo()  # live on the doomed worker
        if keyed:
            stub = stub.with_idempotency_key("once")
        call = asyncio.create_task(stub.slow_increment("k", 4000))
        await asyncio.sleep(1.0)  # the call is running on the doomed owner (it sleeps 4 s there)
        doomed.kill(signal.SIGKILL)
        if keyed:
            assert await call == 1  # repeated at once, and run by the survivor
            assert client.timeouts_retried >= 1
        else:
            with pytest.raises(RequestTimeout, match="taken by another worker while the request was in flight"):
                await call
        assert client.owners.ended >= 1
        assert await env.PROBES.get_by_name(name).storage("get", "k") == (1 if keyed else None)
