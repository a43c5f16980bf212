"""An object's storage: Cloudflare's KV API over a write-back cache.

``put``/``delete`` apply to the in-memory cache at once and join the object's *pending* batch;
the worker's flusher commits pending batches of many objects in one Postgres transaction
(group commit). The cache keeps values encoded, so a value read and then mutated without a
``put`` never changes what is stored. Keys are compared as UTF-8 bytes, like Cloudflare's.
Every check runs before anything is written: a call that breaks a limit changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..core import codec
from ..core.errors import ObjectReset, StorageError
from .alarm_rules import AlarmRow
from .alarm_state import ObjectAlarm
from .events import EventRecord
from .history import ObjectHistory
from .input_gate import InputGate
from .output_gate import OutputGate
from .pending import PendingWrites
from .sql import ObjectStore

MAX_KEY_BYTES = 2048
MAX_VALUE_BYTES = 128 * 1024
#: Cloudflare measures values after serialisation and allows 34 bytes of framing on top.
VALUE_FRAMING_SLACK = 34
MAX_BATCH = 128

_ABSENT = None  # cache marker: the key is known not to exist

def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise StorageError(f"{what} cannot be used: {codec.not_unicode(exc)}") from None


def _key_bytes(key: Any) -> bytes:
    if not isinstance(key, str):
        raise StorageError(f"Keys must be str, not {type(key).__name__}")
    raw = _utf8(key, "key")
    if len(raw) > MAX_KEY_BYTES:
        raise StorageError(
            f"Keys cannot be larger than {MAX_KEY_BYTES} bytes. A key of size {len(raw)} was provided."
        )
    return raw


def _bound_bytes(bound: Any, option: str) -> bytes:
    """A list() bound: any str (Cloudflare applies no size limit to bounds, only to stored keys)."""
    if not isinstance(bound, str):
        raise StorageError(f"list() option {option} must be a str, not {type(bound).__name__}")
    return _utf8(bound, f"list() option {option}")


def _key_list(keys: Any) -> list[Any]:
    """The keys of a batch get/delete: any iterable of str (each checked later), but not bytes."""
    if isinstance(keys, (bytes, bytearray, memoryview)) or not isinstance(keys, Iterable):
        raise StorageError(f"Keys must be str or a list of str, not {type(keys).__name__}")
    return list(keys)


def _encode(value: Any) -> bytes:
    enc = codec.encode_value(value)
    if len(enc) > MAX_VALUE_BYTES + VALUE_FRAMING_SLACK:
        raise StorageError(
            f"Values cannot be larger than {MAX_VALUE_BYTES} bytes. "
            f"A value of size {len(enc)} was provided."
        )
    return enc


def check_entries(entries: Mapping[str, Any]) -> None:
    """Raise the StorageError ``put`` would raise for the first entry it refuses: lets a caller
    with many batches (durable state import) refuse all of them before writing any."""
    for key, value in entries.items():
        try:
            _key_bytes(key)
            _encode(value)
        except StorageError as exc:
            raise StorageError(f"key {str(key)[:100]!r}: {exc.message}") from None


def check_keys(keys: Iterable[str]) -> None:
    """Raise the StorageError ``delete`` would raise for the first key it refuses."""
    for key in keys:
        try:
            _key_bytes(key)
        except StorageError as exc:
            raise StorageError(f"key {str(key)[:100]!r}: {exc.message}") from None


def _check_batch(n: int) -> None:
    if n > MAX_BATCH:
        raise StorageError(f"Maximum number of key value pairs is {MAX_BATCH}. {n} pairs were provided.")


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix`` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class ListRange:
    """The validated options of one ``list()`` call, as a byte range [lo, hi)."""

    __slots__ = ("lo", "hi", "reverse", "limit", "empty")

    def __init__(self, start: str | None, start_after: str | None, end: str | None, prefix: str | None,
                 reverse: bool, limit: int | None) -> None:
        if start is not None and start_after is not None:
            raise StorageError("list() cannot be called with both start and start_after values.")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
            raise StorageError(f"List limit must be positive (got {limit!r}).")
        lo = b""
        if start is not None:
            lo = _bound_bytes(start, "start")
        elif start_after is not None:
            lo = _bound_bytes(start_after, "start_after") + b"\x00"
        hi = _bound_bytes(end, "end") if end is not None else None
        if prefix is not None and _bound_bytes(prefix, "prefix"):
            p = _utf8(prefix, "list() option prefix")
            lo = max(lo, p)
            pe = _prefix_end(p)
            if pe is not None:
                hi = pe if hi is None else min(hi, pe)
        self.lo, self.hi = lo, hi
        self.reverse = bool(reverse)
        self.limit = limit
        self.empty = hi is not None and hi <= lo

    def contains(self, key: bytes) -> bool:
        return key >= self.lo and (self.hi is None or key < self.hi)


class Storage:
    """``ctx.storage`` of one live instance: the key-value cache, the alarm API and transactions.

    Writes go to the cache at once and to the object's pending writes, which the flusher
    commits; the output gate holds back what the object says until they are durable."""

    def __init__(self, object_id: str, store: ObjectStore, pending: PendingWrites, output: OutputGate,
                 input_gate: InputGate, can_set_alarm: Callable[[], None],
                 before_sync: Callable[[], None] | None = None) -> None:
        self._object_id = object_id
        #: a keyed call's event stops holding its writes before it waits for them (instance.py)
        self._before_sync = before_sync
        self._store = store
        self._pending = pending
        self._output = output
        self._input = input_gate
        self._cache: dict[bytes, bytes | None] = {}
        #: the cache holds every key (after delete_all or a full list)
        self._complete = False
        #: bumped by delete_all(), so reads that were in flight across it are discarded
        self._generation = 0
        self._txn_depth = 0
        #: open transactions, innermost last: an emit inside one waits for its commit (events.py)
        self._txns: list[Transaction] = []
        #: where events go once no transaction holds them: the pending writes, or (instance.py)
        #: the running event, which stages them only if it returns
        self.stage_events: Callable[[Sequence[EventRecord]], None] = pending.emit
        #: Postgres reads in flight: while any is, delete markers stay (a read that began before a
        #: delete committed may still return the row, and the marker is what hides it)
        self._reads = 0
        #: why the object was reset; storage refuses every call from then on
        self.closed: BaseException | None = None
        self.alarm = ObjectAlarm(object_id, store, pending, self._check_open, can_set_alarm)
        #: point-in-time restore (history.py); None when the worker keeps no history
        self.history: ObjectHistory | None = None

    # ----- reading -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed is not None:
            raise ObjectReset(f"Durable Object storage is no longer usable: the object was reset ({self.closed})")

    async def _load(self, keys: list[bytes]) -> None:
        """Fill the cache for keys it does not know; the input gate stays closed meanwhile."""
        missing = [k for k in keys if k not in self._cache]
        if not missing or self._complete:
            return
        generation = self._generation
        self._reads += 1
        try:
            rows = await self._store.read_keys(self._object_id, missing)
        finally:
            self._reads -= 1
        self._check_open()
        if generation != self._generation:
            return  # delete_all() ran meanwhile: these rows are gone, and the cache is complete
        found = {bytes(r[0]): bytes(r[1]) for r in rows}
        for k in missing:
            if k not in self._cache:  # a write may have landed while we waited
                self._cache[k] = found.get(k)

    async def get(self, key: str | Iterable[str]) -> Any:
        """A value (None if missing), or for a list of keys a dict of those found, in key order."""
        self._check_open()
        if isinstance(key, str):
            raw = _key_bytes(key)
            if raw not in self._cache and not self._complete:
                await self._load([raw])
            enc = self._cache.get(raw)
            return None if enc is None else codec.unpack(enc)
        keys = _key_list(key)
        _check_batch(len(keys))
        raws = [_key_bytes(k) for k in keys]
        await self._load(raws)
        out: dict[str, Any] = {}
        for raw in sorted(set(raws)):
            enc = self._cache.get(raw)
            if enc is not None:
                out[raw.decode()] = codec.unpack(enc)
        return out

    async def list(self, *, start: str | None = None, start_after: str | None = None, end: str | None = None,
                   prefix: str | None = None, reverse: bool = False, limit: int | None = None) -> dict[str, Any]:
        """Keys and values in UTF-8 byte order; ``end`` is exclusive; ``reverse`` keeps the bounds."""
        self._check_open()
        rng = ListRange(start, start_after, end, prefix, reverse, limit)
        if rng.empty:
            return {}
        merged: dict[bytes, bytes] = {}
        if not self._complete:
            hidden = sum(1 for k, v in self._cache.items() if v is None and rng.contains(k))
            db_limit = None if rng.limit is None else rng.limit + hidden
            generation = self._generation
            self._reads += 1
            try:
                rows = await self._store.read_range(self._object_id, rng.lo, rng.hi, rng.reverse, db_limit)
            finally:
                self._reads -= 1
            self._check_open()
            fresh = generation == self._generation  # else delete_all() ran: the cache alone is the truth
            for k, v in rows if fresh else ():
                merged[bytes(k)] = bytes(v)
            if fresh and rng.lo == b"" and rng.hi is None and rng.limit is None:
                # a full listing: from now on the cache knows every key
                for k, v in merged.items():
                    self._cache.setdefault(k, v)
                self._complete = True
        for k, v in self._cache.items():
            if rng.contains(k):
                if v is None:
                    merged.pop(k, None)
                else:
                    merged[k] = v
        ordered = sorted(merged, reverse=rng.reverse)
        if rng.limit is not None:
            ordered = ordered[: rng.limit]
        return {k.decode(): codec.unpack(merged[k]) for k in ordered}

    def forget_deleted(self, keys: Iterable[bytes]) -> None:
        """Deletes of ``keys`` committed: drop their markers (the database no longer has the rows),
        so an object that deletes as it goes (a stream's old messages, a log after compaction)
        keeps a cache the size of what it holds, not of everything it ever deleted."""
        if self._reads:
            return  # a read in flight may predate the commit: the markers still hide its rows
        cache, pending = self._cache, self._pending.kv
        for k in keys:
            if k in cache and cache[k] is None and k not in pending:
                del cache[k]

    # ----- writing -----------------------------------------------------------------------

    def _apply(self, writes: Mapping[bytes, bytes | None]) -> None:
        self._cache.update(writes)
        self._pending.put(writes)

    async def put(self, key: str | Mapping[str, Any], value: Any = None) -> None:
        """Write one key, or a dict of up to 128 keys atomically."""
        self._check_open()
        if isinstance(key, str):
            self._apply({_key_bytes(key): _encode(value)})
            return
        if not isinstance(key, Mapping):
            raise StorageError("put() takes (key, value) or a dict of entries")
        if value is not None:
            raise StorageError("put() with a dict of entries takes no second argument")
        _check_batch(len(key))
        self._apply({_key_bytes(k): _encode(v) for k, v in key.items()})

    async def delete(self, key: str | Iterable[str]) -> Any:
        """Delete one key (-> whether it existed) or up to 128 keys (-> how many existed)."""
        self._check_open()
        if isinstance(key, str):
            raw = _key_bytes(key)
            await self._load([raw])
            existed = self._cache.get(raw) is not None
            self._apply({raw: None})
            return existed
        raws = [_key_bytes(k) for k in _key_list(key)]
        _check_batch(len(raws))
        await self._load(raws)
        unique = set(raws)
        count = sum(1 for r in unique if self._cache.get(r) is not None)
        self._apply(dict.fromkeys(unique))
        return count

    async def delete_all(self) -> None:
        """Delete every key of this object (and its alarm)."""
        self._check_open()
        if self._txn_depth:
            raise StorageError("Cannot call delete_all() within a transaction")
        self._cache.clear()
        self._generation += 1
        self._complete = True
        self.alarm.wiped()  # the wipe deletes the alarm row too (Cloudflare, since 2026-02-24)
        self._pending.wipe()

    # ----- the alarm -------------------------------------------------------------------

    async def get_alarm(self) -> int | None:
        """The alarm's time in epoch milliseconds, or None. None inside the running alarm
        handler, unless something set a new alarm meanwhile (Cloudflare)."""
        self._check_open()
        return await self.alarm.get()

    async def set_alarm(self, scheduled_time: Any) -> None:
        """Set the object's one alarm (replacing any other) to a datetime or epoch milliseconds;
        a time in the past runs it promptly. The class needs an ``alarm(info)`` handler."""
        self._check_open()
        self.alarm.write(self.alarm.new_row(scheduled_time))

    async def delete_alarm(self) -> None:
        """Delete the alarm; one already running is not cancelled, but will not be retried."""
        self._check_open()
        self.alarm.write(None)

    # ----- transactions and durability ----------------------------------------------------

    def transaction(self) -> Transaction:
        """``async with storage.transaction() as txn:``; rolls back on exception or ``txn.rollback()``."""
        self._check_open()
        return Transaction(self)

    async def sync(self) -> None:
        """Wait until every write made so far is durable."""
        self._check_open()
        if self._before_sync is not None:
            self._before_sync()
        await self._output.wait_durable(self._output.write_seq)

    def emit(self, events: Sequence[EventRecord]) -> None:
        """Stage events with the writes: inside a transaction they wait for it (a rollback drops
        them with its writes), otherwise they join the pending writes at once."""
        self._check_open()
        if self._txns:
            self._txns[-1].stage_events(events)
        else:
            self.stage_events(events)

    # ----- point-in-time restore (history.py) ----------------------------------------------

    def _history(self) -> ObjectHistory:
        self._check_open()
        if self.history is None:
            raise StorageError("history is off in this deployment (DURABLE_HISTORY=false): bookmarks "
                               "and point-in-time restore are not available")
        return self.history

    async def get_bookmark_for_time(self, when: Any) -> str:
        """A bookmark of this object's storage as it was at ``when`` (a datetime, naive meaning
        UTC, or epoch ms), which must be inside DURABLE_HISTORY_RETENTION."""
        return await self._history().bookmark_for_time(when)

    async def get_current_bookmark(self) -> str:
        """A bookmark of this object's storage now (after its writes so far are durable)."""
        return await self._history().current_bookmark()

    async def on_next_session_restore_bookmark(self, bookmark: str) -> str:
        """Restore this object's storage to ``bookmark`` when it next starts (before its
        constructor runs); call ``self.ctx.abort()`` after it to restart now. Returns a bookmark
        of the storage as it is now, to undo the restore with."""
        return await self._history().restore_on_next_session(bookmark)

    def close(self, error: BaseException) -> None:
        """The object was reset: refuse every further call."""
        if self.closed is None:
            self.closed = error


