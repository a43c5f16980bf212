"""Per-object change history and point-in-time restore (Cloudflare's PITR bookmarks).

Postgres keeps an undo log of every object's storage (infra/migrations/005_history.sql): each
change of a key records the value it had before, a position and the commit's time. Triggers
write it, so the flush is unchanged. The state of an object at a position is its current
storage with the keys changed since put back as they were; a restore to time ``t`` therefore
needs only the rows written since ``t``, and rows older than ``DURABLE_HISTORY_RETENTION`` are
pruned by the owner of partition 0 in bounded passes (:class:`Pruner`).

A **bookmark** names a position: ``<position, 16 hex>-<epoch ms, 12 hex>``. Bookmarks compare
as strings in time order (as Cloudflare's do); the time part says how old the bookmark is, so a
restore past the retention window is refused before anything is written.

What a restore covers: the object's keys (do_storage). Its alarm row and its hibernated
WebSockets are not storage and stay as they are (see the README: a restore restarts the object,
its sockets stay connected, its alarm keeps its time).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from ..core.errors import InvalidRequest, NotOwner, StorageUnavailable
from ..core.tasks import TaskSet

log = logging.getLogger("durable.history")

_BOOKMARK = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{12})$")
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
#: 9999-12-31T23:59:59.999Z, the last time a datetime can hold
_MAX_MS = 253_402_300_799_999

_CURRENT_POS = "SELECT coalesce(pg_sequence_last_value('do_history_pos'), 0)"
#: the position of the object's state at t: its last change at or before t (found walking its
#: index back from the newest, so a recent t is cheap); with none kept, just before its oldest
#: kept change; with no history at all, now
_POS_FOR_TIME = (
    "SELECT coalesce((SELECT max(pos) FROM do_history WHERE object_id = $1 AND at <= $2), "
    "(SELECT min(pos) - 1 FROM do_history WHERE object_id = $1), "
    "pg_sequence_last_value('do_history_pos'), 0)"
)
_HORIZON = "SELECT pruned_before FROM do_history_horizon"
_KNOWN = (
    "SELECT EXISTS (SELECT 1 FROM do_storage WHERE object_id = $1) "
    "OR EXISTS (SELECT 1 FROM do_history WHERE object_id = $1)"
)
_REQUEST = """
INSERT INTO do_history_restores (object_id, namespace, target)
SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM do_partitions WHERE partition = $4 AND epoch = $5 FOR SHARE)
ON CONFLICT (object_id) DO UPDATE SET target = EXCLUDED.target, requested_at = now()
"""
_PENDING = "SELECT target FROM do_history_restores WHERE object_id = $1"
_RESTORE = "SELECT do_history_restore($1, $2, $3, $4, $5)"
_FORK = "SELECT do_history_fork($1, $2, $3, $4, $5, $6)"
_STATE_AT = "SELECT key, value FROM do_history_state_at($1, $2) ORDER BY key"
_MOVE_HORIZON = """
INSERT INTO do_history_horizon (id, pruned_before) VALUES (true, $1)
ON CONFLICT (id) DO UPDATE SET pruned_before = greatest(do_history_horizon.pruned_before, EXCLUDED.pruned_before)
"""
#: a bounded pass: a backlog is worked off over several passes, never in one long statement
_PRUNE = (
    "DELETE FROM do_history WHERE ctid = ANY(ARRAY(SELECT ctid FROM do_history WHERE at < $1 LIMIT $2))"
)


@dataclass(frozen=True, slots=True)
class Bookmark:
    """A position in the history, and the time it stands for (epoch ms)."""

    pos: int
    ms: int

    def __str__(self) -> str:
        return f"{self.pos:016x}-{self.ms:012x}"

    @staticmethod
    def parse(text: Any) -> Bookmark:
        if not isinstance(text, str) or not (m := _BOOKMARK.match(text)):
            raise InvalidRequest(f"not a bookmark: {str(text)[:80]!r} (bookmarks come from get_bookmark_for_time() "
                                 "or get_current_bookmark(), like 00000000000004d2-018f2b3c4d5e)")
        return Bookmark(int(m.group(1), 16), int(m.group(2), 16))


def now_ms() -> int:
    return int(time.time() * 1000)


def to_ms(when: Any) -> int:
    """A datetime (naive: UTC) or epoch milliseconds, as epoch milliseconds."""
    if isinstance(when, datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        when = when.timestamp() * 1000
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        if not (0 <= when <= _MAX_MS):  # also NaN and infinities
            raise InvalidRequest(f"a time is a datetime or epoch milliseconds from 0 to {_MAX_MS}, not {when!r}")
        return int(when)
    raise InvalidRequest(f"a time is a datetime or epoch milliseconds, not {type(when).__name__}")


def parse_time(text: str, now: float | None = None) -> int:
    """An operator's ``--at``: ISO 8601 (no offset: UTC), relative (``-10m``, ``-90s``, ``-2h``,
    ``-1d``) or epoch milliseconds; returns epoch ms. ValueError names the forms accepted."""
    text = text.strip()
    now = time.time() if now is None else now
    m = _RELATIVE.match(text)
    try:
        if m:
            ms = int((now - float(m.group(1)) * _UNITS[m.group(2)]) * 1000)
        elif text.isdigit():
            ms = int(text)
        else:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            ms = int(parsed.timestamp() * 1000)
    except (ValueError, OverflowError):
        raise ValueError(f"bad time {text!r}: give an ISO time (2026-05-01T12:00:00Z), a relative time "
                         "(-10m, -90s, -2h, -1d) or epoch milliseconds") from None
    if not 0 <= ms <= _MAX_MS:
        raise ValueError(f"bad time {text!r}: before 1970 or after the year 9999")
    return ms


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class History:
    """The history's statements, on the worker's pool; ``enabled`` and ``retention`` are the
    settings DURABLE_HISTORY and DURABLE_HISTORY_RETENTION (seconds)."""

    def __init__(self, pool: asyncpg.Pool, enabled: bool, retention: float) -> None:
        self.pool = pool
        self.enabled = enabled
        self.retention = retention

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise InvalidRequest("history is off in this deployment (DURABLE_HISTORY=false): there are no "
                                 "bookmarks to restore from")

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        try:
            async with self.pool.acquire() as conn:
                return await conn.fetchval(sql, *args)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageUnavailable(f"history query failed: {type(exc).__name__}: {exc}") from None

    async def check_window(self, ms: int) -> None:
        """Refuse a time outside the window history can restore to: before the retention window
        (or before what was pruned already), or in the future."""
        now = now_ms()
        if ms > now + 1000:
            raise InvalidRequest(f"{_iso(ms)} is in the future (now is {_iso(now)})")
        earliest = now - int(self.retention * 1000)
        horizon = await self._fetchval(_HORIZON)
        if horizon is not None:
            earliest = max(earliest, int(horizon.timestamp() * 1000))
        if ms < earliest:
            raise InvalidRequest(f"{_iso(ms)} is outside the history retention window: the earliest time "
                                 f"that can be restored is {_iso(earliest)} (DURABLE_HISTORY_RETENTION = "
                                 f"{self.retention:g} s)")

    async def current(self) -> Bookmark:
        self._check_enabled()
        ms = now_ms()
        return Bookmark(int(await self._fetchval(_CURRENT_POS)), ms)

    async def for_time(self, object_id: str, when: Any) -> Bookmark:
        """The bookmark of ``object_id``'s state at ``when`` (a datetime or epoch ms)."""
        self._check_enabled()
        ms = to_ms(when)
        await self.check_window(ms)
        at = datetime.fromtimestamp(ms / 1000, UTC)
        return Bookmark(int(await self._fetchval(_POS_FOR_TIME, object_id, at)), ms)

    async def known(self, object_id: str) -> bool:
        """Whether the object has storage or history (an operator's name may have a typo)."""
        return bool(await self._fetchval(_KNOWN, object_id))

    async def request(self, object_id: str, namespace: str, partition: int, epoch: int, target: Bookmark) -> None:
        """Record a restore to apply on the object's next start (fenced: a stale owner's is not)."""
        self._check_enabled()
        await self.check_window(target.ms)
        try:
            async with self.pool.acquire() as conn:
                status = await conn.execute(_REQUEST, object_id, namespace, target.pos, partition, epoch)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageUnavailable(f"recording the restore failed: {type(exc).__name__}: {exc}") from None
        if status.split()[-1] == "0":
            raise NotOwner(f"this worker no longer holds the lease on partition {partition}")

    async def pending(self, object_id: str) -> int | None:
        """The position a restore requested for ``object_id`` goes back to, if one waits."""
        value = await self._fetchval(_PENDING, object_id)
        return None if value is None else int(value)

    async def restore(self, object_id: str, namespace: str, partition: int, epoch: int, pos: int) -> int:
        """Put the object's storage back as it was at ``pos`` (one fenced transaction, which also
        forgets its pending request); returns how many keys changed."""
        changed = int(await self._fetchval(_RESTORE, object_id, namespace, partition, epoch, pos))
        if changed < 0:
            raise NotOwner(f"this worker no longer holds the lease on partition {partition}")
        return changed

    async def fork(self, source: str, pos: int, target: str, namespace: str, partition: int, epoch: int) -> int:
        """Copy ``source``'s storage at ``pos`` into ``target`` (which has none); keys copied."""
        copied = int(await self._fetchval(_FORK, source, pos, target, namespace, partition, epoch))
        if copied == -1:
            raise NotOwner(f"this worker no longer holds the lease on partition {partition}")
        if copied == -2:
            raise InvalidRequest("the fork's target object has storage already: fork into a new name")
        return copied

    async def state_at(self, object_id: str, pos: int) -> list[tuple[bytes, bytes]]:
        """The object's whole storage at ``pos`` (raw keys and encoded values), in key order."""
        try:
            async with self.pool.acquire() as conn:
                return [(bytes(r["key"]), bytes(r["value"])) for r in await conn.fetch(_STATE_AT, object_id, pos)]
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageUnavailable(f"history query failed: {type(exc).__name__}: {exc}") from None

    async def move_horizon(self) -> None:
        """Writes are not being recorded (this worker runs with history off): no restore may go
        back past now."""
        async with self.pool.acquire() as conn:
            await conn.execute(_MOVE_HORIZON, datetime.now(UTC))

    async def prune(self, limit: int) -> int:
        """One bounded pass: delete up to ``limit`` rows older than the retention window. The
        horizon moves first (same transaction), so no restore is allowed into what is pruned."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.retention)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_MOVE_HORIZON, cutoff)
            status = await conn.execute(_PRUNE, cutoff, limit)
        return int(status.split()[-1])


class ObjectHistory:
    """``ctx.storage``'s history calls for one live object (instance.py builds it)."""

    def __init__(self, history: History, object_id: str, namespace: str, partition: int, epoch: int,
                 sync: Callable[[], Any]) -> None:
        self.history = history
        self.object_id = object_id
        self.namespace = namespace
        self.partition = partition
        self.epoch = epoch
        self._sync = sync

    async def bookmark_for_time(self, when: Any) -> str:
        return str(await self.history.for_time(self.object_id, when))

    async def current_bookmark(self) -> str:
        await self._sync()  # the object's own writes so far are before the bookmark
        return str(await self.history.current())

    async def restore_on_next_session(self, bookmark: str) -> str:
        target = Bookmark.parse(bookmark)
        undo = await self.current_bookmark()
        await self.history.request(self.object_id, self.namespace, self.partition, self.epoch, target)
        return undo

    async def apply_pending(self) -> int | None:
        """At the object's start: apply the restore it asked for, if one waits; keys changed."""
        pos = await self.history.pending(self.object_id)
        if pos is None:
            return None
        changed = await self.history.restore(self.object_id, self.namespace, self.partition, self.epoch, pos)
        log.info("restored object %s to history position %d (%d keys changed)", self.object_id, pos, changed,
                 extra={"object": self.object_id, "partition": self.partition})
        return changed


