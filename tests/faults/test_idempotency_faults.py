"""Idempotency keys under real faults: keyed increments from an independent client while the
owner of their objects is killed (-9) or paused (SIGSTOP) past its lease; every call is repeated
with its key until it answers.

What must hold: each counter ends at exactly the number of distinct keys sent to it (no
increment lost, none applied twice, although calls timed out and were repeated across the
failover), and the replies to one counter are exactly 1..n (each key's reply is the value its one
run produced, also when the reply came from the record rather than the run).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest
from durable.client import Client, Env
from durable.core.config import AppConfig
from durable.core.errors import DurableError
from durable.core.settings import Settings

from tests.helpers.workers import WorkerProcess

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]

COUNTERS = 20
SECONDS = 8.0
FAULTY = {"lease_ttl": 3.0, "heartbeat_interval": 0.5}


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["kill9", "sigstop"])
async def test_keyed_increments_apply_exactly_once_through_a_fault_of_the_owner(
        worker_process: Callable[..., WorkerProcess], settings: Settings, config: AppConfig,
        fault: signal.Signals) -> None:
    first, second = worker_process(**FAULTY), worker_process(**FAULTY)
    await first.start()
    await second.start()
    impatient = settings.model_copy(update={"request_timeout": 1.0, "retry_deadline": 20.0})
    replies: dict[int, list[int]] = {i: [] for i in range(COUNTERS)}
    sent: dict[int, int] = dict.fromkeys(range(COUNTERS), 0)
    repeated = 0
    stop = time.monotonic() + SECONDS

    async with await Client.connect(impatient, config) as client:
        env = Env(client, config)

        async def drive(i: int) -> None:
            nonlocal repeated
            counter = env.COUNTERS.get_by_name(f"idem-fault-{i}")
            n = 0
            while time.monotonic() < stop:
                n += 1
                keyed = counter.with_idempotency_key(f"inc-{i}-{n}")
                sent[i] = n
                while True:  # a caller that must know: repeat the key until it answers
                    try:
                        replies[i].append(await keyed.increment())
                        break
                    except DurableError:
                        repeated += 1
                        await asyncio.sleep(0.2)

        load = [asyncio.create_task(drive(i)) for i in range(COUNTERS)]
        await asyncio.sleep(SECONDS / 3)
        first.kill(fault)  # the owner of about half the counters, mid-load (a paused one stays paused)
        await asyncio.gather(*load)

        for i in range(COUNTERS):
            value = await env.COUNTERS.get_by_name(f"idem-fault-{i}").get()
            assert value == sent[i], f"counter {i}: {value} stored for {sent[i]} keys"
            assert sorted(replies[i]) == list(range(1, sent[i] + 1)), f"counter {i}: replies {replies[i]}"
        timeouts = client.timeouts_retried
        # calls were in flight at the owner when it died: their outcome was unknown, and repeated
        assert timeouts > 0, "no call timed out: the fault did not hit calls in flight"
    first.close()
    second.close()
    total = sum(sent.values())
    print(f"{total} keyed increments over {COUNTERS} counters through {fault.name} of an owner: all applied once; "
          f"{timeouts} timed-out attempts were repeated by the client, {repeated} failed calls by the caller")
