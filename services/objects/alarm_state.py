"""One object's alarm as its live instance knows it, and the state of a running alarm handler.

The instance is the only writer of its alarm row, so the row is read at most once per instance
and kept. While the handler runs, ``get_alarm()`` reports None unless the handler (or an event
interleaved with it) set or deleted the alarm, and such a change replaces the retry a failing
run would otherwise schedule (Cloudflare's semantics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .alarm_rules import AlarmRow, new_alarm, now_ms
from .pending import PendingWrites
from .sql import ObjectStore


class ObjectAlarm:
    __slots__ = ("_object_id", "_store", "_pending", "_check_open", "_can_set", "_row", "_known", "_wipes",
                 "running", "_touched")

    def __init__(self, object_id: str, store: ObjectStore, pending: PendingWrites, check_open: Callable[[], None],
                 can_set: Callable[[], None]) -> None:
        self._object_id = object_id
        self._store = store
        self._pending = pending
        self._check_open = check_open
        #: raises when the object may not set an alarm (its class has no alarm() handler)
        self._can_set = can_set
        self._row: AlarmRow | None = None
        self._known = False
        #: bumped by a wipe, so a read in flight across it is discarded
        self._wipes = 0
        #: an alarm handler is running / it (or anything else) set or deleted the alarm meanwhile
        self.running = False
        self._touched = False

    async def load(self) -> AlarmRow | None:
        """The stored alarm row (read once per instance)."""
        if not self._known:
            wipes = self._wipes
            row = await self._store.read_alarm(self._object_id)
            self._check_open()
            if not self._known and wipes == self._wipes:
                self._row = row
                self._known = True
        return self._row

    def prime(self, row: AlarmRow | None) -> None:
        """The row as just read by the runtime, for a fresh instance (saves the alarm event a read)."""
        if not self._known and not self._pending.alarm_changed:
            self._row = row
            self._known = True

    async def get(self) -> int | None:
        """The alarm's time in epoch ms, or None; None inside the running handler unless
        something set a new alarm meanwhile."""
        if self.running and not self._touched:
            return None
        row = await self.load()
        return None if row is None else row.scheduled_ms

    def new_row(self, when: Any) -> AlarmRow:
        self._can_set()
        return new_alarm(when, now_ms())

    def write(self, row: AlarmRow | None) -> None:
        """Stage the alarm row (None deletes it) as a write of the current event."""
        if row is None and self._known and self._row is None and not self.running:
            return  # nothing stored, nothing to delete
        self._row = row
        self._known = True
        if self.running:
            self._touched = True
        self._pending.set_alarm(row)

    def wiped(self) -> None:
        """delete_all() deleted the alarm row too (Cloudflare, since 2026-02-24)."""
        self._wipes += 1
        self._row = None
        self._known = True
        if self.running:
            self._touched = True

    def changed_since(self, generation: int) -> bool:
        """This instance knows of a newer alarm (or none) than the stored ``generation``."""
        return self._known and (self._row is None or self._row.generation != generation)

    def begin_handler(self) -> None:
        self.running = True
        self._touched = False

    def end_handler(self) -> bool:
        """The handler returned or failed: whether the alarm was set or deleted while it ran."""
        touched = self._touched
        self.running = False
        self._touched = False
        return touched
