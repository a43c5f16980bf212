"""WebSockets as an object sees them (Cloudflare's hibernation API).

A gateway holds each client socket; the object holds only a :class:`WebSocket` handle naming it.
Accepting a socket writes its registration (tags, attachment, the object's auto-response pair)
to ``do_sockets`` in the object's own flush, so after eviction ("hibernation") or a failover the
next instance finds every socket again with ``get_websockets()``.

Outbound frames (``ws.send``, ``ws.close``, auto-response changes) wait behind the output gate
like replies, then leave as *one NATS message per gateway* on ``dgw.<key>.<gateway>``: a
broadcast of one payload to N sockets names the N sockets once, it does not copy the payload.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..core import codec
from ..core.errors import InvalidRequest

if TYPE_CHECKING:
    from .host import PartitionState, Worker
    from .instance import Instance

log = logging.getLogger("durable.websockets")

MAX_TAGS = 10
MAX_TAG_CHARS = 256
MAX_ATTACHMENT_BYTES = 16 * 1024
MAX_AUTO_RESPONSE_CHARS = 2048
#: the largest frame a gateway takes from a client, and an object may send
MAX_MESSAGE_BYTES = 1024 * 1024
#: one gateway message carries at most about this many payload bytes (NATS max_payload is 1 MiB)
GATEWAY_MESSAGE_BUDGET = 768 * 1024

#: headers a gateway puts on the upgrade request it hands to the user's routing code
SOCKET_ID_HEADER = "do-websocket-id"
GATEWAY_HEADER = "do-websocket-gateway"
#: headers on the 101 reply: which object accepted the socket, and its auto-response pair
OBJECT_HEADER = "do-websocket-object"
AUTO_RESPONSE_HEADER = "do-websocket-auto-response"


def gateway_subject(deployment_key: int, gateway: str) -> str:
    """Where a gateway receives frames to send and closes to perform."""
    return f"dgw.{deployment_key}.{gateway}"


def gateway_query_subject(deployment_key: int, gateway: str) -> str:
    """Where a gateway answers questions about its sockets (auto-response timestamps)."""
    return f"dgw.{deployment_key}.{gateway}.q"


def heartbeat_subject(deployment_key: int) -> str:
    return f"dgwhb.{deployment_key}"


def probe_subject(deployment_key: int, worker_id: str) -> str:
    """A worker's own probe: seeing it come back proves the worker's NATS link carries messages."""
    return f"dgwprobe.{deployment_key}.{worker_id}"


class WebSocket:
    """A client socket held by a gateway, as the object sees it. Handles are stable within one
    instance (use them as dict keys); after hibernation ``get_websockets()`` gives new ones."""

    __slots__ = ("id", "gateway", "tags", "_attachment", "_sockets", "state", "stored_auto", "__weakref__")

    def __init__(self, sockets: Sockets, socket_id: str, gateway: str, tags: tuple[str, ...] = (),
                 attachment: bytes | None = None, state: str = "open") -> None:
        self.id = socket_id
        self.gateway = gateway
        self.tags = tags
        self._attachment = attachment
        self._sockets = sockets
        #: pending (offered by an upgrade request) | open (accepted) | closed
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
        return f"WebSocket({self.id}, {self.state}, tags={list(self.tags)})"


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

    def __init__(self, instance: Instance) -> None:
        self._instance = instance
        self.by_id: dict[str, WebSocket] = {}
        self.loaded = False
        self.auto: tuple[str, str] | None = None
        #: gateway -> operations in order: ["send", [socket ids], data] | ["close", id, code, reason]
        #: | ["auto", [socket ids], request, response]
        self._outbox: dict[str, list[list[Any]]] = {}
        self._flush_scheduled = False

    # ----- registry ------------------------------------------------------------------------

    async def load(self) -> None:
        """Read this object's sockets once per instance (after hibernation or a failover)."""
        if self.loaded:
            return
        rows = await self._instance.host.read_sockets(self._instance.object_id)
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
        return WebSocket(self, socket_id, gateway, state="pending")

    def accept(self, ws: Any, tags: Any) -> None:
        if not isinstance(ws, WebSocket) or ws._sockets is not self:
            raise TypeError("accept_websocket() takes the request.websocket of an upgrade request to this object")
        if ws.state != "pending":
            raise ValueError("this WebSocket was already accepted" if ws.state == "open"
                             else "this WebSocket is closed")
        ws.tags = check_tags(tags)
        ws.state = "open"
        self.by_id[ws.id] = ws
        self.changed(ws)

    def all(self, tag: str | None = None) -> list[WebSocket]:
        return [ws for ws in self.by_id.values() if ws.state == "open" and (tag is None or tag in ws.tags)]

    def check_usable(self, ws: WebSocket, what: str) -> None:
        if ws._sockets is not self:
            raise ValueError(f"{what}: this WebSocket belongs to another object (or an earlier instance)")
        if ws.state == "closed":
            raise ValueError(f"Can't call WebSocket {what}() after close()")

    def changed(self, ws: WebSocket) -> None:
        """Its registration changed: written with the event's other writes."""
        if ws.state == "open":
            ws.stored_auto = self.auto
            self._instance.storage.stage_socket(ws.id, self.row(ws))

    def row(self, ws: WebSocket) -> tuple[str, str, bytes | None, str | None, str | None]:
        """(gateway, tags as JSON, attachment, auto request, auto response) as do_flush takes them."""
        auto = self.auto or (None, None)
        return ws.gateway, json.dumps(list(ws.tags)), ws._attachment, auto[0], auto[1]

    def closed(self, socket_id: str) -> WebSocket | None:
        """The client closed it (or its gateway died): forget it durably."""
        ws = self.by_id.pop(socket_id, None)
        if ws is not None:
            ws.state = "closed"
            self._instance.storage.stage_socket(socket_id, None)
        return ws

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
            task = asyncio.get_running_loop().create_task(self._load_then_apply_auto())
            self._instance.before_reply.append(task)

    async def _load_then_apply_auto(self) -> None:
        try:
            await self.load()
        except Exception as exc:  # noqa: BLE001 - the next load (any socket event) applies it
            log.warning("could not load sockets to apply an auto-response: %s", exc)
            return
        if self._instance.storage.closed is None:
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
            self._queue(gateway, ["auto", ids, *(self.auto or (None, None))])

    # ----- outbound ------------------------------------------------------------------------

    def send(self, ws: WebSocket, message: Any) -> None:
        self.check_usable(ws, "send")
        if ws.state != "open":
            raise ValueError("Can't call WebSocket send() before the socket is accepted")
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
        if last is not None and last[0] == "send" and (last[2] is message or last[2] == message):
            last[1].append(ws.id)
        else:
            self._queue(ws.gateway, ["send", [ws.id], message])

    def close(self, ws: WebSocket, code: int, reason: str) -> None:
        self.check_usable(ws, "close")
        if not isinstance(code, int) or not (code == 1000 or 3000 <= code <= 4999):
            raise ValueError(f"Invalid WebSocket close code: {code!r} (use 1000 or 3000-4999)")
        if not isinstance(reason, str) or len(_utf8(reason, "the close reason")) > 123:
            raise ValueError("the close reason must be a str of at most 123 UTF-8 bytes")
        self.closed(ws.id)
        ws.state = "closed"
        self._queue(ws.gateway, ["close", ws.id, code, reason])

    def _queue(self, gateway: str, op: list[Any]) -> None:
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
        storage = self._instance.storage
        host = self._instance.host
        seq = storage.write_seq

        async def deliver(error: BaseException | None) -> None:
            if error is None:  # a failed write discards what waited for it (Cloudflare's output gate)
                await host.send_to_gateways(outbox)

        if storage.is_durable(seq):
            host.spawn(deliver(None))
        elif storage.closed is None:
            storage.reply_when_durable(seq, deliver)


