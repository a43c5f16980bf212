"""WebSockets as an object sees them (Cloudflare's hibernation API): the handle and the registry.

A gateway holds each client socket; the object holds only a :class:`WebSocket` handle naming it.
Accepting a socket writes its registration (tags, attachment, the object's auto-response pair)
to ``do_sockets`` in the object's own flush, so after eviction ("hibernation") or a failover the
next instance finds every socket again with ``get_websockets()``.

Outbound frames (``ws.send``, ``ws.close``, auto-response changes) wait behind the output gate
like replies, then leave as *one NATS message per gateway* (see ``core/wire.py``): a broadcast
of one payload to N sockets names the N sockets once, it does not copy the payload.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import Callable
from typing import Any

from ..core import codec
from ..core.tasks import TaskSet
from ..core.wire import MAX_MESSAGE_BYTES, AutoOp, CloseOp, GatewayOp, SendOp
from .gateway_link import GatewayLink
from .output_gate import OutputGate
from .pending import PendingWrites, SocketRow
from .sql import ObjectStore

log = logging.getLogger("durable.websockets")

MAX_TAGS = 10
MAX_TAG_CHARS = 256
MAX_ATTACHMENT_BYTES = 16 * 1024
MAX_AUTO_RESPONSE_CHARS = 2048


class SocketState(enum.StrEnum):
    """A socket as its object sees it; compares equal to its lower-case name ("open")."""

    PENDING = "pending"  #: offered by an upgrade request, not yet accepted
    OPEN = "open"  #: accepted
    CLOSED = "closed"


class WebSocket:
    """A client socket held by a gateway, as the object sees it. Handles are stable within one
    instance (use them as dict keys); after hibernation ``get_websockets()`` gives new ones."""

    __slots__ = ("id", "gateway", "tags", "_attachment", "_sockets", "state", "stored_auto", "__weakref__")

    def __init__(self, sockets: Sockets, socket_id: str, gateway: str, tags: tuple[str, ...] = (),
                 attachment: bytes | None = None, state: SocketState = SocketState.OPEN) -> None:
        self.id = socket_id
        self.gateway = gateway
        self.tags = tags
        self._attachment = attachment
        self._sockets = sockets
        self.state = state
        #: the auto-response pair its registration row holds (and its gateway knows)
        self.stored_auto: tuple[str, str] | None = None

    def send(self, message: str | bytes) -> None:
        """Send a text (str) or binary (bytes) frame, once the writes before it are durable."""
        self._sockets.send(self, message)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket; the object gets no ``websocket_close`` for a close it started."""
        self._sockets.close(self, code, reason)

    def serialize_attachment(self, value: Any) -> None:
        """Keep a value with the socket (at most 16 KiB serialised); it survives hibernation."""
        encoded = codec.encode_value(value)
        if len(encoded) > MAX_ATTACHMENT_BYTES:
            raise ValueError(f"A WebSocket 'attachment' cannot be larger than {MAX_ATTACHMENT_BYTES} bytes. "
                             f"'attachment' was {len(encoded)} bytes.")
        self._sockets.check_usable(self, "serialize_attachment")
        self._attachment = encoded
        self._sockets.changed(self)

    def deserialize_attachment(self) -> Any:
        """The value given to ``serialize_attachment``, or None."""
        return None if self._attachment is None else codec.unpack(self._attachment)

    def __repr__(self) -> str:
        return f"WebSocket({self.id}, {self.state.value}, tags={list(self.tags)})"


def _utf8(text: str, what: str) -> bytes:
    """``text`` as UTF-8, or a clear ValueError: a lone surrogate cannot be sent or stored."""
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what}: {codec.not_unicode(exc)}") from None


def check_tags(tags: Any) -> tuple[str, ...]:
    """Cloudflare's tag rules: at most 10 distinct tags of at most 256 characters; duplicates dropped."""
    if tags is None:
        return ()
    if isinstance(tags, str) or not isinstance(tags, list | tuple):
        raise TypeError(f"tags must be a list of str, not {type(tags).__name__}")
    unique: list[str] = []
    for tag in tags:
        if not isinstance(tag, str):
            raise TypeError(f"tags must be str, not {type(tag).__name__}")
        if len(tag) > MAX_TAG_CHARS:
            raise ValueError(f'"{tag[:40]}..." is longer than the max tag length ({MAX_TAG_CHARS} characters).')
        _utf8(tag, "a WebSocket tag")
        if tag not in unique:
            unique.append(tag)
    if len(unique) > MAX_TAGS:
        raise ValueError(f"a Hibernatable WebSocket cannot have more than {MAX_TAGS} tags")
    return tuple(unique)


