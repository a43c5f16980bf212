"""A step-down (lease lapsed, fenced, NATS or Postgres lost) answers what it cannot serve.

Requests already routed to the partition when its owner steps down, queued in the client
library or still on their way from the server, must get a retryable NotOwner (they never ran,
so the caller retries them elsewhere), not silence until the caller's timeout (issue 14: 10
requests sent within ~10 ms of a step-down timed out, though 8 of them never ran). Requests the
object had already taken get ObjectReset (their outcome is unknown), never silence either.
"""

from __future__ import annotations

import asyncio

import nats
import pytest
from durable.client import Env
from durable.core.settings import Settings
from durable.core.wire import partition_of, request_subject
from nats.aio.client import Client as NatsClient

from tests.helpers.workers import WorkerFactory

pytestmark = pytest.mark.timeout(60)


async def test_requests_at_a_step_down_are_answered_not_dropped(
        start_worker: WorkerFactory, env: Env, raw_nc: NatsClient, settings: Settings) -> None:
    worker = await start_worker()
    partition = 3
    names = [n for n in (f"step-down-{i}" for i in range(4000))
             if partition_of(env.COUNTERS.id_from_name(n).hex, settings.partitions) == partition][:20]
    stubs = [env.COUNTERS.get_by_name(n) for n in names]
    for stub in stubs:  # live objects: the requests below queue behind each other's events
        await stub.increment()
    subjects = [request_subject(partition, "Counter", s.id.hex, "rpc.increment") for s in stubs]
    for _ in range(5):
        calls = [asyncio.ensure_future(raw_nc.request(s, b"", timeout=3)) for s in subjects * 10]
        await raw_nc.flush()
        worker.ownership.step_down(partition, "a test steps it down")
        results = await asyncio.gather(*calls, return_exceptions=True)
        timeouts = [r for r in results if isinstance(r, nats.errors.TimeoutError)]
        assert timeouts == [], f"{len(timeouts)} of {len(calls)} requests went unanswered at a step-down"
        await worker.wait_ready()  # it takes the partition back at a heartbeat: again
