"""A live object: the user's instance with its gates, pending writes, storage and sockets.

Input gate (input_gate.py): an event runs holding the object's turn; a call to another object
opens it unless a blocking section is active. Output gate (output_gate.py): a reply, frames or
an outgoing call wait until the writes made before them are durable.

Reset: a failed flush, an exception out of ``block_concurrency_while``, ``ctx.abort()``, a lost
lease or eviction drop the instance; the next event builds a new one from committed state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from opentelemetry.trace import Span, SpanContext

from ..core.context import current_event
from ..core.errors import NotOwner, ObjectReset, RemoteError
from ..core.ids import ObjectId
from ..core.tasks import TaskSet
from .context import Context
from .events import EventRecord, make_record
from .gateway_link import GatewayLink
from .history import History, ObjectHistory
from .idempotency import KeyedRun, Keys
from .input_gate import InputGate
from .output_gate import OutputGate, ReplySender
from .pending import Batch, PendingWrites
from .sockets import Sockets
from .sql import ObjectStore, Owner
from .storage import Storage

#: An event handler with this attribute set needs only the object's storage: when the object is
#: not live, its class is not constructed for it (an operator's write must work on an object
#: whose constructor fails on the very state the operator is repairing).
STORAGE_ONLY = "durable_storage_only"

#: Cloudflare resets an object whose block_concurrency_while runs longer than this.
BLOCK_CONCURRENCY_TIMEOUT = 30.0


class Runtime(Protocol):
    """What a live object needs from the worker hosting it (partitions.py implements it)."""

    env: Any
    store: ObjectStore
    #: the largest event payload ctx.emit accepts (DURABLE_EVENT_MAX_BYTES, capped by NATS)
    event_max_bytes: int
    gateways: GatewayLink
    tasks: TaskSet
    #: the change history (history.py), or None when DURABLE_HISTORY is off
    history: History | None

    def owns(self, partition: int, epoch: int) -> bool:
        """This worker still holds ``partition`` at ``epoch`` under a valid lease."""

    def mark_dirty(self, inst: Instance) -> None:
        """The instance has writes for the flusher."""

    async def settled(self, object_id: str) -> None:
        """No flush of an earlier instance of ``object_id`` is in flight any more."""

    def drop(self, inst: Instance) -> None:
        """Forget a reset instance: the next event builds a new one."""


class EventGuard:
    """Installed in ``current_event`` while an event runs: the hooks for outgoing calls, for a
    keyed call (idempotency.py) the hold on the instance's flushes, and the events the handler
    emitted (events.py), staged only if it returns: a failed event emits nothing, though its
    writes stay (Cloudflare's semantics for storage); its caller got an error, and an event that
    says otherwise would contradict that caller."""

    __slots__ = ("events", "holding", "instance", "keyed", "running", "task")

    def __init__(self, instance: Instance, keyed: KeyedRun | None = None) -> None:
        self.instance = instance
        self.task = asyncio.current_task()
        self.keyed = keyed
        #: the events emitted so far, staged with the writes when the handler returns
        self.events: list[EventRecord] | None = None
        #: the handler has not ended yet (an emit from a task it left behind is staged at once)
        self.running = True
        #: this keyed event holds the instance's writes back from the flusher
        self.holding = False
        if keyed is not None:
            self.holding = True
            instance.held += 1

    def _unhold(self) -> bool:
        """Stop holding the instance's writes back; whether this event was holding them."""
        if not self.holding:
            return False
        self.holding = False
        self.instance.held -= 1
        return True

    def stage(self, events: Sequence[EventRecord]) -> None:
        if self.events is None:
            self.events = []
        self.events.extend(events)

    def ended(self, ok: bool, value: Any) -> None:
        """The event ended: its events are staged if it succeeded, and a keyed call stages its
        record (reply included) with its writes. A reset instance stages nothing: its writes
        are dropped too."""
        self.running = False
        events, self.events = self.events, None
        if events and ok and self.instance.broken is None:
            self.instance.pending.emit(events)
        if self.keyed is None:
            return
        self._unhold()
        if self.instance.broken is None:
            self.keyed.record(self.instance.pending, ok, value)

    def before_durable(self) -> None:
        """The event waits for its writes to be durable (an outgoing call, ``sync()``): a keyed
        call's writes so far commit with a started record (no reply) and are held no more."""
        if self._unhold() and self.instance.broken is None:
            assert self.keyed is not None
            self.keyed.record_started(self.instance.pending)

    def cancelled(self) -> None:
        """The event was cancelled (shutdown): no record, no events, and its writes are not held
        any more."""
        self.running = False
        self.events = None
        if self._unhold() and self.instance.output.has_unflushed:
            self.instance.runtime.mark_dirty(self.instance)

    async def before_outgoing(self) -> bool:
        """The output gate first (the turn is still held, so nothing else runs meanwhile), then
        open the input gate. Returns whether the gate was opened."""
        inst = self.instance
        inst.check()
        inst.check_owner()
        self.before_durable()
        await inst.output.wait_durable(inst.output.write_seq)
        return inst.input.open_for_call(self.task)

    async def after_outgoing(self, reopened: bool) -> None:
        if reopened:
            await self.instance.input.close_after_call()
            self.instance.check()


class Instance:
    """One live object in this worker."""

    def __init__(self, runtime: Runtime, partition: int, epoch: int, namespace: str, cls: type,
                 object_id: ObjectId) -> None:
        self.runtime = runtime
        self.gateways = runtime.gateways
        self.partition = partition
        self.epoch = epoch
        self.namespace = namespace
        self.cls = cls
        self.object_id = object_id.hex
        self.owner = Owner(self.object_id, namespace, partition, epoch)
        self.input = InputGate()
        self.output = OutputGate(runtime.tasks)
        self.pending = PendingWrites(self._wrote)
        #: keys the flush in flight deletes: their cache markers go once it commits
        self._flushing_deletes: list[bytes] = []
        self.storage = Storage(self.object_id, runtime.store, self.pending, self.output, self.input,
                               self._check_can_set_alarm, self._before_sync)
        self.storage.stage_events = self._stage_events
        #: tasks an event started that must finish before its reply (see Sockets.set_auto_response)
        self.before_reply: list[asyncio.Task[Any]] = []
        self.sockets = Sockets(self.object_id, runtime.store, self.pending, self.output, self.storage._check_open,
                               runtime.gateways, runtime.tasks, self.before_reply)
        self.ctx = Context(self, object_id)
        #: a restore asked for by on_next_session_restore_bookmark() was looked for (and applied)
        self.restore_checked = runtime.history is None
        if runtime.history is not None:
            self.storage.history = ObjectHistory(runtime.history, self.object_id, namespace, partition, epoch,
                                                 self.storage.sync)
        self.obj: Any = None
        self.constructing = False
        self.init_fns: list[tuple[Callable[[], Awaitable[Any]], asyncio.Future[Any]]] = []
        self.inflight = 0
        self.last_active = time.monotonic()
        #: when the running (or last) event got through the input gate (perf_counter): metrics
        self.event_started = 0.0
        #: span contexts of traced events whose writes wait for a flush (None: none; see trace_flush)
        self.flush_traces: list[SpanContext] | None = None
        self.broken: BaseException | None = None
        #: keyed events running now: while any is, the flusher leaves this object's writes be, so a
        #: call's writes and its idempotency record commit together (idempotency.py)
        self.held: int = 0
        #: the idempotency keys of calls to this instance (made on the first keyed call)
        self.keys: Keys | None = None
        #: per subscription, the highest stream sequence applied to this object (messages.py)
        self.stream_seqs: dict[str, int] = {}

    def idempotency_keys(self) -> Keys:
        if self.keys is None:
            self.keys = Keys(self.object_id, self.runtime.store)
        return self.keys

    def _before_sync(self) -> None:
        guard = current_event.get()
        if isinstance(guard, EventGuard) and guard.instance is self:
            guard.before_durable()

    def check(self) -> None:
        if self.broken is not None:
            raise ObjectReset(f"Durable Object was reset: {self.broken}")

    def check_owner(self) -> None:
        """A lapsed lease: this instance may be stale; it must not act (nothing ran yet)."""
        if not self.runtime.owns(self.partition, self.epoch):
            raise NotOwner(f"this worker no longer holds the lease on partition {self.partition}")

    def emit(self, name: Any, payload: Any, headers: Any) -> None:
        """Check the event (a clear error, nothing staged) and stage it with the writes (events.py)."""
        self.storage._check_open()
        record = make_record(self.cls.__name__, self.object_id, name, payload, headers, self.runtime.event_max_bytes)
        self.storage.emit([record])

    def _stage_events(self, events: Sequence[EventRecord]) -> None:
        """Where the storage hands emitted events (outside a transaction, or at its commit): the
        running event keeps them until it returns (EventGuard.ended)."""
        guard = current_event.get()
        if isinstance(guard, EventGuard) and guard.instance is self and guard.running:
            guard.stage(events)
        else:
            self.pending.emit(events)

    def _check_can_set_alarm(self) -> None:
        if not self.constructing and getattr(self.cls, "alarm", None) is None:
            raise TypeError(f"Your Durable Object class must have an alarm() handler in order to call "
                            f"set_alarm() ({self.cls.__name__} has none)")

    async def run_blocking(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        self.input.block()
        try:
            return await asyncio.wait_for(fn(), BLOCK_CONCURRENCY_TIMEOUT)
        except TimeoutError:
            error = ObjectReset("Durable Object storage operation exceeded timeout which caused object "
                                "to be reset (block_concurrency_while ran over 30 s)")
            self.fail(error)
            raise error from None
        except BaseException as exc:
            self.fail(ObjectReset(f"block_concurrency_while raised {type(exc).__name__}: {exc}"))
            raise
        finally:
            self.input.unblock()

    async def _start(self) -> None:
        """Construct the user object, then run what its constructor deferred, before any event."""
        self.constructing = True
        try:
            self.obj = self.cls(self.ctx, self.runtime.env)
        except BaseException as exc:
            self.fail(ObjectReset(f"constructor raised {type(exc).__name__}: {exc}"))
            raise
        finally:
            self.constructing = False
        while self.init_fns:
            fn, fut = self.init_fns.pop(0)
            try:
                fut.set_result(await self.run_blocking(fn))
            except BaseException as exc:
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: the caller sees the error through the event
                raise

    async def run_event(self, handler: Callable[[Any], Awaitable[Any]],
                        keyed: KeyedRun | None = None) -> tuple[bool, Any, int]:
        """Run one event under the input gate. Returns (ok, result or exception, write sequence
        its reply must wait for): the reply, error or not, goes behind the output gate. A keyed
        call (``keyed``) holds the object's writes until it ends, then stages its record with
        them (idempotency.py)."""
        self.inflight += 1
        try:
            async with self.input:
                self.event_started = time.perf_counter()
                self.check()
                self.check_owner()
                # the guard is set before the constructor runs: outgoing calls made by its
                # block_concurrency_while wait for the output gate too
                guard = EventGuard(self, keyed)
                token = current_event.set(guard)
                try:
                    ok, value = await self._run(handler)
                except BaseException:
                    guard.cancelled()
                    raise
                finally:
                    current_event.reset(token)
                    self.last_active = time.monotonic()
                guard.ended(ok, value)
                return ok, value, self.output.write_seq
        finally:
            self.inflight -= 1

    async def _run(self, handler: Callable[[Any], Awaitable[Any]]) -> tuple[bool, Any]:
        """The event's body: (True, result) or (False, the exception it raised)."""
        try:
            if self.obj is None:
                await self.runtime.settled(self.object_id)
                if not self.restore_checked and self.storage.history is not None:
                    # before anything reads storage: the constructor sees the restored state
                    await self.storage.history.apply_pending()
                    self.restore_checked = True
                if not getattr(handler, STORAGE_ONLY, False):
                    await self._start()
            result = await handler(self.obj)
            while self.before_reply:  # work the event started that its reply must follow
                await self.before_reply.pop(0)
            self.sockets.flush()  # the event's frames are queued ahead of its reply
            return True, result
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the event itself is being cancelled (shutdown)
            return False, RemoteError("the handler was cancelled", remote_type="CancelledError")
        except Exception as exc:  # noqa: BLE001 - an ordinary handler error fails only this call
            return False, exc

    def trace_flush(self, span: Span, seq: int) -> None:
        """A traced event whose writes up to ``seq`` are not durable yet: the flush that commits
        them is traced as that event's child (only traced events get here: no cost otherwise)."""
        if not self.output.is_durable(seq):
            if self.flush_traces is None:
                self.flush_traces = []
            self.flush_traces.append(span.get_span_context())

    def take_traces(self) -> list[SpanContext]:
        """The span contexts waiting for the flush that is about to start (cleared)."""
        traces, self.flush_traces = self.flush_traces or [], None
        return traces

    def fail(self, error: BaseException) -> None:
        """Drop this instance: storage refuses further use, waiting replies get the error."""
        if self.broken is None:
            self.broken = error
        self.storage.close(error)
        self.output.fail(error)
        self.runtime.drop(self)

    @property
    def idle(self) -> bool:
        return self.inflight == 0 and not self.output.has_unflushed and not self.input.held

    @property
    def has_unflushed(self) -> bool:
        return self.output.has_unflushed

    # ----- what the flusher sees ----------------------------------------------------------

    def _wrote(self) -> None:
        self.output.wrote()
        self.runtime.mark_dirty(self)

    def take_batch(self) -> Batch | None:
        """The pending writes, for one flush; None when there is nothing or a flush is in flight."""
        output = self.output
        if output.flushing or output.failed is not None or not output.has_unflushed or self.held:
            return None  # (held: released by the keyed event's end, which marks it dirty again)
        output.flushing = True
        batch = self.pending.take(output.write_seq)
        self._flushing_deletes = [k for k, v in batch.writes.items() if v is None]
        return batch

    def flushed(self, seq: int) -> list[ReplySender]:
        """A flush committed up to ``seq``: the replies now free to go."""
        ready = self.output.flushed(seq)
        if self._flushing_deletes:
            self.storage.forget_deleted(self._flushing_deletes)
            self._flushing_deletes = []
        if self.output.has_unflushed:
            self.runtime.mark_dirty(self)
        return ready
