"""Every SQL statement the object side runs (ownership's lock session has its own, in
ownership.py): storage reads, alarm and socket reads, and the flush.

A flush is one call of the ``do_flush`` function (infra/migrations): the epoch fence and every
write of many objects in one round trip. Its arguments are column arrays, built by the pure
:func:`flush_rows` and passed by name, so a column can never slide into its neighbour's place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import asyncpg

from ..core.errors import StorageUnavailable
from .alarm_rules import AlarmRow
from .pending import Batch, IdempotencyRecord

_READ_KEYS = "SELECT key, value FROM do_storage WHERE object_id = $1 AND key = ANY($2::bytea[])"
_READ_RANGE = (
    "SELECT key, value FROM do_storage WHERE object_id = $1 AND key >= $2 "
    "AND ($3::bytea IS NULL OR key < $3) ORDER BY key {order} LIMIT $4"
)
_RECORD_NAMES = """
INSERT INTO do_object_names (namespace, object_id, name)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT (object_id) DO NOTHING
"""
_READ_IDEMPOTENCY = (
    "SELECT fingerprint, reply, expires_ms FROM do_idempotency "
    "WHERE object_id = $1 AND idem_key = $2 AND expires_ms > $3"
)
#: the highest idempotency key with a prefix (stream messages: messages.py), expired or not
_LAST_KEY = (
    'SELECT max(idem_key COLLATE "C") FROM do_idempotency WHERE object_id = $1 AND starts_with(idem_key, $2)'
)
#: a bounded pass: a backlog is worked off over several sweeps, never in one long statement
_SWEEP_IDEMPOTENCY = (
    "DELETE FROM do_idempotency WHERE ctid = ANY(ARRAY(SELECT ctid FROM do_idempotency "
    "WHERE partition = ANY($1::int[]) AND expires_ms <= $2 LIMIT $3))"
)
#: the oldest unpublished events of some partitions, in (object, seq) order from the objects after
#: $5 (a cursor, so every object with a backlog gets its turn), at most $2 rows and (after the
#: first) about $3 bytes of payload, leaving out the objects $4 (waiting to retry): a backlog is
#: read a bounded slice at a time, along the primary key (no scan of the whole backlog)
_READ_OUTBOX = """
SELECT object_id, seq, subject, msg_id, payload, headers FROM (
    SELECT object_id, seq, subject, msg_id, payload, headers,
           sum(octet_length(payload)) OVER (ORDER BY object_id, seq ROWS UNBOUNDED PRECEDING)
               - octet_length(payload) AS before
    FROM do_outbox
    WHERE partition = ANY($1::int[]) AND object_id > $5 AND NOT (object_id = ANY($4::text[]))
    ORDER BY object_id, seq LIMIT $2
) o WHERE before < $3 OR before = 0
"""
#: events published: each object's up to the seq given (without waiting for the WAL flush: see
#: infra/migrations/006_outbox_published.sql)
_DELETE_OUTBOX = "SELECT do_outbox_published($1::text[], $2::bigint[])"
_READ_SOCKETS = (
    "SELECT socket_id, gateway, tags, attachment, auto_request, auto_response FROM do_sockets "
    "WHERE object_id = $1 ORDER BY accepted_at, socket_id"
)
_READ_ALARM = "SELECT scheduled_ms, due_ms, generation, retry_count FROM do_alarms WHERE object_id = $1"
_READ_ALARMS = (
    "SELECT object_id, scheduled_ms, due_ms, generation, retry_count FROM do_alarms "
    "WHERE object_id = ANY($1::text[])"
)
_READ_DUE = (
    "SELECT object_id, namespace, partition, due_ms, generation FROM do_alarms "
    "WHERE partition = ANY($1::int[]) AND due_ms <= $2 ORDER BY due_ms LIMIT $3"
)
_SOCKETS_OF_LOST_GATEWAYS = (
    "SELECT socket_id, object_id, namespace, partition FROM do_sockets "
    "WHERE partition = ANY($1::int[]) AND NOT (gateway = ANY($2::text[])) LIMIT 10000"
)


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose writes a batch item is: the object and the ownership it was written under."""

    object_id: str
    namespace: str
    partition: int
    epoch: int


