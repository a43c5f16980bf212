"""``self.ctx`` of an object: its id, storage, gates and WebSockets (Cloudflare's DurableObjectState)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ..core.errors import ObjectReset
from ..core.ids import ObjectId
from .gateway_link import GatewayLink
from .sockets import Sockets, WebSocket
from .storage import Storage


class LiveObject(Protocol):
    """What a context needs of the live instance it belongs to (instance.py implements it)."""

    storage: Storage
    sockets: Sockets
    gateways: GatewayLink
    constructing: bool
    init_fns: list[tuple[Callable[[], Awaitable[Any]], asyncio.Future[Any]]]

    def run_blocking(self, fn: Callable[[], Awaitable[Any]]) -> Awaitable[Any]: ...

    def fail(self, error: BaseException) -> None: ...

    def emit(self, name: Any, payload: Any, headers: Any) -> None: ...


class Context:
    """``self.ctx`` of an object."""

    def __init__(self, instance: LiveObject, object_id: ObjectId) -> None:
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

    def emit(self, name: str, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        """Publish an event, transactionally: it commits with this event's storage writes (both or
        neither: inside ``storage.transaction()`` a rollback drops it, a reset object drops it with
        its unflushed writes) and only then goes to the JetStream subject
        ``evt.<Class>.<object id>.<name>``, once, in emit order per object (README "Events").

        ``name`` is one subject token (no dots, spaces or wildcards, at most 128 characters);
        ``payload`` is bytes or JSON-encodable, at most DURABLE_EVENT_MAX_BYTES; ``headers`` map
        str to str. Bad input raises here and stages nothing."""
        self._instance.emit(name, payload, headers)

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
        return await self._instance.gateways.auto_response_timestamp(ws.gateway, ws.id)

    def abort(self, reason: str = "Application called abort() to reset Durable Object.") -> None:
        error = ObjectReset(reason)
        self._instance.fail(error)
        raise error
