"""The pytest plugin shipped with durable (registered through the ``pytest11`` entry point), the
counterpart of Cloudflare's Workers test pool: tests talk to real servers, never to mocks.

Fixtures (nothing starts unless a test asks for it):

``durable_servers``
    a nats-server (JetStream) and a PostgreSQL, started once per session from the ``dev``
    extra's binaries, removed at the end.
``durable_config``
    the app's ``durable.toml``: the ini option ``durable_config`` if set, else the nearest
    ``durable.toml`` in the test file's folder or above it.
``durable_app``
    a :class:`DurableApp`: a fresh database, a worker running the app's classes, an ``env``,
    ``fetch`` through the app's routing function, ``evict`` and ``run_alarm``.
``env``
    ``durable_app.env``: ``await env.COUNTERS.get_by_name("a").increment()``.

Async fixtures and tests need pytest-asyncio (``asyncio_mode = "auto"`` in the pytest ini).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from ..core.config import AppConfig, load_config
from ..core.errors import ConfigError
from .app import DurableApp, DurableServers

__all__ = ["durable_app", "durable_config", "durable_servers", "env"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("durable_config", "the app's durable.toml (default: the nearest one above each test file)",
                  default="")
    parser.addini("durable_partitions", "partitions of the test deployment (fewer start faster)", default="16")


@pytest.fixture(scope="session")
def durable_servers(pytestconfig: pytest.Config) -> Iterator[DurableServers]:
    """A nats-server and a PostgreSQL for the whole session (their data removed at the end)."""
    root = Path(tempfile.mkdtemp(prefix="durable-test-servers-"))
    root.chmod(0o755)  # Postgres runs as a user of its own when the tests run as root
    servers = DurableServers(root, partitions=int(pytestconfig.getini("durable_partitions")))
    try:
        asyncio.run(servers.start())
        yield servers
    finally:
        asyncio.run(servers.stop())
        shutil.rmtree(root, ignore_errors=True)


def _nearest_config(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        candidate = folder / "durable.toml"
        if candidate.is_file():
            return candidate
    return None


@pytest.fixture
def durable_config(request: pytest.FixtureRequest) -> AppConfig:
    """The app under test, from its durable.toml."""
    configured = str(request.config.getini("durable_config"))
    if configured:
        path = Path(configured)
        if not path.is_absolute():
            path = Path(request.config.rootpath) / path
    else:
        found = _nearest_config(Path(request.path).resolve().parent)
        if found is None:
            raise ConfigError(f"no durable.toml in {Path(request.path).parent} or above it; "
                              "set the pytest ini option durable_config")
        path = found
    return load_config(path)


@pytest_asyncio.fixture
async def durable_app(durable_servers: DurableServers, durable_config: AppConfig) -> AsyncIterator[DurableApp]:
    """The app running on a fresh database: its objects, its routes, its ``env``."""
    app = await DurableApp.start(durable_servers, durable_config)
    try:
        yield app
    finally:
        await app.stop()


@pytest.fixture
def env(durable_app: DurableApp) -> object:
    """The app's bindings, as its routes and objects see them."""
    return durable_app.env