class Transaction:
    """Writes buffered until the block ends, then applied as one atomic batch."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._writes: dict[bytes, bytes | None] = {}
        #: a set_alarm/delete_alarm of this transaction: (row or None,) once called
        self._alarm: tuple[AlarmRow | None] | None = None
        #: events emitted inside the transaction: staged on commit, dropped on rollback
        self._events: list[EventRecord] = []
        self._state = "open"  # open | rolled_back | done

    def _check(self, op: str) -> None:
        if self._state == "rolled_back":
            raise StorageError(f"Cannot {op} on rolled back transaction")
        if self._state == "done":
            raise StorageError(f"Cannot {op} on transaction that has already committed: "
                               "did you keep `txn` outside of the `async with` block?")

    async def __aenter__(self) -> Transaction:
        self._storage._txn_depth += 1
        self._storage._txns.append(self)
        self._storage._input.block()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> bool:
        self._storage._txn_depth -= 1
        if self in self._storage._txns:
            self._storage._txns.remove(self)
        self._storage._input.unblock()
        state, self._state = self._state, "done"
        events, self._events = self._events, []
        if exc_type is None and state == "open" and (self._writes or self._alarm is not None or events):
            self._storage._check_open()
            # keys, alarm and events in one write sequence: one batch, so one commit
            if self._writes:
                self._storage._apply(self._writes)
            if self._alarm is not None:
                self._storage.alarm.write(self._alarm[0])
            if events:
                self._storage.stage_events(events)
        return False

    def stage_events(self, events: Sequence[EventRecord]) -> None:
        self._check("emit")
        self._events.extend(events)

    def rollback(self) -> None:
        """Discard the transaction's writes; a second call does nothing (workerd: "allow multiple
        calls to rollback()")."""
        if self._state == "rolled_back":
            return
        self._check("rollback")
        self._state = "rolled_back"
        self._writes = {}
        self._alarm = None
        self._events = []

    async def get_alarm(self) -> int | None:
        self._check("get_alarm")
        if self._alarm is not None:
            row = self._alarm[0]
            return None if row is None else row.scheduled_ms
        return await self._storage.get_alarm()

    async def set_alarm(self, scheduled_time: Any) -> None:
        self._check("set_alarm")
        self._alarm = (self._storage.alarm.new_row(scheduled_time),)

    async def delete_alarm(self) -> None:
        self._check("delete_alarm")
        self._alarm = (None,)

    async def get(self, key: str | Iterable[str]) -> Any:
        self._check("get")
        if isinstance(key, str):
            raw = _key_bytes(key)
            if raw in self._writes:
                enc = self._writes[raw]
                return None if enc is None else codec.unpack(enc)
            return await self._storage.get(key)
        keys = _key_list(key)
        _check_batch(len(keys))
        out = await self._storage.get([k for k in keys if _key_bytes(k) not in self._writes])
        for k in keys:
            raw = _key_bytes(k)
            if raw in self._writes:
                enc = self._writes[raw]
                if enc is None:
                    out.pop(k, None)
                else:
                    out[k] = codec.unpack(enc)
        return dict(sorted(out.items(), key=lambda kv: kv[0].encode()))

    async def put(self, key: str | Mapping[str, Any], value: Any = None) -> None:
        self._check("put")
        if isinstance(key, str):
            self._writes[_key_bytes(key)] = _encode(value)
            return
        if not isinstance(key, Mapping) or value is not None:
            raise StorageError("put() takes (key, value) or a dict of entries")
        _check_batch(len(key))
        self._writes.update({_key_bytes(k): _encode(v) for k, v in key.items()})

    async def delete(self, key: str | Iterable[str]) -> Any:
        self._check("delete")
        if isinstance(key, str):
            existed = await self.get(key) is not None
            self._writes[_key_bytes(key)] = None
            return existed
        keys = _key_list(key)
        _check_batch(len(keys))
        found = await self.get(keys)
        for k in keys:
            self._writes[_key_bytes(k)] = None
        return len(found)

    async def list(self, **options: Any) -> dict[str, Any]:
        self._check("list")
        rng = ListRange(options.get("start"), options.get("start_after"), options.get("end"),
                        options.get("prefix"), options.get("reverse", False), options.get("limit"))
        limit = options.get("limit")
        base_options = dict(options)
        if limit is not None:
            hidden = sum(1 for k, v in self._writes.items() if v is None and rng.contains(k))
            base_options["limit"] = limit + hidden
        merged = {k.encode(): v for k, v in (await self._storage.list(**base_options)).items()}
        for k, enc in self._writes.items():
            if rng.contains(k):
                if enc is None:
                    merged.pop(k, None)
                else:
                    merged[k] = codec.unpack(enc)
        ordered = sorted(merged, reverse=rng.reverse)
        if limit is not None:
            ordered = ordered[:limit]
        return {k.decode(): merged[k] for k in ordered}

    async def delete_all(self) -> None:
        raise StorageError("Cannot call delete_all() within a transaction")