class Pruner:
    """Deletes history older than the retention window, a bounded pass at a time, on the worker
    that owns partition 0 (one pruner per deployment; a second one would only do no harm).

    History rows carry no partition (do_storage has none, and a trigger cannot cheaply compute
    the partition hash), so the owners cannot split the work by partition as idempotency.py's
    Sweeper does. A worker with history off instead moves the horizon to now at start, every
    interval and at stop: what it writes unrecorded can never be restored across."""

    BATCH = 5000

    def __init__(self, history: History, active: Callable[[], bool], interval: float) -> None:
        self.history = history
        self.active = active
        self.interval = interval
        self.tasks = TaskSet()
        #: rows deleted since start (tests, logs)
        self.deleted = 0

    def start(self) -> None:
        self.tasks.spawn(self._run() if self.history.enabled else self._unrecorded(), "history-prune")

    async def stop(self) -> None:
        await self.tasks.cancel()
        if not self.history.enabled:
            try:
                await self.history.move_horizon()
            except Exception as exc:  # noqa: BLE001 - the last interval's move still stands
                log.warning("moving the history horizon failed: %s: %s", type(exc).__name__, exc)

    async def _unrecorded(self) -> None:
        while True:
            try:
                await self.history.move_horizon()
            except Exception as exc:  # noqa: BLE001 - Postgres trouble: the next interval tries again
                log.warning("moving the history horizon failed: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.interval)

    async def prune(self) -> int:
        deleted = 0
        while True:
            n = await self.history.prune(self.BATCH)
            deleted += n
            if n < self.BATCH:
                break
        self.deleted += deleted
        return deleted

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.active():
                continue
            try:
                await self.prune()
            except Exception as exc:  # noqa: BLE001 - Postgres trouble: the next pass tries again
                log.warning("history prune failed: %s: %s", type(exc).__name__, exc)
