"""An object's writes not yet handed to the flusher: keys, a wipe, its alarm and its sockets.

Everything an object writes between two flushes goes into one :class:`Batch`, which the
flusher commits in one transaction: the keys, the alarm row and the socket registrations of an
event are atomic together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .alarm_rules import AlarmRow
from .events import EventRecord

#: a socket registration as written: (gateway, tags as JSON, attachment, auto request, auto response)
SocketRow = tuple[str, str, bytes | None, str | None, str | None]


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """What a call made with an idempotency key left behind (idempotency.py): which call it
    was, its encoded reply (None: the call made writes durable and has not finished), and when
    the record expires (epoch ms)."""

    fingerprint: str
    reply: bytes | None
    expires_ms: int


class Batch:
    """One object's pending writes, handed to the flusher as a unit (atomic in one commit)."""

    __slots__ = ("delete_all", "writes", "alarm_changed", "alarm", "sockets", "idempotency", "events", "seq")

    def __init__(self, delete_all: bool, writes: dict[bytes, bytes | None], alarm_changed: bool,
                 alarm: AlarmRow | None, sockets: dict[str, SocketRow | None], seq: int,
                 idempotency: dict[str, IdempotencyRecord] | None = None,
                 events: list[EventRecord] | None = None) -> None:
        #: every stored key (and the alarm) of the object is deleted first
        self.delete_all = delete_all
        #: key -> encoded value, or None for a delete
        self.writes = writes
        #: the alarm row is written (``alarm``) or deleted (None) after the keys
        self.alarm_changed = alarm_changed
        self.alarm = alarm
        #: socket id -> its registration (gateway, tags JSON, attachment, auto pair) or None: gone
        self.sockets = sockets
        #: idempotency key -> the record of the call made with it (kept by delete_all)
        self.idempotency = idempotency or {}
        #: events emitted (ctx.emit), in emit order: outbox rows of the same commit (outbox.py)
        self.events = events or []
        #: the write sequence this batch makes durable
        self.seq = seq


class PendingWrites:
    """Staged writes; ``on_write`` runs after each (it advances the output gate and marks the
    object dirty for the flusher)."""

    __slots__ = ("kv", "delete_all", "alarm_changed", "alarm", "sockets", "idempotency", "events", "_on_write")

    def __init__(self, on_write: Callable[[], None]) -> None:
        self.kv: dict[bytes, bytes | None] = {}
        self.delete_all = False
        self.alarm_changed = False
        self.alarm: AlarmRow | None = None
        self.sockets: dict[str, SocketRow | None] = {}
        self.idempotency: dict[str, IdempotencyRecord] = {}
        self.events: list[EventRecord] = []
        self._on_write = on_write

    def put(self, writes: Mapping[bytes, bytes | None]) -> None:
        self.kv.update(writes)
        self._on_write()

    def wipe(self) -> None:
        """delete_all(): the keys staged so far are moot, and the wipe deletes the alarm row too."""
        self.kv.clear()
        self.delete_all = True
        self.alarm_changed = False
        self.alarm = None
        self._on_write()

    def set_alarm(self, row: AlarmRow | None) -> None:
        self.alarm = row
        self.alarm_changed = True
        self._on_write()

    def set_socket(self, socket_id: str, row: SocketRow | None) -> None:
        self.sockets[socket_id] = row
        self._on_write()

    def record_call(self, key: str, record: IdempotencyRecord) -> None:
        """The record of a call made with an idempotency key, committed with the writes before it."""
        self.idempotency[key] = record
        self._on_write()

    def emit(self, events: Iterable[EventRecord]) -> None:
        """Events to commit with the writes staged so far (a wipe keeps them: they are not storage)."""
        self.events.extend(events)
        self._on_write()

    def take(self, seq: int) -> Batch:
        batch = Batch(self.delete_all, self.kv, self.alarm_changed, self.alarm, self.sockets, seq, self.idempotency,
                      self.events)
        self.kv = {}
        self.events = []
        self.sockets = {}
        self.idempotency = {}
        self.delete_all = False
        self.alarm_changed = False
        return batch