def split_ops(ops: list[list[Any]]) -> list[list[list[Any]]]:
    """Cut one gateway's operations into messages that fit NATS' max_payload."""
    chunks: list[list[list[Any]]] = [[]]
    size = 0
    for op in ops:
        op_size = 64 + (len(op[2]) if op[0] == "send" else 0) + 40 * (len(op[1]) if op[0] != "close" else 1)
        if chunks[-1] and size + op_size > GATEWAY_MESSAGE_BUDGET:
            chunks.append([])
            size = 0
        chunks[-1].append(op)
        size += op_size
    return chunks


def parse_event(payload: Any, fields: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """A gateway's event payload, checked: a malformed one is refused, never half-handled."""
    if not isinstance(payload, dict):
        raise InvalidRequest(f"a WebSocket event needs a map, not {type(payload).__name__}")
    for name, kind in fields.items():
        if not isinstance(payload.get(name), kind):
            raise InvalidRequest(f"a WebSocket event needs {name!r} of type {kind}")
    return payload


_SOCKETS_OF_LOST_GATEWAYS = (
    "SELECT socket_id, object_id, namespace, partition FROM do_sockets "
    "WHERE partition = ANY($1::int[]) AND NOT (gateway = ANY($2::text[])) LIMIT 10000"
)


class GatewayWatch:
    """Finds gateways that died: each announces itself every ``gateway_heartbeat_interval``; the
    sockets of one not heard for ``gateway_timeout`` are closed (1006, not clean) for the objects
    in this worker's partitions, so presence kept by objects stays honest.

    Not hearing a gateway only means it died if this worker's own link was carrying messages all
    that time: the worker sends itself a probe each interval, and judges gateways only once its
    probes have come back steadily for a whole ``gateway_timeout`` (after start-up, and again
    after any stall, pause or reconnect). Closing a live gateway's sockets would cut real users
    off from their objects."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.seen: dict[str, float] = {}
        self._subs: list[Subscription] = []
        self._task: asyncio.Task[None] | None = None
        #: since when this worker's own probes have been coming back without a gap (None: not now)
        self._healthy_since: float | None = None
        self._last_probe = 0.0
        self._closing: set[str] = set()
        self.closed_lost = 0

    async def start(self) -> None:
        key = self.worker.settings.deployment_key

        async def on_heartbeat(msg: Msg) -> None:
            try:
                gateway = codec.loads(msg.data, False)["gw"]
            except Exception:  # noqa: BLE001 - not a heartbeat of ours
                return
            if isinstance(gateway, str):
                self.seen[gateway] = time.monotonic()

        async def on_probe(msg: Msg) -> None:
            now = time.monotonic()
            if self._healthy_since is None:
                self._healthy_since = now
            self._last_probe = now

        self._subs = [
            await self.worker.nc.subscribe(heartbeat_subject(key), cb=on_heartbeat),
            await self.worker.nc.subscribe(probe_subject(key, self.worker.worker_id), cb=on_probe),
        ]
        self._task = asyncio.create_task(self._run(), name="gateway-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass

    def live(self) -> list[str]:
        horizon = time.monotonic() - self.worker.settings.gateway_timeout
        return [g for g, t in self.seen.items() if t >= horizon]

    def link_trusted(self) -> bool:
        """This worker's probes came back steadily for at least a gateway timeout."""
        settings = self.worker.settings
        now = time.monotonic()
        if now - self._last_probe > 2 * settings.gateway_heartbeat_interval + 0.5:
            self._healthy_since = None  # a gap: whatever we did not hear may have been lost
        return self._healthy_since is not None and now - self._healthy_since >= settings.gateway_timeout

    async def _run(self) -> None:
        settings = self.worker.settings
        probe = probe_subject(settings.deployment_key, self.worker.worker_id)
        while True:
            await asyncio.sleep(settings.gateway_heartbeat_interval)
            try:
                await self.worker.nc.publish(probe, b"")
            except Exception:  # noqa: BLE001 - no link: link_trusted() notices the missing probes
                pass
            horizon = time.monotonic() - 10 * settings.gateway_timeout
            for gateway in [g for g, t in self.seen.items() if t < horizon]:
                del self.seen[gateway]  # gone long ago: forget it
            if not self.link_trusted():
                continue
            states = {p: s for p, s in self.worker.parts.items() if not s.closing}
            if not states:
                continue
            try:
                async with self.worker.pool.acquire() as conn:
                    rows = await conn.fetch(_SOCKETS_OF_LOST_GATEWAYS, list(states), self.live())
            except Exception as exc:  # noqa: BLE001 - next round
                log.warning("could not look for sockets of lost gateways: %s: %s", type(exc).__name__, exc)
                continue
            for r in rows:
                state = states.get(r["partition"])
                if state is not None and r["socket_id"] not in self._closing:
                    self._closing.add(r["socket_id"])
                    self.worker.spawn(self._close(state, r["namespace"], r["object_id"], r["socket_id"]))

    async def _close(self, state: PartitionState, namespace: str, object_id: str, socket_id: str) -> None:
        try:
            inst = self.worker.instance_for(state, namespace, object_id)

            async def lost(obj: Any) -> None:
                await inst.sockets.load()
                ws = inst.sockets.closed(socket_id)
                if ws is None:  # already gone: make sure the row is too
                    inst.storage.stage_socket(socket_id, None)
                    return
                handler = getattr(obj, "websocket_close", None)
                if handler is not None:
                    await handler(ws, 1006, "the gateway holding this WebSocket was lost", False)

            ok, value, seq = await inst.run_event(lost)
            await inst.storage.wait_durable(seq)
            if ok:
                self.closed_lost += 1
            else:
                log.warning("websocket_close of %s/%s raised: %s", namespace, object_id, value)
        except Exception as exc:  # noqa: BLE001 - tried again next round
            log.info("could not close socket %s of a lost gateway: %s: %s", socket_id, type(exc).__name__, exc)
        finally:
            self._closing.discard(socket_id)
