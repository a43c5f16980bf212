"""A live object: the user's instance plus its gates, storage and lifecycle.

Input gate: an event runs while holding the instance's *turn*; awaiting its own storage keeps
the turn, so no other event starts meanwhile and a read-modify-write is atomic. A call to
another object opens the gate for its duration (events may interleave there, as Cloudflare
allows), unless it happens inside ``block_concurrency_while`` or a transaction.

Output gate: a reply, or an outgoing call, waits until the writes made before it are durable.

Reset: a failed flush, an exception out of ``block_concurrency_while`` or ``ctx.abort()`` drop
the instance; the next event builds a new one from committed state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..core.context import current_event
from ..core.errors import NotOwner, ObjectReset, RemoteError
from ..core.ids import ObjectId
from .storage import Storage
from .websockets import Sockets, WebSocket

if TYPE_CHECKING:
    from .host import Worker

#: Cloudflare resets an object whose block_concurrency_while runs longer than this.
BLOCK_CONCURRENCY_TIMEOUT = 30.0


class Context:
    """``self.ctx`` of an object."""

    def __init__(self, instance: Instance, object_id: ObjectId) -> None:
        self._instance = instance
        self.id = object_id
        self.storage = instance.storage

    def block_concurrency_while(self, fn: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
        """Run ``fn`` with no other event delivered; returns its result. From ``__init__`` it
        runs before the first event. A timeout (30 s) or an exception resets the object."""
        inst = self._instance
        if inst.constructing:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            inst.init_fns.append((fn, fut))
            return fut
        return inst.run_blocking(fn)

    # ----- WebSockets (Cloudflare's hibernation API) -------------------------------------

    def accept_websocket(self, ws: WebSocket, tags: list[str] | None = None) -> None:
        """Accept the socket of an upgrade request (``request.websocket``), then return
        ``Response(status=101)`` from fetch. At most 10 tags of at most 256 characters."""
        self._instance.sockets.accept(ws, tags)

    async def get_websockets(self, tag: str | None = None) -> list[WebSocket]:
        """Every open socket of this object (or those with ``tag``), also after hibernation."""
        await self._instance.sockets.load()
        return self._instance.sockets.all(tag)

    def get_tags(self, ws: WebSocket) -> list[str]:
        self._instance.sockets.check_usable(ws, "get_tags")
        return list(ws.tags)

    def set_websocket_auto_response(self, request: str | None = None, response: str | None = None) -> None:
        """Frames equal to ``request`` are answered with ``response`` by the gateway, without waking
        the object (each at most 2048 characters); no arguments clears it."""
        self._instance.sockets.set_auto_response(request, response)

    async def get_websocket_auto_response(self) -> tuple[str, str] | None:
        await self._instance.sockets.load()
        return self._instance.sockets.auto

    async def get_websocket_auto_response_timestamp(self, ws: WebSocket) -> int | None:
        """Epoch ms of the last auto-response the gateway sent on ``ws``, or None."""
        self._instance.sockets.check_usable(ws, "get_websocket_auto_response_timestamp")
        return await self._instance.host.auto_response_timestamp(ws.gateway, ws.id)

    def abort(self, reason: str = "Application called abort() to reset Durable Object.") -> None:
        error = ObjectReset(reason)
        self._instance.fail(error)
        raise error


class EventGuard:
    """Installed in ``current_event`` while an event runs: the hooks for outgoing calls."""

    __slots__ = ("instance", "task")

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.task = asyncio.current_task()

    async def before_outgoing(self) -> bool:
        """The output gate first (the turn is still held, so nothing else runs meanwhile), then
        open the input gate. Returns whether the gate was opened."""
        inst = self.instance
        inst.check()
        inst.check_owner()
        await inst.storage.wait_durable(inst.storage.write_seq)
        reopen = inst.blocking == 0 and asyncio.current_task() is self.task and inst.turn.locked()
        if reopen:
            inst.turn.release()
        return reopen

    async def after_outgoing(self, reopened: bool) -> None:
        if reopened:
            await _reacquire(self.instance.turn)
            self.instance.check()


async def _reacquire(lock: asyncio.Lock) -> None:
    """Take the turn back even if cancelled meanwhile: the event must hold it when it ends
    (asyncio locks have no owner, so releasing one we do not hold would free another event)."""
    acquiring = asyncio.ensure_future(lock.acquire())
    cancelled = False
    while not acquiring.done():
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


class Instance:
    """One live object in this worker."""

    def __init__(self, host: Worker, partition: int, epoch: int, namespace: str, cls: type,
                 object_id: ObjectId) -> None:
        self.host = host
        self.partition = partition
        self.epoch = epoch
        self.namespace = namespace
        self.cls = cls
        self.object_id = object_id.hex
        self.turn = asyncio.Lock()
        self.blocking = 0
        self.storage = Storage(self)
        self.sockets = Sockets(self)
        self.ctx = Context(self, object_id)
        self.obj: Any = None
        self.constructing = False
        self.init_fns: list[tuple[Callable[[], Awaitable[Any]], asyncio.Future[Any]]] = []
        self.inflight = 0
        #: tasks an event started that must finish before its reply (see Sockets.set_auto_response)
        self.before_reply: list[asyncio.Task[Any]] = []
        self.last_active = time.monotonic()
        self.broken: BaseException | None = None

    def check(self) -> None:
        if self.broken is not None:
            raise ObjectReset(f"Durable Object was reset: {self.broken}")

    def check_owner(self) -> None:
        """A lapsed lease: this instance may be stale; it must not act (nothing ran yet)."""
        if not self.host.ownership.owns(self.partition, self.epoch):
            raise NotOwner(f"this worker no longer holds the lease on partition {self.partition}")

    async def run_blocking(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        self.blocking += 1
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
            self.blocking -= 1

    async def _start(self) -> None:
        """Construct the user object, then run what its constructor deferred, before any event."""
        self.constructing = True
        try:
            self.obj = self.cls(self.ctx, self.host.env)
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

    async def run_event(self, handler: Callable[[Any], Awaitable[Any]]) -> tuple[bool, Any, int]:
        """Run one event under the input gate. Returns (ok, result or exception, write sequence
        its reply must wait for): the reply, error or not, goes behind the output gate."""
        self.inflight += 1
        try:
            async with self.turn:
                self.check()
                self.check_owner()
                # the guard is set before the constructor runs: outgoing calls made by its
                # block_concurrency_while wait for the output gate too
                token = current_event.set(EventGuard(self))
                try:
                    if self.obj is None:
                        await self.host.flusher.settled(self.object_id)
                        await self._start()
                    result = await handler(self.obj)
                    while self.before_reply:  # work the event started that its reply must follow
                        await self.before_reply.pop(0)
                    self.sockets.flush()  # the event's frames are queued ahead of its reply
                    return True, result, self.storage.write_seq
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # the event itself is being cancelled (shutdown)
                    error = RemoteError("the handler was cancelled", remote_type="CancelledError")
                    return False, error, self.storage.write_seq
                except Exception as exc:  # noqa: BLE001 - an ordinary handler error fails only this call
                    return False, exc, self.storage.write_seq
                finally:
                    current_event.reset(token)
                    self.last_active = time.monotonic()
        finally:
            self.inflight -= 1

    def fail(self, error: BaseException) -> None:
        """Drop this instance: storage refuses further use, waiting replies get the error."""
        if self.broken is None:
            self.broken = error
        self.storage.fail(error)
        self.host.drop_instance(self)

    @property
    def idle(self) -> bool:
        return self.inflight == 0 and not self.storage.has_unflushed and not self.turn.locked()
