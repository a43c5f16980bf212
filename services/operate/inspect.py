"""Read-only looks into Postgres for operators: objects of a class, one object's storage, alarms.

Acknowledged writes are always committed (the output gate), so what these read is what callers
were told; writes still in a live instance's cache and not yet acknowledged are not shown.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import asyncpg

from ..core import codec

# The page of object ids first (from the names index when a prefix is given), then the
# aggregates of just those objects: a listing never reads every row of a large class.
_OBJECTS = """
WITH objs AS (
    SELECT object_id FROM (
        SELECT object_id FROM do_storage WHERE namespace = $1 AND $2::text IS NULL
        UNION SELECT object_id FROM do_alarms WHERE namespace = $1 AND $2::text IS NULL
        UNION SELECT object_id FROM do_object_names WHERE namespace = $1 AND name LIKE $2 ESCAPE '\\'
    ) ids
    WHERE EXISTS (SELECT 1 FROM do_storage s WHERE s.object_id = ids.object_id)
       OR EXISTS (SELECT 1 FROM do_alarms a WHERE a.object_id = ids.object_id)
)
SELECT o.object_id, o.name, st.keys, st.bytes, st.last_write, a.scheduled_ms AS alarm_ms
FROM (SELECT o.object_id, n.name FROM objs o LEFT JOIN do_object_names n ON n.object_id = o.object_id
      ORDER BY n.name NULLS LAST, o.object_id LIMIT $3) AS o(object_id, name)
LEFT JOIN LATERAL (
    SELECT count(*) AS keys, coalesce(sum(octet_length(s.key) + octet_length(s.value)), 0) AS bytes,
           max(s.written_at) AS last_write
    FROM do_storage s WHERE s.object_id = o.object_id
) st ON true
LEFT JOIN do_alarms a ON a.object_id = o.object_id
ORDER BY o.name NULLS LAST, o.object_id
"""

_STATE = "SELECT key, value FROM do_storage WHERE object_id = $1 AND ($2::bytea IS NULL OR key = $2) ORDER BY key"
_ALARM = "SELECT scheduled_ms FROM do_alarms WHERE object_id = $1"

_ALARMS = """
SELECT a.namespace, a.object_id, n.name, a.scheduled_ms, a.due_ms, a.retry_count
FROM do_alarms a LEFT JOIN do_object_names n ON n.object_id = a.object_id
WHERE ($1::text IS NULL OR a.namespace = $1) AND ($2::bigint IS NULL OR a.due_ms <= $2)
ORDER BY a.due_ms, a.object_id
LIMIT $3
"""

#: an alarm is overdue when its wake-up is this late (runs take a moment to start)
OVERDUE_AFTER_MS = 1000


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def iso_ms(ms: int | None) -> str | None:
    return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


async def list_objects(conn: asyncpg.Connection, namespace: str, prefix: str | None,
                       limit: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(_OBJECTS, namespace, None if prefix is None else _like_prefix(prefix), limit)
    return [{"id": r["object_id"], "name": r["name"], "keys": r["keys"], "bytes": r["bytes"],
             "last_write": r["last_write"].isoformat(timespec="seconds") if r["last_write"] else None,
             "alarm": iso_ms(r["alarm_ms"])} for r in rows]


async def read_state(conn: asyncpg.Connection, object_id: str, key: str | None = None) -> dict[str, Any]:
    """The object's committed storage (or one key of it), decoded."""
    rows = await conn.fetch(_STATE, object_id, None if key is None else key.encode())
    return {bytes(r["key"]).decode(): codec.unpack(r["value"]) for r in rows}


async def read_alarm(conn: asyncpg.Connection, object_id: str) -> int | None:
    """The object's alarm as it set it (epoch milliseconds), or None."""
    value = await conn.fetchval(_ALARM, object_id)
    return None if value is None else int(value)


async def list_alarms(conn: asyncpg.Connection, namespace: str | None, overdue: bool,
                      limit: int) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    rows = await conn.fetch(_ALARMS, namespace, now - OVERDUE_AFTER_MS if overdue else None, limit)
    return [{"namespace": r["namespace"], "id": r["object_id"], "name": r["name"],
             "scheduled": iso_ms(r["scheduled_ms"]), "due": iso_ms(r["due_ms"]),
             "late_s": round(max(0, now - r["due_ms"]) / 1000, 1), "retries": r["retry_count"]} for r in rows]
