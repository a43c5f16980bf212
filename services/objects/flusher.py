"""Group commit: the pending writes of many objects in one Postgres transaction.

Each object's writes are still atomic (its whole pending batch is in one transaction) and each
reply still waits behind its own output gate (``Storage.wait_durable``). While a flush is in
flight, events keep running and their writes gather into the next batch, so a hot object's
consecutive writes coalesce. The first statement of every transaction is the epoch fence:
``SELECT ... FROM do_partitions WHERE (partition, epoch) = ... FOR SHARE``. A partition whose
epoch moved on is stepped down and its objects reset (nothing of theirs is written); the rest
commit without it. The whole flush is one call of the do_flush() SQL function: one round trip.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..core.errors import ObjectReset

if TYPE_CHECKING:
    from .alarms import AlarmRow
    from .host import Worker
    from .storage import Batch, ReplySender, Storage

log = logging.getLogger("durable.flusher")

BatchItem = tuple["Storage", "Batch"]

#: one round trip: fence + every write, as one transaction (infra/migrations/003_alarms.sql)
_FLUSH = ("SELECT do_flush($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, "
          "$20, $21, $22, $23, $24, $25, $26, $27, $28)")


class _Fenced(Exception):
    def __init__(self, partitions: set[int]) -> None:
        self.partitions = partitions


async def _send_replies(replies: list[ReplySender]) -> None:
    for send in replies:
        await send(None)


class _Lane:
    """One flush pipeline: its own dirty set, one transaction in flight at a time."""

    def __init__(self) -> None:
        self.dirty: dict[Storage, None] = {}
        self.wake = asyncio.Event()


class Flusher:
    """Commits dirty objects' batches in ``concurrency`` lanes.

    Partition p always flushes in lane ``p % concurrency``, so concurrent transactions never
    share-lock the same ``do_partitions`` row: two FOR SHARE holders of one row would make
    Postgres create a MultiXact, which costs more than the overlap gains."""

    def __init__(self, worker: Worker, concurrency: int = 1, max_objects: int = 2000) -> None:
        self.worker = worker
        self.concurrency = concurrency
        self.max_objects = max_objects
        self._lanes = [_Lane() for _ in range(concurrency)]
        self._tasks: list[asyncio.Task[None]] = []
        self._senders: set[asyncio.Task[None]] = set()
        self._in_flight: dict[str, asyncio.Event] = {}
        self.commits = 0
        self.rows = 0

    def mark_dirty(self, storage: Storage) -> None:
        lane = self._lanes[storage._instance.partition % self.concurrency]
        lane.dirty[storage] = None
        lane.wake.set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(lane), name=f"flusher-{i}")
                       for i, lane in enumerate(self._lanes)]

    async def replies_sent(self) -> None:
        """Wait for the reply senders of flushes that already committed."""
        while self._senders:
            await asyncio.gather(*list(self._senders), return_exceptions=True)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _run(self, lane: _Lane) -> None:
        while True:
            await lane.wake.wait()
            lane.wake.clear()
            batch = self._take(lane)
            if batch:
                await self._flush(batch)
                lane.wake.set()  # writes made during the flush wait in the dirty set

    def _take(self, lane: _Lane) -> list[BatchItem]:
        taken: list[BatchItem] = []
        for storage in list(lane.dirty):
            if len(taken) >= self.max_objects:
                break
            lane.dirty.pop(storage, None)
            item = storage.take_batch()
            if item is not None:
                taken.append((storage, item))
        return taken

    async def settled(self, object_id: str) -> None:
        """Wait until no flush of ``object_id`` is in flight. A new instance of an object waits
        for the last batch of the instance before it, so it never reads around that write."""
        event = self._in_flight.get(object_id)
        if event is not None:
            await event.wait()

    async def _flush(self, batch: list[BatchItem]) -> None:
        events = {}
        for storage, _ in batch:
            events[storage._object_id] = self._in_flight[storage._object_id] = asyncio.Event()
        try:
            await self._flush_batch(batch)
        finally:
            for object_id, event in events.items():
                if self._in_flight.get(object_id) is event:
                    del self._in_flight[object_id]
                event.set()

    async def _flush_batch(self, batch: list[BatchItem]) -> None:
        while batch:
            try:
                await self._commit(batch)
            except _Fenced as fenced:
                stale = {item[0]._instance.partition: item[0]._instance.epoch for item in batch
                         if item[0]._instance.partition in fenced.partitions}
                keep = []
                for item in batch:
                    storage = item[0]
                    if storage._instance.partition in fenced.partitions:
                        storage._instance.fail(ObjectReset(
                            f"partition {storage._instance.partition} was taken over by another worker; "
                            "the write was not committed"))
                    else:
                        keep.append(item)
                for p, epoch in stale.items():
                    # a slow batch may be fenced on an epoch we already stepped down from and
                    # re-acquired since: only the ownership it was written under steps down
                    if self.worker.ownership.epochs.get(p) == epoch:
                        self.worker.step_down(p, "fenced: its epoch was superseded")
                batch = keep
                continue
            except Exception as exc:  # noqa: BLE001 - any commit failure resets the objects involved
                log.warning("flush of %d objects failed: %s: %s", len(batch), type(exc).__name__, exc)
                error = ObjectReset(f"Durable Object reset because its storage write failed: {exc}")
                for storage, _ in batch:
                    storage._instance.fail(error)
                return
            replies: list[ReplySender] = []
            scheduled: list[tuple[int, str, str, AlarmRow]] = []
            for storage, done in batch:
                replies.extend(storage.flushed(done.seq))
                if done.alarm_changed and done.alarm is not None:
                    inst = storage._instance
                    scheduled.append((inst.partition, inst.object_id, inst.namespace, done.alarm))
            if scheduled:
                self.worker.alarms.committed(scheduled)
            if replies:
                # sent by a task of their own, so the next flush starts at once
                task = asyncio.get_running_loop().create_task(_send_replies(replies))
                self._senders.add(task)
                task.add_done_callback(self._senders.discard)
            return

    async def _commit(self, batch: list[BatchItem]) -> None:
        epochs: dict[int, int] = {}
        wiped: list[str] = []
        del_o: list[str] = []
        del_k: list[bytes] = []
        up_o: list[str] = []
        up_k: list[bytes] = []
        up_ns: list[str] = []
        up_v: list[bytes] = []
        alarm_del: list[str] = []
        alarm_o: list[str] = []
        alarm_ns: list[str] = []
        alarm_p: list[int] = []
        alarm_sched: list[int] = []
        alarm_due: list[int] = []
        alarm_gen: list[int] = []
        alarm_retry: list[int] = []
        sock_del: list[str] = []
        sock: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [], [])
        for storage, b in batch:
            inst = storage._instance
            epochs[inst.partition] = inst.epoch
            if b.delete_all:
                wiped.append(inst.object_id)
            if b.alarm_changed:
                row = b.alarm
                if row is None:
                    alarm_del.append(inst.object_id)
                else:
                    alarm_o.append(inst.object_id)
                    alarm_ns.append(inst.namespace)
                    alarm_p.append(inst.partition)
                    alarm_sched.append(row.scheduled_ms)
                    alarm_due.append(row.due_ms)
                    alarm_gen.append(row.generation)
                    alarm_retry.append(row.retry_count)
            for socket_id, srow in b.sockets.items():
                if srow is None:
                    sock_del.append(socket_id)
                else:
                    for column, value in zip(sock, (socket_id, inst.object_id, inst.namespace, inst.partition,
                                                    *srow), strict=True):
                        column.append(value)
            for k, v in b.writes.items():
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
            ok = await conn.fetchval(_FLUSH, parts, eps, wiped, del_o, del_k, up_o, up_k, up_ns, up_v,
                                     alarm_del, alarm_o, alarm_ns, alarm_p, alarm_sched, alarm_due, alarm_gen,
                                     alarm_retry, sock_del, *sock,
                                     self.worker.worker_id if self.worker.audit_commits else None)
        if len(ok) != len(parts):
            raise _Fenced(set(parts) - set(ok))
        self.commits += 1
        self.rows += len(up_o) + len(del_o) + len(alarm_o) + len(alarm_del) + len(sock_del) + len(sock[0])