@dataclass
class FlushRows:
    """The arguments of ``do_flush``, named as its parameters are."""

    parts: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    wiped: list[str] = field(default_factory=list)
    del_o: list[str] = field(default_factory=list)
    del_k: list[bytes] = field(default_factory=list)
    up_o: list[str] = field(default_factory=list)
    up_k: list[bytes] = field(default_factory=list)
    up_ns: list[str] = field(default_factory=list)
    up_v: list[bytes] = field(default_factory=list)
    alarm_del: list[str] = field(default_factory=list)
    alarm_o: list[str] = field(default_factory=list)
    alarm_ns: list[str] = field(default_factory=list)
    alarm_p: list[int] = field(default_factory=list)
    alarm_sched: list[int] = field(default_factory=list)
    alarm_due: list[int] = field(default_factory=list)
    alarm_gen: list[int] = field(default_factory=list)
    alarm_retry: list[int] = field(default_factory=list)
    sock_del: list[str] = field(default_factory=list)
    sock_id: list[str] = field(default_factory=list)
    sock_o: list[str] = field(default_factory=list)
    sock_ns: list[str] = field(default_factory=list)
    sock_p: list[int] = field(default_factory=list)
    sock_gw: list[str] = field(default_factory=list)
    sock_tags: list[str] = field(default_factory=list)
    sock_att: list[bytes | None] = field(default_factory=list)
    sock_auto_req: list[str | None] = field(default_factory=list)
    sock_auto_res: list[str | None] = field(default_factory=list)
    idem_o: list[str] = field(default_factory=list)
    idem_k: list[str] = field(default_factory=list)
    idem_ns: list[str] = field(default_factory=list)
    idem_p: list[int] = field(default_factory=list)
    idem_fp: list[str] = field(default_factory=list)
    idem_reply: list[bytes | None] = field(default_factory=list)
    idem_exp: list[int] = field(default_factory=list)
    #: outbox rows (ctx.emit), in emit order: do_flush numbers them per object in this order
    evt_o: list[str] = field(default_factory=list)
    evt_p: list[int] = field(default_factory=list)
    evt_subject: list[str] = field(default_factory=list)
    evt_payload: list[bytes] = field(default_factory=list)
    evt_headers: list[str | None] = field(default_factory=list)
    #: records each commit in do_commit_audit (tests of fencing), or None
    audit_worker: str | None = None

    @property
    def row_count(self) -> int:
        return (len(self.up_o) + len(self.del_o) + len(self.alarm_o) + len(self.alarm_del) + len(self.sock_del)
                + len(self.sock_id) + len(self.idem_o) + len(self.evt_o))


_FLUSH_PARAMS = [f.name for f in fields(FlushRows)]
_FLUSH = "SELECT do_flush(" + ", ".join(f"{name} => ${i}" for i, name in enumerate(_FLUSH_PARAMS, 1)) + ")"


def flush_rows(items: list[tuple[Owner, Batch]], audit_worker: str | None = None) -> FlushRows:
    """The column arrays of one flush of many objects' batches."""
    rows = FlushRows(audit_worker=audit_worker)
    epochs: dict[int, int] = {}
    for owner, b in items:
        oid = owner.object_id
        epochs[owner.partition] = owner.epoch
        if b.delete_all:
            rows.wiped.append(oid)
        if b.alarm_changed:
            alarm = b.alarm
            if alarm is None:
                rows.alarm_del.append(oid)
            else:
                rows.alarm_o.append(oid)
                rows.alarm_ns.append(owner.namespace)
                rows.alarm_p.append(owner.partition)
                rows.alarm_sched.append(alarm.scheduled_ms)
                rows.alarm_due.append(alarm.due_ms)
                rows.alarm_gen.append(alarm.generation)
                rows.alarm_retry.append(alarm.retry_count)
        for socket_id, srow in b.sockets.items():
            if srow is None:
                rows.sock_del.append(socket_id)
                continue
            gateway, tags, attachment, auto_request, auto_response = srow
            rows.sock_id.append(socket_id)
            rows.sock_o.append(oid)
            rows.sock_ns.append(owner.namespace)
            rows.sock_p.append(owner.partition)
            rows.sock_gw.append(gateway)
            rows.sock_tags.append(tags)
            rows.sock_att.append(attachment)
            rows.sock_auto_req.append(auto_request)
            rows.sock_auto_res.append(auto_response)
        for key, record in b.idempotency.items():
            rows.idem_o.append(oid)
            rows.idem_k.append(key)
            rows.idem_ns.append(owner.namespace)
            rows.idem_p.append(owner.partition)
            rows.idem_fp.append(record.fingerprint)
            rows.idem_reply.append(record.reply)
            rows.idem_exp.append(record.expires_ms)
        for event in b.events:
            rows.evt_o.append(oid)
            rows.evt_p.append(owner.partition)
            rows.evt_subject.append(event.subject)
            rows.evt_payload.append(event.payload)
            rows.evt_headers.append(event.headers)
        for k, v in b.writes.items():
            if v is None:
                rows.del_o.append(oid)
                rows.del_k.append(k)
            else:
                rows.up_o.append(oid)
                rows.up_k.append(k)
                rows.up_ns.append(owner.namespace)
                rows.up_v.append(v)
    rows.parts = sorted(epochs)
    rows.epochs = [epochs[p] for p in rows.parts]
    return rows


