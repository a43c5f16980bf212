"""Postgres: connections, the SQL schema migrations (``infra/migrations`` in the repository,
the package data ``durable.migrations`` once installed) and the class
migrations of ``durable.toml``. Both are idempotent and serialised by an advisory lock, so
any number of processes may start at once."""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from .config import AppConfig
from .errors import ConfigError


def _sql_migrations() -> list[tuple[str, str]]:
    """(name, SQL) of every schema migration in name order, read from the package data, so a
    wheel installed anywhere finds them (not a path relative to a checkout)."""
    files = resources.files("durable.migrations")
    return sorted((f.name, f.read_text(encoding="utf-8")) for f in files.iterdir() if f.name.endswith(".sql"))

_MIGRATION_LOCK = 0x0D0B_0001


async def connect(url: str, **kwargs: object) -> asyncpg.Connection:
    return await asyncpg.connect(url, **kwargs)


#: how long one host of a multi-host URL may take to answer, unless the caller says otherwise
HOST_CONNECT_TIMEOUT = 5.0
#: how often a host that refused (a standby) is asked again while another host is still silent
HOST_RETRY_INTERVAL = 0.25


def single_host_urls(url: str) -> list[str]:
    """A URL naming several hosts in its authority (``postgresql://u@h1:p1,h2:p2/db?...``) as
    one URL per host, in order, each keeping the user, database and query (``target_session_attrs``
    included). A URL naming one host, or its hosts in a ``host=`` parameter, is returned alone."""
    parts = urlsplit(url)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    hosts = [h for h in hostlist.split(",") if h]
    if len(hosts) < 2:
        return [url]
    return [urlunsplit(parts._replace(netloc=f"{userinfo}{at}{h}")) for h in hosts]


async def connect_writable(url: str, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect``, but a URL naming several hosts tries them all at once and keeps the
    first that accepts the session (with ``target_session_attrs=read-write``, the primary).

    asyncpg tries the hosts one after another under a single timeout, so a primary that is gone
    without refusing connections (a hung machine, a frozen process, a network partition) holds
    every attempt until that timeout, and the promoted standby behind it is never reached.
    Tried at once, a silent host costs nothing; and while one is still silent, a host that said
    no (a standby, not promoted yet) is asked again every :data:`HOST_RETRY_INTERVAL`, so its
    promotion is seen at once. When every host has answered no, the error comes at once.
    ``timeout`` (default 5 s) bounds the whole attempt; the pool passes its other arguments
    through. Raises ``ConnectionError`` naming each host's failure when none is usable."""
    urls = single_host_urls(url)
    if len(urls) == 1:
        return await asyncpg.connect(url, **kwargs)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + kwargs.pop("timeout", HOST_CONNECT_TIMEOUT)

    def attempt(host_url: str) -> asyncio.Future[asyncpg.Connection]:
        left = max(0.01, deadline - loop.time())
        future: asyncio.Future[asyncpg.Connection] = asyncio.ensure_future(
            asyncpg.connect(host_url, timeout=left, **kwargs))
        return future

    pending = {attempt(u): u for u in urls}
    retry_at: dict[str, float] = {}
    errors: dict[str, BaseException] = {}
    chosen: asyncpg.Connection | None = None
    try:
        while pending and chosen is None:
            wait = max(0.0, min(retry_at.values()) - loop.time()) if retry_at else None
            done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                host_url = pending.pop(task)
                error = task.exception()
                if error is None:
                    chosen = chosen or task.result()
                    continue
                errors[host_url] = error
                if loop.time() + HOST_RETRY_INTERVAL < deadline:
                    retry_at[host_url] = loop.time() + HOST_RETRY_INTERVAL
            if chosen is None and pending:  # someone is still silent: ask the others again
                for host_url, when in list(retry_at.items()):
                    if when <= loop.time():
                        del retry_at[host_url]
                        pending[attempt(host_url)] = host_url
    finally:
        for task in pending:
            task.cancel()
        for result in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(result, asyncpg.Connection) and result is not chosen:
                result.terminate()  # made to another host meanwhile: not kept
    if chosen is not None:
        return chosen
    failures = [f"{urlsplit(u).netloc.rpartition('@')[2]} ({type(errors[u]).__name__}: {errors[u]})" for u in urls]
    raise ConnectionError(f"no usable Postgres among {', '.join(failures)}")


class NotPrimary(ConfigError):
    """A connection reached a read-only server (a hot standby): durable writes, and holds its
    partition locks, on the primary only. At start-up, ``durable worker`` reports it as the
    configuration error it then is."""


async def require_primary(conn: asyncpg.Connection) -> None:
    """Raise :class:`NotPrimary` if ``conn`` is to a standby in recovery. Postgres 14+ reports
    ``in_hot_standby`` when the session starts (no round trip); older servers are asked. Used as
    the pool's ``init`` and by the lock session: a standby accepts advisory locks, which would
    lock nothing the primary knows about."""
    reported = getattr(conn.get_settings(), "in_hot_standby", None)
    standby = reported == "on" if reported is not None else await conn.fetchval("SELECT pg_is_in_recovery()")
    if standby:
        addr = conn._addr  # (host, port) or a socket path
        where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        raise NotPrimary(
            f"the Postgres at {where} is a read-only standby (in recovery); durable needs the primary. "
            "Name the primary in DURABLE_DATABASE_URL, or every server with "
            "?target_session_attrs=read-write so that the one accepting writes is found"
        )


async def apply_schema(conn: asyncpg.Connection, partitions: int) -> list[str]:
    """Apply the SQL migrations not yet recorded; returns the names applied now."""
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS do_schema_migrations "
            "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM do_schema_migrations")}
        for name, sql in _sql_migrations():
            if name in done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO do_schema_migrations(name) VALUES ($1)", name)
            applied_now.append(name)
        await conn.execute(
            "INSERT INTO do_partitions(partition) SELECT generate_series(0, $1 - 1) ON CONFLICT DO NOTHING",
            partitions,
        )
    return applied_now


