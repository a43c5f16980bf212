"""Group commit: the pending writes of many objects in one Postgres transaction.

Each object's writes are still atomic (its whole pending batch is in one transaction) and each
reply still waits behind its own output gate (output_gate.py). While a flush is in
flight, events keep running and their writes gather into the next batch, so a hot object's
consecutive writes coalesce. The first statement of every transaction is the epoch fence:
``SELECT ... FROM do_partitions WHERE (partition, epoch) = ... FOR SHARE``. A partition whose
epoch moved on is stepped down and its objects reset (nothing of theirs is written); the rest
commit without it. The whole flush is one call of the do_flush() SQL function: one round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, SpanKind

from ..core import telemetry
from ..core.errors import ObjectReset
from ..core.logs import ranges
from ..core.metrics import WorkerMetrics
from ..core.tasks import TaskSet
from .alarm_rules import AlarmRow
from .output_gate import ReplySender
from .pending import Batch
from .sql import ObjectStore, Owner, flush_rows

log = logging.getLogger("durable.flusher")


class Flushable(Protocol):
    """An object with writes to commit (instance.py implements it)."""

    owner: Owner
    #: span contexts of traced events waiting for the next flush; None (almost always): none
    flush_traces: list[SpanContext] | None

    def take_batch(self) -> Batch | None:
        """Its pending writes; None when there are none or a flush of it is in flight."""

    def flushed(self, seq: int) -> list[ReplySender]:
        """Its writes up to ``seq`` committed: the replies now free to go."""

    def fail(self, error: BaseException) -> None:
        """Its writes were not committed: reset it."""

    def take_traces(self) -> list[SpanContext]:
        """The span contexts of traced events waiting for this flush (usually none)."""


BatchItem = tuple[Flushable, Batch]
#: an alarm row just committed: (partition, object id, namespace, row)
CommittedAlarm = tuple[int, str, str, AlarmRow]


class _Fenced(Exception):
    def __init__(self, partitions: set[int]) -> None:
        self.partitions = partitions


async def _send_replies(replies: list[ReplySender]) -> None:
    for send in replies:
        await send(None)


class _Lane:
    """One flush pipeline: its own dirty set, one transaction in flight at a time."""

    def __init__(self) -> None:
        self.dirty: dict[Flushable, None] = {}
        self.wake = asyncio.Event()


class Flusher:
    """Commits dirty objects' batches in ``concurrency`` lanes.

    Partition p always flushes in lane ``p % concurrency``, so concurrent transactions never
    share-lock the same ``do_partitions`` row: two FOR SHARE holders of one row would make
    Postgres create a MultiXact, which costs more than the overlap gains."""

    def __init__(self, store: ObjectStore, on_fenced: Callable[[int, int], None],
                 on_alarms: Callable[[list[CommittedAlarm]], None], audit_worker: str | None = None,
                 concurrency: int = 1, max_objects: int = 2000, metrics: WorkerMetrics | None = None,
                 on_events: Callable[[], None] | None = None) -> None:
        self.store = store
        #: outbox rows (ctx.emit) just committed: the event publisher is woken (outbox.py)
        self._on_events = on_events
        self.metrics = metrics
        #: (partition, epoch) whose epoch was superseded: the worker steps down from it
        self._on_fenced = on_fenced
        #: alarm rows just committed: their wake-ups are published
        self._on_alarms = on_alarms
        self.audit_worker = audit_worker
        self.concurrency = concurrency
        self.max_objects = max_objects
        self._lanes = [_Lane() for _ in range(concurrency)]
        self._tasks: list[asyncio.Task[None]] = []
        self._senders = TaskSet()
        self._in_flight: dict[str, asyncio.Event] = {}
        self.commits = 0
        self.rows = 0
        #: partitions stepped down from because a flush found their epoch superseded
        self.fenced = 0

    def mark_dirty(self, obj: Flushable) -> None:
        lane = self._lanes[obj.owner.partition % self.concurrency]
        lane.dirty[obj] = None
        lane.wake.set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(lane), name=f"flusher-{i}")
                       for i, lane in enumerate(self._lanes)]

    async def replies_sent(self) -> None:
        """Wait for the reply senders of flushes that already committed."""
        await self._senders.join()

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
        for obj in list(lane.dirty):
            if len(taken) >= self.max_objects:
                break
            lane.dirty.pop(obj, None)
            item = obj.take_batch()
            if item is not None:
                taken.append((obj, item))
        return taken

    async def settled(self, object_id: str) -> None:
        """Wait until no flush of ``object_id`` is in flight. A new instance of an object waits
        for the last batch of the instance before it, so it never reads around that write."""
        event = self._in_flight.get(object_id)
        if event is not None:
            await event.wait()

    async def _flush(self, batch: list[BatchItem]) -> None:
        events = {}
        for obj, _ in batch:
            oid = obj.owner.object_id
            events[oid] = self._in_flight[oid] = asyncio.Event()
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
                stale = {obj.owner.partition: obj.owner.epoch for obj, _ in batch
                         if obj.owner.partition in fenced.partitions}
                keep = []
                for item in batch:
                    obj = item[0]
                    if obj.owner.partition in fenced.partitions:
                        obj.fail(ObjectReset(f"partition {obj.owner.partition} was taken over by another worker; "
                                             "the write was not committed"))
                    else:
                        keep.append(item)
                self.fenced += len(stale)
                for p, epoch in stale.items():
                    # a slow batch may be fenced on an epoch we already stepped down from and
                    # re-acquired since: only the ownership it was written under steps down
                    self._on_fenced(p, epoch)
                batch = keep
                continue
            except Exception as exc:  # noqa: BLE001 - any commit failure resets the objects involved
                log.warning("flush of %d objects failed: %s: %s", len(batch), type(exc).__name__, exc,
                            extra={"partitions": ranges({obj.owner.partition for obj, _ in batch}),
                                   "count": len(batch)})
                error = ObjectReset(f"Durable Object reset because its storage write failed: {exc}")
                for obj, _ in batch:
                    obj.fail(error)
                return
            replies: list[ReplySender] = []
            scheduled: list[CommittedAlarm] = []
            if self._on_events is not None and any(done.events for _, done in batch):
                self._on_events()
            for obj, done in batch:
                replies.extend(obj.flushed(done.seq))
                if done.alarm_changed and done.alarm is not None:
                    owner = obj.owner
                    scheduled.append((owner.partition, owner.object_id, owner.namespace, done.alarm))
            if scheduled:
                self._on_alarms(scheduled)
            if replies:
                # sent by a task of their own, so the next flush starts at once
                self._senders.spawn(_send_replies(replies), "replies")
            return

    async def _commit(self, batch: list[BatchItem]) -> None:
        rows = flush_rows([(obj.owner, b) for obj, b in batch], self.audit_worker)
        traced = [c for obj, _ in batch if obj.flush_traces for c in obj.take_traces()]
        started = time.perf_counter()
        if traced:  # the first traced event is the parent, the others are linked
            with telemetry.tracer.start_as_current_span(
                "flush", context=trace.set_span_in_context(trace.NonRecordingSpan(traced[0])),
                kind=SpanKind.CLIENT, links=[Link(c) for c in traced[1:]],
                attributes={"db.system": "postgresql", "db.operation": "do_flush",
                            "do.flush.objects": len(batch), "do.flush.rows": rows.row_count},
            ):
                ok = await self.store.flush(rows)
        else:
            ok = await self.store.flush(rows)
        if self.metrics is not None:
            self.metrics.flush_seconds.observe(time.perf_counter() - started)
            self.metrics.flush_objects.observe(len(batch))
            self.metrics.flush_rows.inc(rows.row_count)
        if len(ok) != len(rows.parts):
            raise _Fenced(set(rows.parts) - ok)
        self.commits += 1
        self.rows += rows.row_count
