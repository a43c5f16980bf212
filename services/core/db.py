"""Postgres: connections, the SQL schema migrations (``infra/migrations`` in the repository,
the package data ``durable.migrations`` once installed) and the class
migrations of ``durable.toml``. Both are idempotent and serialised by an advisory lock, so
any number of processes may start at once."""

from __future__ import annotations

import json
from importlib import resources

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
            for name in m.deleted_classes:
                identity.pop(name, None)
                if m.tag not in done:
                    for table in ("do_storage", "do_alarms", "do_sockets", "do_object_names"):
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
