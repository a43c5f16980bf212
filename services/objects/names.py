"""The names objects were made from, kept for operators (``durable objects ls --prefix``).

An object id is a keyed hash of its name, so the id alone never says which name it came from.
When a request reaches a live object with a name the worker has checked against its id, the
worker notes the name here; a background task writes the notes in batches, outside any event
and any flush, so naming costs the request path one set insertion per new instance. The table
is a hint, not state: a name is a fact about an id (any worker writing it writes the same row),
so no fencing is needed, and a name lost in a crash comes back the next time it is used.
"""

from __future__ import annotations

import asyncio
import logging

from .sql import ObjectStore

log = logging.getLogger("durable.worker")

#: names noted but not written are dropped beyond this (an operator's hint, never a memory leak)
MAX_PENDING = 10_000
#: ids remembered as written (so a busy object is not written again); forgotten beyond this
MAX_KNOWN = 50_000


class NameRecorder:
    """Notes (namespace, object id, name) and writes them every ``period`` seconds."""

    def __init__(self, store: ObjectStore, period: float = 1.0) -> None:
        self.store = store
        self.period = period
        self._pending: set[tuple[str, str, str]] = set()
        #: ids written already by this worker (not written again)
        self._known: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def note(self, namespace: str, object_id: str, name: str) -> None:
        if object_id not in self._known and len(self._pending) < MAX_PENDING:
            self._pending.add((namespace, object_id, name))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="names")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.write()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            await self.write()

    async def write(self) -> None:
        """Write what was noted; on failure the notes are kept for the next round."""
        if not self._pending:
            return
        batch, self._pending = self._pending, set()
        try:
            await self.store.record_names(sorted(batch))
        except Exception as exc:  # noqa: BLE001 - Postgres away: try again next round
            log.debug("could not record %d object names: %s", len(batch), exc)
            self._pending |= set(list(batch)[: MAX_PENDING - len(self._pending)])
            return
        self._known.update(oid for _, oid, _ in batch)
        if len(self._known) > MAX_KNOWN:  # about 7 MB: start over (a repeat write is a no-op)
            self._known.clear()
