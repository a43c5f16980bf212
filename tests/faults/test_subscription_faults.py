"""Streams into objects under a kill -9: the worker pulling a subscription dies mid-handler; another
worker takes the subscription over, JetStream redelivers what the dead one held, and every object
ends with each of its messages applied exactly once, in stream order (a counter incremented by
each message equals the number of distinct messages; the sequences it recorded are the stream's).

Two ways to lose the puller: the only worker dies and a new one starts; or, with two workers
sharing the partitions (the second's join moves partitions, and maybe the puller, cleanly first),
the one owning the subscription's leader partition dies and the survivor takes it over when the
lease runs out."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from durable.client import Client, Env
from durable.core.config import load_config
from durable.core.settings import Settings
from durable.objects.subscriptions import leader_partition
from nats.aio.client import Client as NatsClient

from tests.helpers.streams import add_stream, remove, write_app
from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerProcess

pytestmark = [pytest.mark.fault, pytest.mark.timeout(180)]

OBJECTS = ["a", "b", "c"]
MESSAGES = 60


async def puller_of(settings: Settings, subscription: str, workers: list[WorkerProcess]) -> WorkerProcess:
    """The worker process owning the subscription's leader partition (its puller)."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        owner = await conn.fetchval("SELECT owner FROM do_partitions WHERE partition = $1",
                                    leader_partition(subscription, settings.partitions))
    finally:
        await conn.close()
    (puller,) = [w for w in workers if f"-{w.pid}-" in str(owner)]
    return puller


@pytest.mark.parametrize("survivor", [False, True], ids=["new-worker", "survivor-takes-over"])
async def test_a_puller_killed_mid_handler_leaves_every_message_applied_once_in_order(
        worker_process: Callable[..., WorkerProcess], settings: Settings, raw_nc: NatsClient, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, survivor: bool) -> None:
    monkeypatch.setenv("DURABLE_SUBSCRIPTION_ACK_WAIT", "2")  # the worker processes' environment
    monkeypatch.setenv("DURABLE_SUBSCRIPTION_RETRY_BASE", "0.05")
    app = write_app(tmp_path)
    await add_stream(raw_nc, app)
    s = settings.model_copy(update={"config_file": app.path, "lease_ttl": 3.0})
    config = load_config(app.path)
    try:
        workers = [worker_process(config_file=app.path, lease_ttl=3.0) for _ in range(2 if survivor else 1)]
        for w in workers:
            await w.start()
        sent: dict[str, list[int]] = {n: [] for n in OBJECTS}
        js = raw_nc.jetstream()
        for i in range(MESSAGES):
            name = OBJECTS[i % len(OBJECTS)]
            ack = await js.publish(app.subject(name), json.dumps({"slow": 0.1}).encode())
            sent[name].append(ack.seq)

        async with await Client.connect(s, config) as client:
            env = Env(client, config)

            async def counts() -> list[int]:
                out = []
                for n in OBJECTS:
                    got: dict[str, Any] = await env.TALLIES.get_by_name(n).state()
                    out.append(got["count"])
                return out

            async def some_applied() -> bool:
                return sum(await counts()) >= 9

            await assert_eventually(some_applied, 30, "the first messages applied")
            victim = await puller_of(s, app.subscription, workers)
            victim.kill(signal.SIGKILL)  # handlers are mid-sleep: their writes were not committed
            if survivor:
                (taker,) = [w for w in workers if w is not victim]
            else:
                taker = worker_process(config_file=app.path, lease_ttl=3.0)
                await taker.start()

            async def all_applied() -> bool:
                return await counts() == [len(sent[n]) for n in OBJECTS]

            await assert_eventually(all_applied, 90, "every message applied after the kill")
            for n in OBJECTS:
                got = await env.TALLIES.get_by_name(n).state()
                assert got["seqs"] == sent[n], f"object {n}: applied {got['seqs']}, the stream had {sent[n]}"

            async def all_acked() -> bool:
                info = await js.consumer_info(app.stream, app.subscription)
                return info.num_pending == 0 and info.num_ack_pending == 0

            await assert_eventually(all_acked, 20, "every message acknowledged")
        # the new puller found the dead one's messages pending and let them be redelivered first
        assert "pending from a previous puller" in taker.log_path.read_text()
    finally:
        await remove(raw_nc, app, settings.deployment_key)
