"""Databases for tests: a fresh one per test on a shared server, or a server of a test's own."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from durable.core.embedded import EmbeddedPostgres

_db_counter = itertools.count()


async def create_database(server: EmbeddedPostgres, prefix: str) -> str:
    """A fresh database on ``server``; returns its URL."""
    name = f"{prefix}{os.getpid()}_{next(_db_counter)}"
    conn = await asyncpg.connect(server.url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return server.url.rsplit("/", 1)[0] + f"/{name}"


@asynccontextmanager
async def dedicated_postgres(path: Path) -> AsyncIterator[EmbeddedPostgres]:
    """A Postgres of its own, for tests that stop or kill the database server."""
    path.chmod(0o755)
    async with EmbeddedPostgres(path / "pg") as server:
        yield server