async def apply_class_migrations(conn: asyncpg.Connection, config: AppConfig) -> list[str]:
    """Apply durable.toml migration tags once each: renames move data, deletions remove it."""
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        done = {r["tag"] for r in await conn.fetch("SELECT tag FROM do_class_migrations")}
        # namespace identity of each class at this point of the migration list
        identity: dict[str, str] = {}
        for m in config.migrations:
            for name in m.new_classes:
                identity[name] = name
            for old, new in m.renamed_classes:
                identity[new] = identity.pop(old)
                if m.tag not in done:
                    await conn.execute("UPDATE do_storage SET namespace=$2 WHERE namespace=$1", old, new)
                    await conn.execute("UPDATE do_alarms SET namespace=$2 WHERE namespace=$1", old, new)
                    await conn.execute("UPDATE do_sockets SET namespace=$2 WHERE namespace=$1", old, new)
                    await conn.execute("UPDATE do_object_names SET namespace=$2 WHERE namespace=$1", old, new)
                    await conn.execute("UPDATE do_idempotency SET namespace=$2 WHERE namespace=$1", old, new)
            for name in m.deleted_classes:
                identity.pop(name, None)
                if m.tag not in done:
                    for table in ("do_storage", "do_alarms", "do_sockets", "do_object_names", "do_idempotency"):
                        await conn.execute(f"DELETE FROM {table} WHERE namespace=$1", name)
            if m.tag not in done:
                spec = {
                    "new_classes": list(m.new_classes),
                    "renamed_classes": [{"from": a, "to": b} for a, b in m.renamed_classes],
                    "deleted_classes": list(m.deleted_classes),
                }
                await conn.execute(
                    "INSERT INTO do_class_migrations(tag, spec) VALUES ($1, $2::jsonb)", m.tag, json.dumps(spec)
                )
                applied_now.append(m.tag)
    return applied_now
