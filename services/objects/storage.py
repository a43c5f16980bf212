"""An object's storage: Cloudflare's KV API over a write-back cache.

``put``/``delete`` apply to the in-memory cache at once and join the object's *pending* batch;
the worker's flusher commits pending batches of many objects in one Postgres transaction
(group commit). The cache keeps values encoded, so a value read and then mutated without a
``put`` never changes what is stored. Keys are compared as UTF-8 bytes, like Cloudflare's.
Every check runs before anything is written: a call that breaks a limit changes nothing.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..core import codec
from ..core.errors import ObjectReset, StorageError
from .alarms import AlarmRow, alarm_time_ms, new_generation, now_ms

if TYPE_CHECKING:
    from .instance import Instance

MAX_KEY_BYTES = 2048
MAX_VALUE_BYTES = 128 * 1024
#: Cloudflare measures values after serialisation and allows 34 bytes of framing on top.
VALUE_FRAMING_SLACK = 34
MAX_BATCH = 128

_ABSENT = None  # cache marker: the key is known not to exist

#: a socket registration as written: (gateway, tags as JSON, attachment, auto request, auto response)
SocketRow = tuple[str, str, bytes | None, str | None, str | None]


class Batch:
    """One object's pending writes, handed to the flusher as a unit (atomic in one commit)."""

    __slots__ = ("delete_all", "writes", "alarm_changed", "alarm", "sockets", "seq")

    def __init__(self, delete_all: bool, writes: dict[bytes, bytes | None], alarm_changed: bool,
                 alarm: AlarmRow | None, sockets: dict[str, SocketRow | None], seq: int) -> None:
        self.delete_all = delete_all
        #: key -> encoded value, or None for a delete
        self.writes = writes
        #: the alarm row is written (``alarm``) or deleted (None) after the keys
        self.alarm_changed = alarm_changed
        self.alarm = alarm
        #: socket id -> its registration (gateway, tags JSON, attachment, auto pair) or None: gone
        self.sockets = sockets
        self.seq = seq

#: sends one event's reply; called with None once its writes are durable, or with the error
ReplySender = Callable[[BaseException | None], Awaitable[None]]


