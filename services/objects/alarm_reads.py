"""Alarm rows for many wake-ups in one query.

Every wake-up of an object that is not live reads its ``do_alarms`` row first (is the alarm
still the one this fire was published for?), so it does not build the object for a stale one.
Wake-ups come in bursts (thousands due in the same second), and one round trip per wake-up
made Postgres the limit: a burst of N fires cost N statements and N pool acquisitions. Here
the reads asked for while a query is in flight wait and go together in the next one, as the
flusher does with writes: one query per round trip however many fires arrive, at most
``max_in_flight`` queries at once, so an idle worker still answers a lone fire at once.
"""

from __future__ import annotations

import asyncio

from ..core.tasks import TaskSet
from .alarm_rules import AlarmRow
from .sql import ObjectStore


class AlarmRowReader:
    """``await reader.read(object_id)``: the object's alarm row (None: no alarm)."""

    def __init__(self, store: ObjectStore, max_batch: int = 2000, max_in_flight: int = 2) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._waiting: dict[str, list[asyncio.Future[AlarmRow | None]]] = {}
        self._in_flight = 0
        self._tasks = TaskSet()
        #: queries made and rows asked for (the ratio is the batching achieved)
        self.queries = 0
        self.reads = 0

    async def read(self, object_id: str) -> AlarmRow | None:
        future: asyncio.Future[AlarmRow | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(object_id, []).append(future)
        self.reads += 1
        if self._in_flight < self.max_in_flight:
            self._in_flight += 1
            self._tasks.spawn(self._drain(), "alarm-row-reads")
        return await future

    async def _drain(self) -> None:
        """Query what is waiting, and what waits by the time that query is back, until nothing does."""
        try:
            await asyncio.sleep(0)  # the fires delivered in this same loop iteration join the first query
            while self._waiting:
                batch = dict(list(self._waiting.items())[:self.max_batch])
                for object_id in batch:
                    del self._waiting[object_id]
                self.queries += 1
                try:
                    rows = await self.store.read_alarms(list(batch))
                except BaseException as exc:
                    for futures in batch.values():
                        for f in futures:
                            if not f.done():
                                f.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for object_id, futures in batch.items():
                    row = rows.get(object_id)
                    for f in futures:
                        if not f.done():  # its fire may have given up (cancelled)
                            f.set_result(row)
        finally:
            self._in_flight -= 1

    async def close(self) -> None:
        await self._tasks.cancel()
