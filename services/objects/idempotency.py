"""Idempotency keys: a call its caller may repeat runs once; a repeat gets the recorded reply.

A caller attaches a key (the ``Idempotency-Key`` header, on HTTP and on NATS alike, or
``stub.with_idempotency_key(key)``) to an RPC call or a fetch. The worker then:

- looks the key up (this instance's recent keys, then Postgres) before running anything: a
  recorded reply is returned as it was recorded, and the method does not run again, also after
  eviction and failover (the record is in Postgres, fenced like every other write);
- otherwise runs the call as one event and, at its end, stages the record (the call's verb and
  its encoded reply) among the object's pending writes, so it **commits in the same flush as
  the call's writes**: both or neither. For that, the object's writes are held back from the
  flusher while a keyed event runs (``Instance.held``); the event ends, the record is staged,
  and the whole batch goes together.
- A keyed event that needs its writes durable before it ends (it awaits a call to another
  object, or ``storage.sync()``) cannot be atomic with its record: its writes so far commit
  with a *started* record (no reply). If its worker stops before the event ends, a repeat is
  answered ``idempotency_interrupted`` (409): the outcome is partial, and running it again
  could apply part of it twice.
- A repeat that arrives while the first call is still running on this worker waits for it,
  outside the input gate (the first may be waiting for the gate to reopen after an outgoing
  call), and gets the same reply once it is durable.

Records expire after ``DURABLE_IDEMPOTENCY_TTL``; owners delete expired ones in bounded passes
(:class:`Sweeper`). A key is scoped to one object, and bound to the verb it was first used with
(``rpc.<method>`` or ``fetch``): reusing it for another is ``idempotency_key_reused`` (422).
Replies are recorded as sent: errors raised by the method are recorded too (the call ran), but
nothing is recorded when the instance was reset during the call (its writes are dropped too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core import codec, wire
from ..core.errors import DurableError, IdempotencyInterrupted, IdempotencyKeyReused, ObjectReset, RemoteError
from ..core.tasks import TaskSet
from .pending import IdempotencyRecord, PendingWrites
from .sql import ObjectStore

log = logging.getLogger("durable.worker")

#: answered keys an instance keeps in memory (older ones are read from Postgres again)
RECENT_KEYS = 256


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A keyed call's reply, encoded once when its event ends: recorded, sent, and replayed."""

    #: HTTP-like status of an error reply; 0 for a value
    status: int
    as_json: bool
    headers: dict[str, str] | None
    body: bytes

    def pack(self) -> bytes:
        return codec.pack({"s": self.status, "j": self.as_json, "h": self.headers, "b": self.body})

    @staticmethod
    def unpack(data: bytes) -> Prepared:
        d = codec.unpack(data)
        return Prepared(d["s"], d["j"], d["h"], d["b"])

    @property
    def error(self) -> DurableError | None:
        """The error this reply carries (for metrics and `durable tail`), or None."""
        if not self.status:
            return None
        try:
            return DurableError.from_wire(codec.loads(self.body, self.as_json)["error"])
        except Exception:  # noqa: BLE001 - recorded by an older build: the status still counts
            return RemoteError(f"recorded error reply ({self.status})")

    def for_request(self, as_json: bool) -> Prepared:
        """The same reply in the encoding this request asked for (a repeat may ask otherwise)."""
        if as_json == self.as_json:
            return self
        error = self.error
        if error is not None:
            headers, body = wire.encode_error_reply(error, as_json)
            return Prepared(self.status, as_json, headers, body)
        value = codec.loads(self.body, self.as_json)
        return Prepared(0, as_json, {"Content-Type": codec.JSON_CONTENT_TYPE} if as_json else None,
                        codec.dumps(value, as_json))


def prepare(ok: bool, value: Any, as_json: bool) -> Prepared:
    """Encode an event's outcome as its reply: the value, or the error it raised."""
    if ok:
        try:
            return Prepared(0, as_json, {"Content-Type": codec.JSON_CONTENT_TYPE} if as_json else None,
                            codec.dumps(value, as_json))
        except (TypeError, ValueError, OverflowError) as exc:
            value = RemoteError(f"the return value cannot be sent: {exc}", remote_type=type(exc).__name__)
    error = value if isinstance(value, DurableError) else RemoteError(str(value), remote_type=type(value).__name__)
    headers, body = wire.encode_error_reply(error, as_json)
    return Prepared(error.status, as_json, headers, body)


class Call:
    """One key's call on a live instance: the first request runs it, repeats await ``reply``."""

    __slots__ = ("expires_ms", "fingerprint", "key", "reply")

    def __init__(self, key: str, fingerprint: str) -> None:
        self.key = key
        self.fingerprint = fingerprint
        #: the reply once durable, or the error that ended the call without a record
        self.reply: asyncio.Future[Prepared] = asyncio.get_running_loop().create_future()
        self.expires_ms = 0