async def _send_failures(replies: list[ReplySender], error: BaseException) -> None:
    for send in replies:
        await send(error)


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
    """``ctx.storage`` of one live instance."""

    def __init__(self, instance: Instance) -> None:
        self._instance = instance
        self._object_id = instance.object_id
        self._cache: dict[bytes, bytes | None] = {}
        #: the cache holds every key (after delete_all or a full list)
        self._complete = False
        #: bumped by delete_all(), so reads that were in flight across it are discarded
        self._generation = 0
        self._pending: dict[bytes, bytes | None] = {}
        self._pending_delete_all = False
        self._write_seq = 0
        self._durable_seq = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._replies: list[tuple[int, ReplySender]] = []
        self._inflight = False
        self._txn_depth = 0
        self.closed: BaseException | None = None
        #: the alarm as this instance knows it (valid once _alarm_known)
        self._alarm: AlarmRow | None = None
        self._alarm_known = False
        self._pending_alarm_changed = False
        #: an alarm handler is running / it (or anything else) set or deleted the alarm meanwhile
        self.alarm_running = False
        self._alarm_touched = False
        self._pending_sockets: dict[str, SocketRow | None] = {}

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
        rows = await self._instance.host.read_keys(self._object_id, missing)
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
            rows = await self._instance.host.read_range(self._object_id, rng.lo, rng.hi, rng.reverse, db_limit)
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

    # ----- writing -----------------------------------------------------------------------

    def _apply(self, writes: Mapping[bytes, bytes | None]) -> None:
        self._cache.update(writes)
        self._pending.update(writes)
        self._write_seq += 1
        self._instance.host.flusher.mark_dirty(self)

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
        self._pending.clear()
        self._generation += 1
        self._complete = True
        self._pending_delete_all = True
        # the wipe deletes the alarm row too (Cloudflare, since 2026-02-24)
        self._alarm = None
        self._alarm_known = True
        self._pending_alarm_changed = False
        if self.alarm_running:
            self._alarm_touched = True
        self._write_seq += 1
        self._instance.host.flusher.mark_dirty(self)

    # ----- the alarm -------------------------------------------------------------------

    async def load_alarm(self) -> AlarmRow | None:
        """The stored alarm row (read once per instance; this instance is its only writer)."""
        if not self._alarm_known:
            generation = self._generation
            row = await self._instance.host.read_alarm(self._object_id)
            self._check_open()
            if not self._alarm_known and generation == self._generation:
                self._alarm = row
                self._alarm_known = True
        return self._alarm

    def prime_alarm(self, row: AlarmRow | None) -> None:
        """The alarm row as just read from Postgres by the runtime, for a fresh instance."""
        if not self._alarm_known and not self._pending_alarm_changed:
            self._alarm = row
            self._alarm_known = True

    async def get_alarm(self) -> int | None:
        """The alarm's time in epoch milliseconds, or None. None inside the running alarm
        handler, unless something set a new alarm meanwhile (Cloudflare)."""
        self._check_open()
        if self.alarm_running and not self._alarm_touched:
            return None
        row = await self.load_alarm()
        return None if row is None else row.scheduled_ms

    async def set_alarm(self, scheduled_time: Any) -> None:
        """Set the object's one alarm (replacing any other) to a datetime or epoch milliseconds;
        a time in the past runs it promptly. The class needs an ``alarm(info)`` handler."""
        self._check_open()
        await self.write_alarm(self._new_alarm(scheduled_time))

    def _new_alarm(self, scheduled_time: Any) -> AlarmRow:
        inst = self._instance
        if not inst.constructing and getattr(inst.cls, "alarm", None) is None:
            raise TypeError(f"Your Durable Object class must have an alarm() handler in order to call "
                            f"set_alarm() ({inst.cls.__name__} has none)")
        ms = max(alarm_time_ms(scheduled_time), now_ms())
        return AlarmRow(ms, ms, new_generation())

    async def delete_alarm(self) -> None:
        """Delete the alarm; one already running is not cancelled, but will not be retried."""
        self._check_open()
        await self.write_alarm(None)

    async def write_alarm(self, row: AlarmRow | None) -> None:
        """Stage the alarm row (None deletes it) as a write of the current event."""
        self._check_open()
        if row is None and self._alarm_known and self._alarm is None and not self.alarm_running:
            return  # nothing stored, nothing to delete
        self._alarm = row
        self._alarm_known = True
        self._pending_alarm_changed = True
        if self.alarm_running:
            self._alarm_touched = True
        self._write_seq += 1
        self._instance.host.flusher.mark_dirty(self)

    def alarm_changed_since(self, generation: int) -> bool:
        """This instance knows of a newer alarm (or none) than the stored ``generation``."""
        return self._alarm_known and (self._alarm is None or self._alarm.generation != generation)

    def stage_socket(self, socket_id: str, row: SocketRow | None) -> None:
        """A socket registration (None: removal) written with the current event's writes."""
        self._check_open()
        self._pending_sockets[socket_id] = row
        self._write_seq += 1
        self._instance.host.flusher.mark_dirty(self)

    def begin_alarm(self) -> None:
        self.alarm_running = True
        self._alarm_touched = False

    def end_alarm(self) -> bool:
        """The handler returned or failed: whether the alarm was set or deleted while it ran."""
        touched = self._alarm_touched
        self.alarm_running = False
        self._alarm_touched = False
        return touched

    def transaction(self) -> Transaction:
        """``async with storage.transaction() as txn:``; rolls back on exception or ``txn.rollback()``."""
        self._check_open()
        return Transaction(self)

    async def sync(self) -> None:
        """Wait until every write made so far is durable."""
        self._check_open()
        await self.wait_durable(self._write_seq)

    # ----- output gate and flushing (used by the instance and the flusher) ---------------

    @property
    def write_seq(self) -> int:
        return self._write_seq

    def is_durable(self, seq: int) -> bool:
        return self._durable_seq >= seq

    async def wait_durable(self, seq: int) -> None:
        if self._durable_seq >= seq:
            return
        if self.closed is not None:
            raise ObjectReset(f"the object was reset before its writes were durable ({self.closed})")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, fut))
        await fut

    @property
    def has_unflushed(self) -> bool:
        return self._durable_seq < self._write_seq

    def take_batch(self) -> Batch | None:
        """Hand the pending writes to the flusher; None when there is nothing or a flush is in flight."""
        if self._inflight or self.closed is not None or self._durable_seq >= self._write_seq:
            return None
        batch = Batch(self._pending_delete_all, self._pending, self._pending_alarm_changed, self._alarm,
                      self._pending_sockets, self._write_seq)
        self._pending_sockets = {}
        self._pending = {}
        self._pending_delete_all = False
        self._pending_alarm_changed = False
        self._inflight = True
        return batch

    def reply_when_durable(self, seq: int, send: ReplySender) -> None:
        """Queue a reply behind the output gate: the flusher sends it once ``seq`` is durable.
        Cheaper than a task waiting on a future, on the hottest path there is."""
        self._replies.append((seq, send))

    def flushed(self, seq: int) -> builtins.list[ReplySender]:
        """A flush committed up to ``seq``: wake waiters, return the replies now free to go."""
        self._inflight = False
        self._durable_seq = max(self._durable_seq, seq)
        durable = self._durable_seq
        if self._waiters:
            still = []
            for s, fut in self._waiters:
                if s <= durable:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    still.append((s, fut))
            self._waiters = still
        ready: builtins.list[ReplySender] = []
        if self._replies:
            waiting: builtins.list[tuple[int, ReplySender]] = []
            for s, send in self._replies:
                if s <= durable:
                    ready.append(send)
                else:
                    waiting.append((s, send))
            self._replies = waiting
        if durable < self._write_seq:
            self._instance.host.flusher.mark_dirty(self)
        return ready

    def fail(self, error: BaseException) -> None:
        """A flush failed or the instance was dropped: every waiter gets the error."""
        self._inflight = False
        if self.closed is None:
            self.closed = error
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(error)
        self._waiters = []
        replies, self._replies = self._replies, []
        if replies:
            asyncio.get_running_loop().create_task(_send_failures([send for _, send in replies], error))


