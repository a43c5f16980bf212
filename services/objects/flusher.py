"""Group commit: the pending writes of many objects in one Postgres transaction.

Each object's writes are still atomic (its whole pending batch is in one transaction) and each
reply still waits behind its own output gate (``Storage.wait_durable``). While a flush is in
flight, events keep running and their writes gather into the next batch, so a hot object's
consecutive writes coalesce. The first statement of every transaction is the epoch fence:
``SELECT ... FROM do_partitions WHERE (partition, epoch) = ... FOR SHARE``. A partition whose
epoch moved on is stepped down and its objects fail with NotOwner; the rest commit without it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import asyncpg

from ..core.errors import ObjectReset

if TYPE_CHECKING:
    from .host import Worker
    from .storage import Storage

log = logging.getLogger("durable.flusher")

_FENCE = """
SELECT d.partition FROM do_partitions d
JOIN unnest($1::int[], $2::bigint[]) AS u(p, e) ON d.partition = u.p AND d.epoch = u.e
ORDER BY d.partition
FOR SHARE OF d
"""
_DELETE_ALL = "DELETE FROM do_storage WHERE object_id = ANY($1::text[])"
_DELETE_ALL_ALARMS = "DELETE FROM do_alarms WHERE object_id = ANY($1::text[])"
_DELETE = """
DELETE FROM do_storage s USING unnest($1::text[], $2::bytea[]) AS d(o, k)
WHERE s.object_id = d.o AND s.key = d.k
"""
_UPSERT = """
INSERT INTO do_storage (object_id, key, namespace, value)
SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::bytea[])
ON CONFLICT (object_id, key) DO UPDATE SET value = EXCLUDED.value
"""
_AUDIT = """
INSERT INTO do_commit_audit (partition, epoch, worker_id)
SELECT p, e, $3 FROM unnest($1::int[], $2::bigint[]) AS u(p, e)
"""


class _Fenced(Exception):
    def __init__(self, partitions: set[int]) -> None:
        self.partitions = partitions


class Flusher:
    """Commits dirty objects' batches; ``concurrency`` transactions may be in flight at once."""

    def __init__(self, worker: Worker, concurrency: int = 2, max_objects: int = 2000) -> None:
        self.worker = worker
        self.concurrency = concurrency
        self.max_objects = max_objects
        self._dirty: dict[Storage, None] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.commits = 0
        self.rows = 0

    def mark_dirty(self, storage: Storage) -> None:
        self._dirty[storage] = None
        self._wake.set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(), name=f"flusher-{i}") for i in range(self.concurrency)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            batch = self._take()
            if not batch:
                self._wake.clear()
                continue
            await self._flush(batch)

    def _take(self) -> list[tuple[Storage, bool, dict[bytes, bytes | None], int]]:
        taken = []
        for storage in list(self._dirty):
            if len(taken) >= self.max_objects:
                break
            item = storage.take_batch()
            if item is None:
                if not storage.has_unflushed or storage.closed is not None:
                    self._dirty.pop(storage, None)
                continue
            self._dirty.pop(storage, None)
            taken.append((storage, *item))
        return taken

    async def _flush(self, batch: list[tuple[Storage, bool, dict[bytes, bytes | None], int]]) -> None:
        while batch:
            try:
                await self._commit(batch)
            except _Fenced as fenced:
                keep = []
                for item in batch:
                    storage = item[0]
                    if storage._instance.partition in fenced.partitions:
                        storage._instance.fail(ObjectReset(
                            f"partition {storage._instance.partition} was taken over by another worker; "
                            "the write was not committed"))
                    else:
                        keep.append(item)
                for p in fenced.partitions:
                    self.worker.step_down(p, "fenced: its epoch was superseded")
                batch = keep
                continue
            except Exception as exc:  # noqa: BLE001 - any commit failure resets the objects involved
                log.warning("flush of %d objects failed: %s: %s", len(batch), type(exc).__name__, exc)
                error = ObjectReset(f"Durable Object reset because its storage write failed: {exc}")
                for storage, *_ in batch:
                    storage._instance.fail(error)
                return
            for storage, _, _, seq in batch:
                storage.flushed(seq)
            return

    async def _commit(self, batch: list[tuple[Storage, bool, dict[bytes, bytes | None], int]]) -> None:
        epochs: dict[int, int] = {}
        wiped: list[str] = []
        del_o: list[str] = []
        del_k: list[bytes] = []
        up_o: list[str] = []
        up_k: list[bytes] = []
        up_ns: list[str] = []
        up_v: list[bytes] = []
        for storage, delete_all, writes, _ in batch:
            inst = storage._instance
            epochs[inst.partition] = inst.epoch
            if delete_all:
                wiped.append(inst.object_id)
            for k, v in writes.items():
                if v is None:
                    del_o.append(inst.object_id)
                    del_k.append(k)
                else:
                    up_o.append(inst.object_id)
                    up_k.append(k)
                    up_ns.append(inst.namespace)
                    up_v.append(v)
        parts = sorted(epochs)
        eps = [epochs[p] for p in parts]
        async with self.worker.pool.acquire() as conn:
            conn: asyncpg.Connection
            async with conn.transaction():
                rows = await conn.fetch(_FENCE, parts, eps)
                if len(rows) != len(parts):
                    raise _Fenced(set(parts) - {r[0] for r in rows})
                if wiped:
                    await conn.execute(_DELETE_ALL, wiped)
                    await conn.execute(_DELETE_ALL_ALARMS, wiped)
                if del_o:
                    await conn.execute(_DELETE, del_o, del_k)
                if up_o:
                    await conn.execute(_UPSERT, up_o, up_k, up_ns, up_v)
                if self.worker.audit_commits:
                    await conn.execute(_AUDIT, parts, eps, self.worker.worker_id)
        self.commits += 1
        self.rows += len(up_o) + len(del_o)