class Keys:
    """The idempotency keys of one live instance: calls in flight and recently answered ones."""

    def __init__(self, object_id: str, store: ObjectStore) -> None:
        self.object_id = object_id
        self.store = store
        self.calls: OrderedDict[str, Call] = OrderedDict()

    async def begin(self, key: str, fingerprint: str) -> tuple[Call, bool]:
        """The call for ``key``, and whether this request runs it (True) or awaits its reply."""
        call = self.calls.get(key)
        if call is not None and call.reply.done() and call.expires_ms <= now_ms():
            del self.calls[key]  # expired: a repeat now runs the method again
            call = None
        if call is not None:
            if call.fingerprint != fingerprint:
                raise _reused(key, call.fingerprint, fingerprint)
            self.calls.move_to_end(key)
            return call, False
        call = self.calls[key] = Call(key, fingerprint)  # before the read: a concurrent repeat waits
        try:
            record = await self.store.read_idempotency(self.object_id, key, now_ms())
        except BaseException as exc:
            self.abandon(call, exc)
            raise
        if record is None:
            return call, True
        if record.fingerprint != fingerprint:
            error: DurableError = _reused(key, record.fingerprint, fingerprint)
        elif record.reply is None:
            error = IdempotencyInterrupted(
                f"the call made with Idempotency-Key {key!r} made part of its writes durable and stopped before "
                "it finished (its worker stopped during an outgoing call or sync()); its outcome is partial, so "
                "it is not run again")
        else:
            call.expires_ms = record.expires_ms
            self.finished(call, Prepared.unpack(record.reply))
            return call, False
        self.abandon(call, error)
        raise error

    def finished(self, call: Call, reply: Prepared) -> None:
        """The call's reply is durable: repeats get it from now on."""
        if not call.reply.done():
            call.reply.set_result(reply)
        if len(self.calls) > RECENT_KEYS:
            for key in [k for k, c in self.calls.items() if c.reply.done()][:len(self.calls) - RECENT_KEYS]:
                del self.calls[key]

    def abandon(self, call: Call, error: BaseException) -> None:
        """The call ended without a durable record: repeats waiting get ``error``, later ones
        look the key up again."""
        if self.calls.get(call.key) is call:
            del self.calls[call.key]
        if not call.reply.done():
            call.reply.set_exception(error)
            call.reply.exception()  # retrieved: nobody may be waiting


def _reused(key: str, recorded: str, asked: str) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(f"Idempotency-Key {key!r} was used for {recorded} of this object; it cannot be "
                                f"reused for {asked} (use a new key for each distinct call)")


class KeyedRun:
    """The event of a keyed call that runs: what it records, and when."""

    __slots__ = ("as_json", "call", "keys", "prepared", "record_errors", "ttl_ms")

    def __init__(self, keys: Keys, call: Call, as_json: bool, ttl: float, record_errors: bool = True) -> None:
        self.keys = keys
        #: False for stream messages (messages.py): a failed run leaves no record, so it is retried
        self.record_errors = record_errors
        self.call = call
        self.as_json = as_json
        self.ttl_ms = int(ttl * 1000)
        #: the reply, once the event ended and its record was staged
        self.prepared: Prepared | None = None

    def record(self, pending: PendingWrites, ok: bool, value: Any) -> None:
        """The event ended: stage its record with its writes (the same flush commits both)."""
        if not ok and not self.record_errors:
            return  # no record: settle() lets a repeat look the key up, and run, again
        self.prepared = prepare(ok, value, self.as_json)
        self.call.expires_ms = now_ms() + self.ttl_ms
        pending.record_call(self.call.key, IdempotencyRecord(self.call.fingerprint, self.prepared.pack(),
                                                             self.call.expires_ms))

    def record_started(self, pending: PendingWrites) -> None:
        """The event needs its writes durable before it ends: they commit with a started record."""
        pending.record_call(self.call.key, IdempotencyRecord(self.call.fingerprint, None, now_ms() + self.ttl_ms))

    def settle(self, error: BaseException | None) -> None:
        """The reply was sent (``error`` None) or the call failed without a durable record."""
        if error is None and self.prepared is not None:
            self.keys.finished(self.call, self.prepared)
        else:
            self.keys.abandon(self.call, error or ObjectReset(
                "the object was reset during the call made with this Idempotency-Key: nothing of it was "
                "recorded, so a repeat runs it again"))


class Sweeper:
    """Deletes expired idempotency records of the partitions this worker owns, a bounded pass at
    a time (records past their expiry are never answered from anyway: this only frees space)."""

    BATCH = 5000

    def __init__(self, store: ObjectStore, owned: Callable[[], list[int]], interval: float) -> None:
        self.store = store
        self.owned = owned
        self.interval = interval
        self.tasks = TaskSet()
        #: records deleted since start (tests, logs)
        self.deleted = 0

    def start(self) -> None:
        self.tasks.spawn(self._run(), "idempotency-sweep")

    async def stop(self) -> None:
        await self.tasks.cancel()

    async def sweep(self) -> int:
        """One sweep: delete expired records until none are left (or a pass finds fewer)."""
        deleted = 0
        partitions = self.owned()
        while partitions:
            n = await self.store.sweep_idempotency(partitions, now_ms(), self.BATCH)
            deleted += n
            if n < self.BATCH:
                break
        self.deleted += deleted
        return deleted

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except Exception as exc:  # noqa: BLE001 - Postgres trouble: the next sweep tries again
                log.warning("idempotency sweep failed: %s: %s", type(exc).__name__, exc)