class ObjectStore:
    """The object side's Postgres statements, on the worker's pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def _read(self, sql: str, *args: Any) -> list[Any]:
        """A storage read; Postgres trouble is the runtime's, not the object's: a retryable error."""
        try:
            async with self.pool.acquire() as conn:
                return list(await conn.fetch(sql, *args))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageUnavailable(f"storage read failed: {type(exc).__name__}: {exc}") from None

    async def read_keys(self, object_id: str, keys: list[bytes]) -> list[Any]:
        return await self._read(_READ_KEYS, object_id, keys)

    async def read_range(self, object_id: str, lo: bytes, hi: bytes | None, reverse: bool,
                         limit: int | None) -> list[Any]:
        return await self._read(_READ_RANGE.format(order="DESC" if reverse else "ASC"), object_id, lo, hi, limit)

    async def read_alarm(self, object_id: str) -> AlarmRow | None:
        rows = await self._read(_READ_ALARM, object_id)
        if not rows:
            return None
        r = rows[0]
        return AlarmRow(r["scheduled_ms"], r["due_ms"], r["generation"], r["retry_count"])

    async def read_idempotency(self, object_id: str, key: str, now_ms: int) -> IdempotencyRecord | None:
        """The unexpired record of ``key`` for the object, if a call with it committed."""
        rows = await self._read(_READ_IDEMPOTENCY, object_id, key, now_ms)
        if not rows:
            return None
        r = rows[0]
        return IdempotencyRecord(r["fingerprint"], r["reply"], r["expires_ms"])

    async def last_key(self, object_id: str, prefix: str) -> str | None:
        """The object's highest recorded idempotency key starting with ``prefix``, if any."""
        rows = await self._read(_LAST_KEY, object_id, prefix)
        return rows[0][0] if rows else None

    async def sweep_idempotency(self, partitions: list[int], now_ms: int, limit: int) -> int:
        """Delete up to ``limit`` expired idempotency records of ``partitions``; returns how many."""
        async with self.pool.acquire() as conn:
            status = await conn.execute(_SWEEP_IDEMPOTENCY, partitions, now_ms, limit)
        return int(status.split()[-1])

    async def read_outbox(self, partitions: list[int], limit: int, max_bytes: int, skip: list[str],
                          after: str) -> list[Any]:
        """Unpublished events of ``partitions``, oldest first per object, of the objects after
        ``after`` but those of ``skip`` (outbox.py)."""
        async with self.pool.acquire() as conn:
            return list(await conn.fetch(_READ_OUTBOX, partitions, limit, max_bytes, skip, after))

    async def delete_outbox(self, object_ids: list[str], upto: list[int]) -> None:
        """Each object's events up to its ``upto`` seq were published: they go."""
        async with self.pool.acquire() as conn:
            await conn.execute(_DELETE_OUTBOX, object_ids, upto)

    async def read_alarms(self, object_ids: list[str]) -> dict[str, AlarmRow]:
        """The alarm rows of many objects in one statement (alarm_reads.py); no row: no alarm."""
        rows = await self._read(_READ_ALARMS, object_ids)
        return {r["object_id"]: AlarmRow(r["scheduled_ms"], r["due_ms"], r["generation"], r["retry_count"])
                for r in rows}

    async def read_sockets(self, object_id: str) -> list[Any]:
        return await self._read(_READ_SOCKETS, object_id)

    async def read_due_alarms(self, partitions: list[int], due_by_ms: int, limit: int) -> list[Any]:
        async with self.pool.acquire() as conn:
            return list(await conn.fetch(_READ_DUE, partitions, due_by_ms, limit))

    async def sockets_of_lost_gateways(self, partitions: list[int], live_gateways: list[str]) -> list[Any]:
        async with self.pool.acquire() as conn:
            return list(await conn.fetch(_SOCKETS_OF_LOST_GATEWAYS, partitions, live_gateways))

    async def record_names(self, rows: list[tuple[str, str, str]]) -> None:
        """(namespace, object id, name) rows for operators (names.py); one statement."""
        async with self.pool.acquire() as conn:
            await conn.execute(_RECORD_NAMES, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])

    async def flush(self, rows: FlushRows) -> set[int]:
        """Commit ``rows`` if every partition's epoch is still the one given; returns the
        partitions whose epoch matched (all of them, or the commit did not happen)."""
        async with self.pool.acquire() as conn:
            try:
                ok = await conn.fetchval(_FLUSH, *(getattr(rows, name) for name in _FLUSH_PARAMS))
            except TimeoutError:
                # the server did not answer within command_timeout: it may never (a primary that
                # hangs). Released as it is, the connection would hold this flush lane while its
                # cancel request waits for that server too; the commit's outcome is unknown either way
                conn.terminate()
                raise
        return set(ok)
