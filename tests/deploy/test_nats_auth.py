"""NATS locked down: a nats-server running the shipped users and permissions
(deploy/nats/auth.conf, included as it is) carries a whole deployment, each process as its own
user, and refuses what each user has no business doing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from durable.client import Client, Env
from durable.client.chat import ChatClient
from durable.core import codec
from durable.core.config import AppConfig
from durable.core.errors import Unavailable
from durable.core.settings import Settings
from durable.core.wire import partition_of
from durable.objects import Worker
from durable.operate import doctor
from durable.status import micro_stats
from nats.aio.client import Client as NatsClient

from tests.helpers.gateway import gateway
from tests.helpers.secure import SecureNats, password, user_settings
from tests.helpers.settings import PARTITIONS, make_settings
from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerFactory

pytestmark = pytest.mark.slow


@pytest.fixture
async def locked_nats(tmp_path: Path) -> AsyncIterator[SecureNats]:
    server = SecureNats(tmp_path / "nats", PARTITIONS, auth=True)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def base(locked_nats: SecureNats, database_url: str) -> Settings:
    return make_settings(locked_nats.url, database_url)


@pytest.fixture
async def locked_worker(start_worker: WorkerFactory, base: Settings) -> Worker:
    return await start_worker(base=user_settings(base, "worker"))


class Raw:
    """A plain nats-py connection as one user, keeping the errors the server sends it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc = NatsClient()

    async def connect(self, url: str, user: str, inbox: str | None = None) -> Raw:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        await self.nc.connect(url, user=user, password=password(user), error_cb=on_error,
                              inbox_prefix=inbox or f"_INBOX.{user}", max_reconnect_attempts=0)
        return self

    async def violation(self, what: str, subject: str) -> None:
        """The server said this user may not ``what`` (Publish or Subscription) on ``subject``."""
        expected = f'permissions violation for {what} to "{subject}"'
        await self.nc.flush()
        await assert_eventually(lambda: any(expected.lower() in e.lower() for e in self.errors), timeout=5,
                                message=f"no permission violation for {what} to {subject}: {self.errors}")


@pytest.fixture
async def raw() -> AsyncIterator[Raw]:
    r = Raw()
    yield r
    await r.nc.close()


async def test_every_user_does_its_part_end_to_end(locked_worker: Worker, base: Settings,
                                                   config: AppConfig, caplog: pytest.LogCaptureFixture) -> None:
    # an application client: calls on the partition subjects, replies on its own inbox
    app = await Client.connect(user_settings(base, "app"), config)
    try:
        env = Env(app, config)
        counter = env.COUNTERS.get_by_name("locked")
        assert await counter.increment(2) == 2
        assert await counter.increment(3) == 5
        # an alarm: the worker's JetStream stream, consumer, schedule and acknowledgement
        alarmer = env.ALARMERS.get_by_name("locked")
        await alarmer.arm(100)
        await assert_eventually(alarmer.runs, timeout=10, message="the alarm ran")
    finally:
        await app.close()
    # the router and its WebSocket gateway: calls, frames from the object, heartbeats
    async with gateway(user_settings(base, "router"), config) as gw, \
            ChatClient(gw, "locked", "u1", "Ada") as ada:
        assert [u["name"] for u in (await ada.next_event("welcome"))["users"]] == ["Ada"]
        await ada.send("hello")
        assert (await ada.next_event("message"))["content"] == "hello"
    # an operator: micro discovery ($SRV) answered by the worker, and writes on admin subjects
    operator = user_settings(base, "operator")
    stats = await micro_stats(operator)
    assert [s["id"] for s in stats] == [locked_worker.micro.id]
    ops = await Client.connect(operator, config)
    try:
        counter = Env(ops, config).COUNTERS.get_by_name("locked")
        assert await counter.increment(1) == 6
        done = await ops.call("Counter", counter.id.hex, "admin.state", codec.pack({"put": {"value": 41}}))
        assert done["put"] == 1 and await counter.increment(1) == 42
    finally:
        await ops.close()
    # `durable doctor` as the operator: its NATS checks, the mapping's included
    checks = {c.name: c for c in await doctor.run(operator, config)}
    assert checks["nats"].ok and checks["partition mapping"].ok, [c.line() for c in checks.values()]
    # and nobody was refused anything on the way (each would have logged a permissions violation)
    refused = [r.getMessage() for phase in ("setup", "call") for r in caplog.get_records(phase)
               if "permissions violation" in r.getMessage().lower()]
    assert refused == []


async def test_an_app_user_reads_no_one_elses_traffic_and_sends_no_admin_or_partition_request(
        locked_worker: Worker, locked_nats: SecureNats, raw: Raw, config: AppConfig, base: Settings) -> None:
    await raw.connect(locked_nats.url, "app")
    for subject in ("dop.>", "_INBOX.>", "_INBOX.router.>", "dal.>", "dgw.>", "$SRV.>", ">"):
        await raw.nc.subscribe(subject)
        await raw.violation("subscription", subject)
    oid = Env(Client(raw.nc, base, config), config).COUNTERS.id_from_name("x").hex  # ids need no connection
    partition = partition_of(oid, PARTITIONS)
    mapped = f"dop.{partition}.Counter.{oid}"  # the server checks a do.* subject once mapped
    for subject, checked in ((f"do.Counter.{oid}.admin.state", f"{mapped}.admin.state"),
                             (f"dop.{partition}.Counter.{oid}.admin.state", f"{mapped}.admin.state"),
                             (f"do.Counter.{oid}.alarm", f"{mapped}.alarm"),
                             (f"dop.{partition}.ChatRoom.{oid}.ws.message", None),
                             ("dal.3339.s.3.x", None), ("dgw.3339.gateway", None), ("dgwhb.3339", None)):
        raw.errors.clear()
        await raw.nc.publish(subject, b"")
        await raw.violation("publish", checked or subject)
    # and the public request subjects work for it, raw: the server maps them to a partition
    reply = await raw.nc.request(f"do.Counter.{oid}.rpc.increment", b"[1]", timeout=5,
                                 headers={"Content-Type": "application/json"})
    assert reply.data == b"1"


async def test_an_app_user_cannot_use_another_users_inbox_prefix(locked_nats: SecureNats, raw: Raw) -> None:
    await raw.connect(locked_nats.url, "app", inbox="_INBOX.worker")
    await raw.nc.subscribe("_INBOX.worker.x")
    await raw.violation("subscription", "_INBOX.worker.x")


async def test_a_router_cannot_take_a_workers_part(locked_nats: SecureNats, raw: Raw) -> None:
    await raw.connect(locked_nats.url, "router")
    for subject in ("dop.>", "dal.>", "_INBOX.worker.>"):
        await raw.nc.subscribe(subject)
        await raw.violation("subscription", subject)
    await raw.nc.publish("dop.1.Counter.x.admin.state", b"")
    await raw.violation("publish", "dop.1.Counter.x.admin.state")


async def test_an_unknown_or_anonymous_connection_is_refused_clearly(locked_nats: SecureNats,
                                                                    base: Settings) -> None:
    with pytest.raises(Unavailable, match="refused the credentials: set DURABLE_NATS_USER"):
        await Client.connect(base.model_copy(update={"nats_connect_timeout": 3.0}))
    with pytest.raises(Unavailable, match="(?i)authorization"):
        await Client.connect(user_settings(base, "app", nats_password="wrong", nats_connect_timeout=3.0))
    with pytest.raises(Exception, match="(?i)authorization"):
        await asyncio.wait_for(nats.connect(locked_nats.url, max_reconnect_attempts=0, allow_reconnect=False), 5)