def _check_auto(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"the auto-response {what} must be a str, not {type(value).__name__}")
    if len(value) > MAX_AUTO_RESPONSE_CHARS:
        raise ValueError(f"{what.capitalize()} cannot be larger than {MAX_AUTO_RESPONSE_CHARS} bytes. "
                         f"A {what} of size {len(value)} was provided.")
    _utf8(value, f"the auto-response {what}")
    return value


class Sockets:
    """The sockets of one live object, and the frames it has yet to send."""

    def __init__(self, object_id: str, store: ObjectStore, pending: PendingWrites, output: OutputGate,
                 check_open: Callable[[], None], gateways: GatewayLink, tasks: TaskSet,
                 before_reply: list[asyncio.Task[Any]]) -> None:
        self._object_id = object_id
        self._store = store
        self._pending = pending
        self._output = output
        self._check_open = check_open
        self._gateways = gateways
        self._tasks = tasks
        #: work an event started that its reply must wait for (shared with the instance)
        self._before_reply = before_reply
        self.by_id: dict[str, WebSocket] = {}
        self.loaded = False
        self.auto: tuple[str, str] | None = None
        #: gateway -> operations in the order the object made them
        self._outbox: dict[str, list[GatewayOp]] = {}
        self._flush_scheduled = False

    # ----- registry ------------------------------------------------------------------------

    async def load(self) -> None:
        """Read this object's sockets once per instance (after hibernation or a failover)."""
        if self.loaded:
            return
        rows = await self._store.read_sockets(self._object_id)
        if self.loaded:
            return
        explicit = self.auto is not None
        for r in rows:
            stored = None if r["auto_request"] is None else (r["auto_request"], r["auto_response"])
            if r["socket_id"] not in self.by_id:
                ws = WebSocket(self, r["socket_id"], r["gateway"], tuple(r["tags"]),
                               None if r["attachment"] is None else bytes(r["attachment"]))
                ws.stored_auto = stored
                self.by_id[r["socket_id"]] = ws
            if not explicit and self.auto is None and stored is not None:
                self.auto = stored
        self.loaded = True

    def offered(self, socket_id: str, gateway: str) -> WebSocket:
        """The handle of a socket an upgrade request offers to this object (not yet accepted)."""
        return WebSocket(self, socket_id, gateway, state=SocketState.PENDING)

    def accept(self, ws: Any, tags: Any) -> None:
        if not isinstance(ws, WebSocket) or ws._sockets is not self:
            raise TypeError("accept_websocket() takes the request.websocket of an upgrade request to this object")
        if ws.state is not SocketState.PENDING:
            raise ValueError("this WebSocket was already accepted" if ws.state is SocketState.OPEN
                             else "this WebSocket is closed")
        ws.tags = check_tags(tags)
        ws.state = SocketState.OPEN
        self.by_id[ws.id] = ws
        self.changed(ws)

    def all(self, tag: str | None = None) -> list[WebSocket]:
        return [ws for ws in self.by_id.values() if ws.state is SocketState.OPEN and (tag is None or tag in ws.tags)]

    def check_usable(self, ws: WebSocket, what: str) -> None:
        if ws._sockets is not self:
            raise ValueError(f"{what}: this WebSocket belongs to another object (or an earlier instance)")
        if ws.state is SocketState.CLOSED:
            raise ValueError(f"Can't call WebSocket {what}() after close()")

    def changed(self, ws: WebSocket) -> None:
        """Its registration changed: written with the event's other writes."""
        if ws.state is SocketState.OPEN:
            ws.stored_auto = self.auto
            self._stage(ws.id, self.row(ws))

    def _stage(self, socket_id: str, row: SocketRow | None) -> None:
        """A registration (None: removal) written with the current event's writes."""
        self._check_open()
        self._pending.set_socket(socket_id, row)

    def row(self, ws: WebSocket) -> SocketRow:
        """(gateway, tags as JSON, attachment, auto request, auto response) as do_flush takes them."""
        auto = self.auto or (None, None)
        return ws.gateway, json.dumps(list(ws.tags)), ws._attachment, auto[0], auto[1]

    def closed(self, socket_id: str) -> WebSocket | None:
        """The client closed it (or its gateway died): forget it durably."""
        ws = self.by_id.pop(socket_id, None)
        if ws is not None:
            ws.state = SocketState.CLOSED
            self._stage(socket_id, None)
        return ws

    def forget(self, socket_id: str) -> None:
        """Make sure a socket's row is gone (its gateway was lost and this instance never knew it)."""
        self._stage(socket_id, None)

    def set_auto_response(self, request: str | None, response: str | None) -> None:
        if request is None and response is None:
            pair = None
        else:
            pair = (_check_auto(request, "request"), _check_auto(response, "response"))
        self.auto = pair
        if self.loaded:
            self._apply_auto()
        else:  # sockets accepted by earlier instances must learn it too: read them first, and
            # before the event that set it answers (it takes effect for the frames that follow)
            self._before_reply.append(self._tasks.spawn(self._load_then_apply_auto(), "load-then-auto"))

    async def _load_then_apply_auto(self) -> None:
        try:
            await self.load()
        except Exception as exc:  # noqa: BLE001 - the next load (any socket event) applies it
            log.warning("could not load sockets to apply an auto-response: %s", exc)
            return
        if self._output.failed is None:
            self._apply_auto()

    def _apply_auto(self) -> None:
        """Write the pair to every socket whose row has another, and tell their gateways."""
        by_gateway: dict[str, list[str]] = {}
        for ws in self.all():
            if ws.stored_auto == self.auto:
                continue
            self.changed(ws)
            by_gateway.setdefault(ws.gateway, []).append(ws.id)
        for gateway, ids in by_gateway.items():
            self._queue(gateway, AutoOp(ids, self.auto))

    # ----- outbound ------------------------------------------------------------------------

    def send(self, ws: WebSocket, message: Any) -> None:
        self.check_usable(ws, "send")
        if ws.state is not SocketState.OPEN:
            raise ValueError("Can't call WebSocket send() before the socket is accepted")
        ops = self._outbox.get(ws.gateway)
        last = ops[-1] if ops else None
        if isinstance(last, SendOp) and last.data is message:
            # a broadcast loop: the very payload the previous send checked, to one more socket
            last.socket_ids.append(ws.id)
            return
        if not isinstance(message, str | bytes | bytearray | memoryview):
            raise TypeError(f"WebSocket send() takes str or bytes, not {type(message).__name__}")
        if not isinstance(message, str):
            message = bytes(message)
        if isinstance(message, bytes):
            size = len(message)
        else:
            # refused here, before it reaches the outbox: one bad frame, not a failed event
            size = len(_utf8(message, "WebSocket send() cannot send this text frame"))
        if size > MAX_MESSAGE_BYTES:
            raise ValueError(f"WebSocket message of {size} bytes is over the limit of {MAX_MESSAGE_BYTES} bytes")
        ops = self._outbox.setdefault(ws.gateway, [])
        last = ops[-1] if ops else None
        # a broadcast loop sends one payload to many sockets: name them all in one operation
        if isinstance(last, SendOp) and (last.data is message or last.data == message):
            last.socket_ids.append(ws.id)
        else:
            self._queue(ws.gateway, SendOp([ws.id], message))

    def close(self, ws: WebSocket, code: int, reason: str) -> None:
        self.check_usable(ws, "close")
        if not isinstance(code, int) or not (code == 1000 or 3000 <= code <= 4999):
            raise ValueError(f"Invalid WebSocket close code: {code!r} (use 1000 or 3000-4999)")
        if not isinstance(reason, str) or len(_utf8(reason, "the close reason")) > 123:
            raise ValueError("the close reason must be a str of at most 123 UTF-8 bytes")
        self.closed(ws.id)
        ws.state = SocketState.CLOSED
        self._queue(ws.gateway, CloseOp(ws.id, code, reason))

    def _queue(self, gateway: str, op: GatewayOp) -> None:
        self._outbox.setdefault(gateway, []).append(op)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Hand the queued frames to the output gate: they leave once the writes made so far commit."""
        self._flush_scheduled = False
        outbox, self._outbox = self._outbox, {}
        if not outbox:
            return
        output = self._output
        seq = output.write_seq
        gateways = self._gateways

        async def deliver(error: BaseException | None) -> None:
            if error is None:  # a failed write discards what waited for it (Cloudflare's output gate)
                await gateways.send(outbox)

        if output.is_durable(seq):
            self._tasks.spawn(deliver(None), "frames-out")
        elif output.failed is None:
            output.reply_when_durable(seq, deliver)
