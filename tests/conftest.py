"""Test fixtures: a real nats-server and a real PostgreSQL, started once per test session on
ports the OS picks (by the pytest plugin the package ships, ``durable.testing``); each test gets
its own database, so tests never see each other's data or partition locks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from durable.client import Client, Env
from durable.core.config import AppConfig, load_config
from durable.core.embedded import EmbeddedNats, EmbeddedPostgres
from durable.core.settings import Settings
from durable.objects import Worker
from durable.testing.app import DurableServers
from nats.aio.client import Client as NatsClient

from tests.helpers.browser import browser  # noqa: F401 - the fixture, for the pages' browser tests
from tests.helpers.gateway import gateway
from tests.helpers.postgres import create_database
from tests.helpers.settings import TEST_CONFIG, make_settings
from tests.helpers.workers import WorkerFactory, WorkerProcess


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


@pytest.fixture
async def database_url(pg_server: EmbeddedPostgres) -> str:
    """A fresh database for this test."""
    return await create_database(pg_server, "t")


@pytest.fixture
def settings(nats_server: EmbeddedNats, database_url: str) -> Settings:
    return make_settings(nats_server.url, database_url)


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


@pytest.fixture
async def raw_nc(nats_server: EmbeddedNats) -> AsyncIterator[NatsClient]:
    """A plain nats-py connection: no durable client code in the way."""
    nc = await nats.connect(nats_server.url, name="raw-test-client")
    yield nc
    await nc.close()


@pytest.fixture
async def gw(worker: Worker, settings: Settings, config: AppConfig) -> AsyncIterator[str]:
    """The ws:// base URL of an in-process gateway (routing through tests/helpers/routes.py)
    in front of this test's worker."""
    async with gateway(settings, config) as url:
        yield url
