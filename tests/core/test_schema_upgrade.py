"""The SQL migrations bring a database made by an earlier schema up to date."""

from __future__ import annotations

import asyncpg
from durable.core import db


async def test_a_database_without_the_operator_tables_gains_them(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await db.apply_schema(conn, 8)
        # as a database whose 001 was applied before written_at and the names table existed
        await conn.execute("ALTER TABLE do_storage DROP COLUMN written_at")
        await conn.execute("DROP TABLE do_object_names")
        await conn.execute("DELETE FROM do_schema_migrations WHERE name = '002_operations.sql'")
        await conn.execute("INSERT INTO do_storage (object_id, key, namespace, value) VALUES ('o', 'k', 'N', 'v')")

        assert await db.apply_schema(conn, 8) == ["002_operations.sql"]
        row = await conn.fetchrow("SELECT written_at FROM do_storage WHERE object_id = 'o'")
        assert row is not None and row["written_at"] is not None
        await conn.execute("INSERT INTO do_object_names VALUES ('o', 'N', 'name')")
        assert await db.apply_schema(conn, 8) == []  # applied once
    finally:
        await conn.close()
