"""What the pytest plugin hands a test: real servers and the app running on them.

Usable without pytest too (a script, another test runner)::

    servers = DurableServers(Path("/tmp/t"))
    await servers.start()
    app = await DurableApp.start(servers, load_config(Path("durable.toml")))
    await app.env.COUNTERS.get_by_name("a").increment()
    await app.stop(); await servers.stop()
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from ..client import Client, Env
from ..core.config import AppConfig
from ..core.embedded import EmbeddedNats, EmbeddedPostgres
from ..core.errors import UnknownNamespace
from ..core.http import Request, Response
from ..core.settings import Settings
from ..core.subjects import partition_of
from ..objects.alarms import run_alarm
from ..objects.host import Worker
from ..router.app import UserFetch, load_routes

_databases = itertools.count()


@asynccontextmanager
async def serve_asgi(app: Any) -> AsyncIterator[int]:
    """``app`` under uvicorn as ``durable router`` configures it (``cli.server_config``), on a
    port the OS picks, without signal handlers of its own; yields the port."""
    from ..cli import _Server, server_config  # noqa: PLC0415 - uvicorn only where served

    server = _Server(server_config(app, "127.0.0.1", 0))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped before it started")
            await asyncio.sleep(0.01)
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        await task

#: a test deployment's settings: short leases and timeouts, so a broken test fails fast
TEST_SETTINGS: dict[str, Any] = {
    "lease_ttl": 4.0, "heartbeat_interval": 0.5, "request_timeout": 5.0, "retry_deadline": 10.0,
    "id_secret": "durable-test-secret",
}


class DurableServers:
    """A nats-server (JetStream, the partition mapping) and a PostgreSQL under ``root``, on ports
    the OS picks. Each :class:`DurableApp` gets a database of its own on them."""

    def __init__(self, root: Path, partitions: int = 16) -> None:
        self.root = root
        self.partitions = partitions
        self.nats = EmbeddedNats(root / "nats", partitions=partitions)
        self.postgres = EmbeddedPostgres(root / "postgres")

    async def start(self) -> None:
        await self.nats.start()
        try:
            await self.postgres.start()
        except BaseException:
            await self.nats.stop()
            raise

    async def stop(self) -> None:
        await self.postgres.stop()
        await self.nats.stop()

    async def new_database(self, prefix: str = "app") -> str:
        """A fresh database; returns its URL."""
        name = f"{prefix}{os.getpid()}_{next(_databases)}"
        conn = await asyncpg.connect(self.postgres.url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.postgres.url.rsplit("/", 1)[0] + f"/{name}"

    async def settings(self, **overrides: Any) -> Settings:
        """Settings for a new test deployment on these servers (its own database)."""
        values = {**TEST_SETTINGS, "nats_url": self.nats.url, "database_url": await self.new_database(),
                  "partitions": self.partitions, **overrides}
        return Settings(**values)


class DurableApp:
    """The app under test: a worker running its classes, its ``env`` and its routing function."""

    def __init__(self, settings: Settings, config: AppConfig, worker: Worker, client: Client) -> None:
        self.settings = settings
        self.config = config
        self.worker = worker
        self.client = client
        self.env = Env(client, config)
        self._routes: UserFetch | None = None

    @classmethod
    async def start(cls, servers: DurableServers, config: AppConfig, **settings: Any) -> DurableApp:
        s = await servers.settings(config_file=config.path, **settings)
        worker = Worker(s, config)
        await worker.start()
        try:
            await worker.wait_ready(30)
            client = await Client.connect(s, config)
        except BaseException:
            await worker.stop(grace=2)
            raise
        return cls(s, config, worker, client)

    async def stop(self) -> None:
        await self.client.close()
        await self.worker.stop(grace=2)

    async def fetch(self, request: Request | str, **init: Any) -> Response:
        """A request through the app's routing function, as the router hands it over (the
        client address ``cf-connecting-ip`` is 127.0.0.1 unless the request sets it)."""
        if isinstance(request, str):
            if request.startswith("/"):
                request = "http://127.0.0.1" + request
            request = Request(request, **init)
        if request.headers.get("cf-connecting-ip") is None:
            request.headers.set("cf-connecting-ip", "127.0.0.1")
        if self._routes is None:
            self._routes = load_routes(self.settings, self.config)
        return await self._routes(request, self.env)

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        """The router and its WebSocket gateway on a free port, for tests that need real HTTP or
        WebSockets (browsers, ``websockets`` clients); yields the base URL ``http://127.0.0.1:<port>``."""
        from ..router.app import create_app  # noqa: PLC0415 - the router only where served

        async with serve_asgi(create_app(self.settings, self.config, client=self.client)) as port:
            yield f"http://127.0.0.1:{port}"

    def _locate(self, stub: Any) -> tuple[str, str, int]:
        namespace, object_id = stub._namespace, stub.id.hex
        if namespace not in self.worker.classes:
            raise UnknownNamespace(f"{namespace} is not a class of this app")
        return namespace, object_id, partition_of(object_id, self.settings.partitions)

    async def evict(self, stub: Any) -> bool:
        """Evict the object from memory, as an idle timeout does, once its writes are durable:
        its next event runs the constructor again on committed state. False if it was not live."""
        _, object_id, partition = self._locate(stub)
        state = self.worker.parts.get(partition)
        inst = state.instances.get(object_id) if state else None
        if inst is None:
            return False
        await inst.storage.sync()
        from ..core.errors import ObjectReset  # noqa: PLC0415

        inst.fail(ObjectReset("Durable Object was evicted by the test; this instance can no longer be used"))
        return True

    async def run_due_alarms(self, now_ms: int | None = None) -> int:
        """Run every alarm due by ``now_ms`` (epoch ms, default now: its time, or its retry's, has
        come), as the alarm sweep would, in due order; returns how many handlers ran and succeeded.
        A later ``now_ms`` runs the alarms of the future without waiting for them."""
        when = int(time.time() * 1000) if now_ms is None else now_ms
        async with self.worker.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT object_id, namespace FROM do_alarms WHERE coalesce(due_ms, scheduled_ms) <= $1 "
                "ORDER BY coalesce(due_ms, scheduled_ms)", when)
        ran = 0
        for row in rows:
            if row["namespace"] in self.worker.classes:
                ran += await self._run_alarm_of(row["namespace"], row["object_id"])
        return ran

    async def run_alarm(self, stub: Any) -> bool:
        """Run the object's alarm now, whatever its scheduled time (Cloudflare's
        ``runDurableObjectAlarm``): True if an alarm was set and its handler ran and succeeded
        (a failure is recorded as a retry, as in production)."""
        namespace, object_id, _ = self._locate(stub)
        return await self._run_alarm_of(namespace, object_id)

    async def _run_alarm_of(self, namespace: str, object_id: str) -> bool:
        partition = partition_of(object_id, self.settings.partitions)
        state = self.worker.parts.get(partition)
        if state is None:
            raise RuntimeError(f"partition {partition} is not owned by the test worker")
        row = await self.worker.read_alarm(object_id)
        if row is None:
            return False
        inst = self.worker.instance_for(state, namespace, object_id)
        ok, value, seq = await inst.run_event(lambda obj: run_alarm(inst, obj, row.generation))
        if not ok:
            raise value if isinstance(value, BaseException) else RuntimeError(str(value))
        await inst.storage.wait_durable(seq)
        return bool(value == "ran")