class Transaction:
    """Writes buffered until the block ends, then applied as one atomic batch."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._writes: dict[bytes, bytes | None] = {}
        #: a set_alarm/delete_alarm of this transaction: (row or None,) once called
        self._alarm: tuple[AlarmRow | None] | None = None
        self._state = "open"  # open | rolled_back | done

    def _check(self, op: str) -> None:
        if self._state == "rolled_back":
            raise StorageError(f"Cannot {op} on rolled back transaction")
        if self._state == "done":
            raise StorageError(f"Cannot {op} on transaction that has already committed: "
                               "did you keep `txn` outside of the `async with` block?")

    async def __aenter__(self) -> Transaction:
        self._storage._txn_depth += 1
        self._storage._instance.blocking += 1
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> bool:
        self._storage._txn_depth -= 1
        self._storage._instance.blocking -= 1
        state, self._state = self._state, "done"
        if exc_type is None and state == "open" and (self._writes or self._alarm is not None):
            self._storage._check_open()
            # keys and alarm in one write sequence: one batch, so one commit
            if self._writes:
                self._storage._apply(self._writes)
            if self._alarm is not None:
                await self._storage.write_alarm(self._alarm[0])
        return False

    def rollback(self) -> None:
        """Discard the transaction's writes; a second call does nothing (workerd: "allow multiple
        calls to rollback()")."""
        if self._state == "rolled_back":
            return
        self._check("rollback")
        self._state = "rolled_back"
        self._writes = {}
        self._alarm = None

    async def get_alarm(self) -> int | None:
        self._check("get_alarm")
        if self._alarm is not None:
            row = self._alarm[0]
            return None if row is None else row.scheduled_ms
        return await self._storage.get_alarm()

    async def set_alarm(self, scheduled_time: Any) -> None:
        self._check("set_alarm")
        self._alarm = (self._storage._new_alarm(scheduled_time),)

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
