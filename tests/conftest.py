"""Test fixtures: a real nats-server and a real PostgreSQL, started once per test session on
ports the OS picks (by the pytest plugin the package ships, ``durable.testing``); each test gets
its own database, so tests never see each other's data or partition locks."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from durable.client import Client, Env
from durable.core.config import AppConfig, load_config
from durable.core.embedded import EmbeddedNats, EmbeddedPostgres
from durable.core.settings import Settings
from durable.objects import Worker
from durable.testing.app import DurableServers

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = Path(__file__).with_name("durable.test.toml")
PARTITIONS = 16
TEST_ID_SECRET = "durable-tests-id-secret"
_db_counter = itertools.count()


@pytest.fixture(scope="session")
def nats_server(durable_servers: DurableServers) -> EmbeddedNats:
    """The session's nats-server: the one the shipped pytest plugin starts (durable.testing)."""
    return durable_servers.nats


@pytest.fixture(scope="session")
def pg_server(durable_servers: DurableServers) -> EmbeddedPostgres:
    """The session's PostgreSQL (a database per test on it), from the shipped plugin."""
    return durable_servers.postgres


@pytest.fixture(scope="session")
def config() -> AppConfig:
    return load_config(TEST_CONFIG)


async def create_database(server: EmbeddedPostgres, prefix: str) -> str:
    """A fresh database on ``server``; returns its URL."""
    name = f"{prefix}{os.getpid()}_{next(_db_counter)}"
    conn = await asyncpg.connect(server.url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return server.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
async def database_url(pg_server: EmbeddedPostgres) -> str:
    """A fresh database for this test."""
    return await create_database(pg_server, "t")


def make_settings(nats_url: str, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": nats_url, "database_url": database_url, "partitions": PARTITIONS,
        "config_file": TEST_CONFIG, "lease_ttl": 4.0, "heartbeat_interval": 0.5,
        "request_timeout": 5.0, "retry_deadline": 10.0,
        # not the development secret: `durable worker`/`router`/`gateway` refuse that one
        "id_secret": TEST_ID_SECRET,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(nats_server: EmbeddedNats, database_url: str) -> Settings:
    return make_settings(nats_server.url, database_url)


WorkerFactory = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def start_worker(settings: Settings, config: AppConfig) -> AsyncIterator[WorkerFactory]:
    """Start in-process workers (stopped at teardown); keyword arguments override settings;
    ``base`` replaces the test's settings, ``classes`` replaces bound classes by class name."""
    started: list[Worker] = []

    async def factory(base: Settings | None = None, classes: dict[str, type] | None = None,
                      **overrides: Any) -> Worker:
        s = (base or settings).model_copy(update=overrides) if overrides else (base or settings)
        worker = Worker(s, config, classes={**config.load_classes(), **classes} if classes else None)
        await worker.start()
        started.append(worker)
        await worker.wait_ready()
        return worker

    yield factory
    for worker in started:
        try:
            await worker.stop(grace=2)
        except Exception:  # noqa: BLE001 - a test may have broken it on purpose
            pass


@pytest.fixture
async def worker(start_worker: WorkerFactory) -> Worker:
    return await start_worker()


@pytest.fixture
async def client(settings: Settings, config: AppConfig) -> AsyncIterator[Client]:
    c = await Client.connect(settings, config)
    yield c
    await c.close()


@pytest.fixture
def env(client: Client, config: AppConfig) -> Env:
    return Env(client, config)


def worker_env(s: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `durable worker` subprocess running with these settings."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DURABLE_NATS_URL": s.nats_url, "DURABLE_DATABASE_URL": s.database_url,
        "DURABLE_PARTITIONS": str(s.partitions), "DURABLE_CONFIG_FILE": str(s.config_file),
        "DURABLE_LEASE_TTL": str(s.lease_ttl), "DURABLE_HEARTBEAT_INTERVAL": str(s.heartbeat_interval),
        "DURABLE_IDLE_TIMEOUT": str(s.idle_timeout), "DURABLE_ID_SECRET": s.id_secret,
        **extra,
    }


class WorkerProcess:
    """A `durable worker` in its own process, for tests that kill or pause it."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return worker_env(self.settings)

    async def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen([sys.executable, "-m", "durable.cli", "worker"], env=self.env(),
                                     stdout=log, stderr=log, cwd=ROOT)
        log.close()
        await wait_until_partitions_owned(self.settings, timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(15)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


async def wait_until_partitions_owned(settings: Settings, timeout: float) -> None:
    """Until every partition has an owner holding its advisory lock (as seen in pg_locks)."""
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(settings.database_url)
    try:
        while time.monotonic() < deadline:
            try:
                held = await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                    "AND classid = $1 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    settings.deployment_key,
                )
            except asyncpg.UndefinedTableError:
                held = 0
            if held >= settings.partitions:
                await asyncio.sleep(0.2)  # subscriptions follow the lock within one flush
                return
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise TimeoutError(f"partitions not owned within {timeout}s")


@pytest.fixture
async def worker_process(settings: Settings, tmp_path: Path) -> AsyncIterator[Callable[..., WorkerProcess]]:
    made: list[WorkerProcess] = []

    def factory(**overrides: Any) -> WorkerProcess:
        s = settings.model_copy(update=overrides) if overrides else settings
        wp = WorkerProcess(s, tmp_path / f"worker{len(made)}.log")
        made.append(wp)
        return wp

    yield factory
    for wp in made:
        wp.close()


async def assert_eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0,
                            message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{message} did not hold within {timeout}s")


@asynccontextmanager
async def dedicated_postgres(path: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A Postgres of its own, for tests that stop or kill the database server."""
    path.chmod(0o755)
    async with EmbeddedPostgres(path / "pg") as server:
        yield server


# ----- cluster fault tests: a NATS cluster, and a Postgres the tests may restart ----------------

from durable.core.embedded import EmbeddedNatsCluster  # noqa: E402 - appended with its fixtures


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[EmbeddedNatsCluster]:
    """Three clustered nats-servers on loopback (full mesh of routes, JetStream on each with its
    own store and server_name, the partition mapping on each). Clients take ``cluster.urls``;
    ``cluster.nodes[i]`` stops, kills, pauses and restarts (``cluster.start_node(i)``) one node."""
    async with EmbeddedNatsCluster(tmp_path / "nats-cluster", partitions=PARTITIONS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
async def fault_postgres(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedPostgres]:
    """A Postgres of the module's own, which its tests stop and restart (on the same port)."""
    async with dedicated_postgres(tmp_path_factory.mktemp("fault-pg")) as server:
        yield server


@pytest.fixture
async def fault_database_url(fault_postgres: EmbeddedPostgres) -> str:
    """A fresh database on ``fault_postgres`` for this test."""
    return await create_database(fault_postgres, "f")
