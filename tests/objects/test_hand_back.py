"""A hand-over leaves no partition without a subscriber (issue 14: every hand-back left the
moving partitions without an owner for up to a heartbeat, answered "no responders").

The old owner keeps its subscription, refusing with NotOwner (retryable: nothing ran), until the
new owner has taken the partition under a new epoch, and only then withdraws; the new owner,
told a partition is coming, tries for it every few milliseconds rather than once a heartbeat.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from durable.core.wire import request_subject
from durable.objects import Worker
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError

from tests.helpers.settings import PARTITIONS
from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory

pytestmark = pytest.mark.timeout(90)


def _balanced(workers: list[Worker]) -> bool:
    owned = sorted(p for w in workers for p in w.parts)
    return owned == list(range(PARTITIONS)) and all(
        abs(len(w.parts) - PARTITIONS / len(workers)) <= 1 for w in workers)


async def test_a_hand_over_leaves_no_partition_without_a_subscriber(
        start_worker: WorkerFactory, raw_nc: NatsClient) -> None:
    first = await start_worker()
    stop = asyncio.Event()
    no_responders: Counter[int] = Counter()
    answered: Counter[int] = Counter()

    async def probe(partition: int) -> None:
        # any answer (here: an error about the probe object) proves a subscriber is there
        subject = request_subject(partition, "Probe", "0" * 64, "rpc.ping")
        while not stop.is_set():
            try:
                await raw_nc.request(subject, b"", timeout=3)
                answered[partition] += 1
            except NoRespondersError:
                no_responders[partition] += 1
            await asyncio.sleep(0.005)

    probes = [asyncio.create_task(probe(p)) for p in range(PARTITIONS)]
    workers = [first]
    try:
        await assert_eventually(lambda: len(answered) == PARTITIONS, 10, "every partition answers")
        for _ in range(2):  # two joins, each a hand-over of some partitions under the probes
            workers.append(await start_worker())
            await assert_eventually(lambda: _balanced(workers), 20, f"balance over {len(workers)} workers")
            before = sum(answered.values())
            await assert_eventually(lambda b=before: sum(answered.values()) > b + PARTITIONS, 10, "probes go on")
    finally:
        stop.set()
        await asyncio.gather(*probes)
    assert dict(no_responders) == {}, f"partitions without a subscriber during hand-overs: {dict(no_responders)}"

